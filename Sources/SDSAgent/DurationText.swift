/// Parses and prints durations the way Go and Kubernetes write them: `24h`, `90s`, `1h30m`, `500ms`.
public enum DurationText {
    /// The longest duration accepted: 100 years (876000h). Nothing the agent times is longer,
    /// and every duration it parses stays far from the overflow of any clock or date arithmetic.
    public static let maximum = Duration.seconds(100 * 365 * 86400)

    /// Parses a sequence of `<integer><unit>` with units `h`, `m`, `s`, `ms`; nil when malformed or
    /// longer than ``maximum``. Never traps: every step is checked for overflow.
    public static func parse(_ text: String) -> Duration? {
        let limit = maximum.components.seconds * 1000  // in milliseconds
        var total: Int64 = 0  // milliseconds
        var digits: Int64?
        var bytes = text.utf8[...]
        guard !bytes.isEmpty, bytes.count <= 64 else { return nil }
        while let byte = bytes.first {
            bytes = bytes.dropFirst()
            if (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) {
                let (shifted, o1) = (digits ?? 0).multipliedReportingOverflow(by: 10)
                let (value, o2) = shifted.addingReportingOverflow(Int64(byte - UInt8(ascii: "0")))
                guard !o1, !o2, value <= limit else { return nil }
                digits = value
                continue
            }
            guard let value = digits else { return nil }
            digits = nil
            let unit: Int64
            switch byte {
            case UInt8(ascii: "h"): unit = 3_600_000
            case UInt8(ascii: "s"): unit = 1000
            case UInt8(ascii: "m"):
                if bytes.first == UInt8(ascii: "s") {
                    bytes = bytes.dropFirst()
                    unit = 1
                } else {
                    unit = 60_000
                }
            default: return nil
            }
            let (part, o1) = value.multipliedReportingOverflow(by: unit)
            let (sum, o2) = total.addingReportingOverflow(part)
            guard !o1, !o2, sum <= limit else { return nil }
            total = sum
        }
        return digits == nil ? .milliseconds(total) : nil
    }
}
