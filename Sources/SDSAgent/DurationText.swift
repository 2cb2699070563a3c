/// Parses and prints durations the way Go and Kubernetes write them: `24h`, `90s`, `1h30m`, `500ms`.
public enum DurationText {
    /// Parses a sequence of `<integer><unit>` with units `h`, `m`, `s`, `ms`; nil when malformed.
    public static func parse(_ text: String) -> Duration? {
        var total = Duration.zero
        var digits = ""
        var chars = Array(text)
        guard !chars.isEmpty else { return nil }
        var index = 0
        var sawComponent = false
        while index < chars.count {
            let c = chars[index]
            if c.isASCII, c.isNumber {
                digits.append(c)
                index += 1
                continue
            }
            guard let value = Int64(digits) else { return nil }
            digits = ""
            if c == "m", index + 1 < chars.count, chars[index + 1] == "s" {
                total += .milliseconds(value)
                index += 2
            } else {
                switch c {
                case "h": total += .seconds(value * 3600)
                case "m": total += .seconds(value * 60)
                case "s": total += .seconds(value)
                default: return nil
                }
                index += 1
            }
            sawComponent = true
        }
        chars.removeAll()
        return digits.isEmpty && sawComponent ? total : nil
    }
}
