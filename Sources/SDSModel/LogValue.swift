import Logging

extension Logger.MetadataValue {
    /// A count, a limit or a pid: a number in JSON logs (`"limit":2048`), the same text in text logs.
    public static func number(_ value: Int) -> Self { .stringConvertible(value) }

    /// A list of names: an array in JSON logs (`"names":["default","ROOTCA"]`), `["default", "ROOTCA"]`
    /// in text logs, as before.
    public static func list(_ values: some Sequence<some CustomStringConvertible>) -> Self {
        .array(values.map { .string($0.description) })
    }

    /// The value when it is a number or a boolean, which no caller byte can be part of; nil otherwise.
    public var plainScalar: String? {
        guard case .stringConvertible(let value) = self else { return nil }
        switch value {
        case is Int, is Int32, is Int64, is UInt, is UInt32, is UInt64, is Bool: return value.description
        case let double as Double where double.isFinite: return double.description
        default: return nil
        }
    }
}
