/// Parses and prints durations the way Go and Kubernetes write them: `24h`, `90s`, `1h30m`, `500ms`.
package enum DurationText {
    /// The longest duration accepted: 100 years (876000h). Nothing the agent times is longer,
    /// and every duration it parses stays far from the overflow of any clock or date arithmetic.
    package static let maximum = Duration.seconds(100 * 365 * 86400)

    /// Parses a sequence of `<integer><unit>` with units `h`, `m`, `s`, `ms`; nil when malformed or
    /// longer than ``maximum``. Never traps: every step is checked for overflow.
    package static func parse(_ text: String) -> Duration? {
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

    /// The shortest text that parses back to `duration` (`24h`, `1h30m`, `90s`, `500ms`, `0s`).
    package static func format(_ duration: Duration) -> String {
        var milliseconds = duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
        guard milliseconds > 0 else { return "0s" }
        var text = ""
        for (unit, name) in [(Int64(3_600_000), "h"), (60_000, "m"), (1000, "s"), (1, "ms")] where milliseconds >= unit {
            text += "\(milliseconds / unit)\(name)"
            milliseconds %= unit
        }
        return text
    }

    /// What a duration value may look like, for error messages.
    package static let expected = "a duration such as 24h, 30m, 90s, 500ms or 1h30m, of at most 876000h (100 years)"
}
