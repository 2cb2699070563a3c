/// The YAML the agent reads (the configuration file, the attestation policy): block mappings and
/// sequences, flow `[a, b]` and `{k: v}`, plain, single- and double-quoted scalars, comments.
/// Anchors, aliases, tags, block scalars (`|`, `>`) and multiple documents are refused with the
/// line they are on, never guessed at.
///
/// Written here instead of linking a YAML library: the one in the package mirror (Yams) needs
/// Foundation proper, whose ICU data is a third of the static binary.
package indirect enum YAMLNode: Sendable, Equatable {
    case scalar(String)
    case sequence([YAMLNode])
    case mapping([Entry])
    /// `key:` with nothing after it.
    case empty

    package struct Entry: Sendable, Equatable {
        package var key: String
        package var value: YAMLNode
    }

    package var scalar: String? {
        if case .scalar(let text) = self { return text }
        return nil
    }

    package var sequence: [YAMLNode]? {
        if case .sequence(let items) = self { return items }
        return nil
    }

    package var mapping: [Entry]? {
        if case .mapping(let entries) = self { return entries }
        return nil
    }

    package subscript(key: String) -> YAMLNode? {
        mapping?.first { $0.key == key }?.value
    }

    /// A YAML 1.1 boolean (`true`, `false`, `yes`, `no`, `on`, `off`, any case), else nil.
    package var bool: Bool? {
        switch scalar?.lowercased() {
        case "true", "yes", "on": true
        case "false", "no", "off": false
        default: nil
        }
    }

    /// What kind of node this is, for messages.
    package var kind: String {
        switch self {
        case .scalar: "value"
        case .sequence: "sequence"
        case .mapping: "mapping"
        case .empty: "nothing"
        }
    }

    /// Parses `text`; nil for a document with no content.
    package static func parse(_ text: String) throws(YAMLError) -> YAMLNode? {
        var parser = try YAMLParser(text)
        return try parser.document()
    }
}

/// Where and why a YAML text was refused.
package struct YAMLError: Error, Sendable, Equatable, CustomStringConvertible {
    package var line: Int
    package var message: String
    package var description: String { "line \(line): \(message)" }
}

private struct YAMLParser {
    struct Line {
        var number: Int
        var indent: Int
        var text: Substring
    }

    var lines: [Line] = []
    var index = 0

    init(_ text: String) throws(YAMLError) {
        var sawDocumentStart = false
        // "\r\n" is one Character in Swift, never equal to "\n": a CRLF file split on "\n" was
        // one line, and the whole file became the first key's value.
        let rawLines = text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" || $0 == "\r" })
        for (offset, raw) in rawLines.enumerated() {
            let number = offset + 1
            var line = raw
            line = Self.withoutComment(line)
            while line.last == " " || line.last == "\t" { line = line.dropLast() }
            let indent = line.prefix(while: { $0 == " " }).count
            let content = line.dropFirst(indent)
            if content.isEmpty { continue }
            if content.first == "\t" { throw YAMLError(line: number, message: "a tab in the indentation (use spaces)") }
            if indent == 0 && (content == "---" || content.hasPrefix("--- ")) {
                if sawDocumentStart || !lines.isEmpty { throw YAMLError(line: number, message: "more than one document") }
                sawDocumentStart = true
                continue
            }
            if indent == 0 && content == "..." { break }
            if indent == 0 && content.hasPrefix("%") { throw YAMLError(line: number, message: "directives are not supported") }
            lines.append(Line(number: number, indent: indent, text: content))
        }
    }

    /// The line without a comment: `#` at its start or after a space, outside quotes.
    static func withoutComment(_ line: Substring) -> Substring {
        var quote: Character?
        var previous: Character = " "
        var position = line.startIndex
        while position < line.endIndex {
            let character = line[position]
            if let open = quote {
                if character == "\\" && open == "\"" {
                    // An escaped character inside double quotes: skip it.
                    position = line.index(after: position)
                    if position == line.endIndex { break }
                } else if character == open {
                    let next = line.index(after: position)
                    if open == "'" && next < line.endIndex && line[next] == "'" {
                        position = next  // '' inside single quotes
                    } else {
                        quote = nil
                    }
                }
            } else if character == "\"" || character == "'" {
                if previous == " " || previous == "[" || previous == "{" || previous == "," || previous == ":" { quote = character }
            } else if character == "#" && (previous == " " || previous == "\t") {
                return line[..<position]
            }
            previous = line[position]
            position = line.index(after: position)
        }
        return line.first == "#" ? line.prefix(0) : line
    }

    mutating func document() throws(YAMLError) -> YAMLNode? {
        guard !lines.isEmpty else { return nil }
        let node = try block(indent: lines[0].indent)
        if index < lines.count {
            throw YAMLError(line: lines[index].number, message: "unexpected indentation or content after the document")
        }
        return node
    }

    static func isSequenceItem(_ text: Substring) -> Bool { text == "-" || text.hasPrefix("- ") }

    /// Whether `text` starts a block node of its own (a nested item or a mapping entry).
    static func startsNode(_ text: Substring, line: Int) throws(YAMLError) -> Bool {
        if isSequenceItem(text) { return true }
        return try splitKey(text, line: line) != nil
    }

    mutating func block(indent: Int) throws(YAMLError) -> YAMLNode {
        let line = lines[index]
        if Self.isSequenceItem(line.text) { return try sequence(indent: indent) }
        if try Self.splitKey(line.text, line: line.number) != nil { return try mapping(indent: indent) }
        index += 1
        return try Self.inline(line.text, line: line.number)
    }

    mutating func sequence(indent: Int) throws(YAMLError) -> YAMLNode {
        var items: [YAMLNode] = []
        while index < lines.count, lines[index].indent == indent, Self.isSequenceItem(lines[index].text) {
            let line = lines[index]
            let rest = line.text.dropFirst(1).drop(while: { $0 == " " })
            if rest.isEmpty {
                index += 1
                if index < lines.count, lines[index].indent > indent {
                    items.append(try block(indent: lines[index].indent))
                } else {
                    items.append(.empty)
                }
            } else if try Self.startsNode(rest, line: line.number) {
                // `- key: value` (or `- - x`): a node starting on this line, at the column after "- ".
                lines[index] = Line(number: line.number, indent: line.indent + (line.text.count - rest.count), text: rest)
                items.append(try block(indent: lines[index].indent))
            } else {
                index += 1
                items.append(try Self.inline(rest, line: line.number))
            }
        }
        return .sequence(items)
    }

    mutating func mapping(indent: Int) throws(YAMLError) -> YAMLNode {
        var entries: [YAMLNode.Entry] = []
        while index < lines.count, lines[index].indent == indent, !Self.isSequenceItem(lines[index].text) {
            let line = lines[index]
            guard let (key, rest) = try Self.splitKey(line.text, line: line.number) else {
                throw YAMLError(line: line.number, message: "expected 'key: value'")
            }
            if entries.contains(where: { $0.key == key }) { throw YAMLError(line: line.number, message: "key '\(key)' appears twice") }
            index += 1
            let value: YAMLNode
            if !rest.isEmpty {
                value = try Self.inline(rest, line: line.number)
            } else if index < lines.count, lines[index].indent > indent {
                value = try block(indent: lines[index].indent)
            } else if index < lines.count, lines[index].indent == indent, Self.isSequenceItem(lines[index].text) {
                value = try sequence(indent: indent)
            } else {
                value = .empty
            }
            entries.append(.init(key: key, value: value))
        }
        return .mapping(entries)
    }

    /// `key: rest` (or `key:`), the key plain or quoted; nil when the line is not a mapping entry.
    static func splitKey(_ text: Substring, line: Int) throws(YAMLError) -> (String, Substring)? {
        if let first = text.first, first == "\"" || first == "'" {
            var cursor = text.startIndex
            let key = try quoted(text, at: &cursor, line: line)
            let after = text[cursor...]
            guard after.hasPrefix(":"), after.count == 1 || after.dropFirst().first == " " else { return nil }
            return (key, after.dropFirst().drop(while: { $0 == " " }))
        }
        if let first = text.first, "[{&*!|>%@`".contains(first) { return nil }
        var position = text.startIndex
        while position < text.endIndex {
            if text[position] == ":" {
                let next = text.index(after: position)
                if next == text.endIndex || text[next] == " " {
                    let key = text[..<position]
                    return (String(key.reversed().drop(while: { $0 == " " }).reversed()), text[next...].drop(while: { $0 == " " }))
                }
            }
            position = text.index(after: position)
        }
        return nil
    }

    /// A value written on one line: flow collection, quoted or plain scalar.
    static func inline(_ text: Substring, line: Int) throws(YAMLError) -> YAMLNode {
        var cursor = text.startIndex
        let node = try flowNode(text, at: &cursor, line: line, inFlow: false)
        skipSpaces(text, &cursor)
        guard cursor == text.endIndex else { throw YAMLError(line: line, message: "unexpected text after a value: '\(text[cursor...])'") }
        return node
    }

    static func skipSpaces(_ text: Substring, _ cursor: inout Substring.Index) {
        while cursor < text.endIndex, text[cursor] == " " { cursor = text.index(after: cursor) }
    }

    /// A flow collection from its opening bracket (at `cursor`) to `close`: `item` parses each
    /// element, and elements are separated by commas.
    static func flowCollection(
        _ text: Substring, at cursor: inout Substring.Index, line: Int, close: Character,
        _ item: (inout Substring.Index) throws(YAMLError) -> Void
    ) throws(YAMLError) {
        let open = text[cursor]
        cursor = text.index(after: cursor)
        while true {
            skipSpaces(text, &cursor)
            guard cursor < text.endIndex else { throw YAMLError(line: line, message: "unclosed '\(open)'") }
            if text[cursor] == close {
                cursor = text.index(after: cursor)
                return
            }
            try item(&cursor)
            skipSpaces(text, &cursor)
            guard cursor < text.endIndex else { throw YAMLError(line: line, message: "unclosed '\(open)'") }
            if text[cursor] == "," { cursor = text.index(after: cursor) } else if text[cursor] != close {
                throw YAMLError(line: line, message: "expected ',' or '\(close)'")
            }
        }
    }

    static func flowNode(_ text: Substring, at cursor: inout Substring.Index, line: Int, inFlow: Bool) throws(YAMLError) -> YAMLNode {
        skipSpaces(text, &cursor)
        guard cursor < text.endIndex else { return .empty }
        switch text[cursor] {
        case "[":
            var items: [YAMLNode] = []
            try flowCollection(text, at: &cursor, line: line, close: "]") { (cursor: inout Substring.Index) throws(YAMLError) in
                items.append(try flowNode(text, at: &cursor, line: line, inFlow: true))
            }
            return .sequence(items)
        case "{":
            var entries: [YAMLNode.Entry] = []
            try flowCollection(text, at: &cursor, line: line, close: "}") { (cursor: inout Substring.Index) throws(YAMLError) in
                guard case .scalar(let key) = try flowNode(text, at: &cursor, line: line, inFlow: true) else {
                    throw YAMLError(line: line, message: "a key in '{…}' is not a scalar")
                }
                skipSpaces(text, &cursor)
                guard cursor < text.endIndex, text[cursor] == ":" else { throw YAMLError(line: line, message: "expected ':' after '\(key)'") }
                cursor = text.index(after: cursor)
                let value = try flowNode(text, at: &cursor, line: line, inFlow: true)
                if entries.contains(where: { $0.key == key }) { throw YAMLError(line: line, message: "key '\(key)' appears twice") }
                entries.append(.init(key: key, value: value))
            }
            return .mapping(entries)
        case "\"", "'":
            return .scalar(try quoted(text, at: &cursor, line: line))
        case "&", "*", "!":
            throw YAMLError(line: line, message: "anchors, aliases and tags are not supported")
        case "|", ">":
            throw YAMLError(line: line, message: "block scalars ('|', '>') are not supported; write the value on one line")
        case "@", "`":
            throw YAMLError(line: line, message: "'\(text[cursor])' cannot start a value")
        default:
            let start = cursor
            while cursor < text.endIndex {
                let character = text[cursor]
                if inFlow && (character == "," || character == "]" || character == "}") { break }
                if inFlow && character == ":" {
                    let next = text.index(after: cursor)
                    if next == text.endIndex || text[next] == " " || text[next] == "," || text[next] == "}" { break }
                }
                cursor = text.index(after: cursor)
            }
            let plain = text[start..<cursor].reversed().drop(while: { $0 == " " }).reversed()
            return .scalar(String(plain))
        }
    }

    /// A quoted scalar starting at `cursor` (which it moves past the closing quote).
    static func quoted(_ text: Substring, at cursor: inout Substring.Index, line: Int) throws(YAMLError) -> String {
        let quote = text[cursor]
        cursor = text.index(after: cursor)
        var value = ""
        while cursor < text.endIndex {
            let character = text[cursor]
            cursor = text.index(after: cursor)
            if character == quote {
                // '' inside single quotes is one quote.
                if quote == "'", cursor < text.endIndex, text[cursor] == "'" {
                    value.append("'")
                    cursor = text.index(after: cursor)
                    continue
                }
                return value
            }
            if quote == "\"" && character == "\\" {
                guard cursor < text.endIndex else { break }
                let escape = text[cursor]
                cursor = text.index(after: cursor)
                switch escape {
                case "n": value.append("\n")
                case "t": value.append("\t")
                case "r": value.append("\r")
                case "0": value.append("\0")
                case "\"", "\\", "/", " ": value.append(escape)
                case "u", "x":
                    let length = escape == "u" ? 4 : 2
                    guard let end = text.index(cursor, offsetBy: length, limitedBy: text.endIndex),
                        let code = UInt32(text[cursor..<end], radix: 16), let scalar = Unicode.Scalar(code)
                    else { throw YAMLError(line: line, message: "a bad \\\(escape) escape") }
                    value.unicodeScalars.append(scalar)
                    cursor = end
                default:
                    throw YAMLError(line: line, message: "an unknown escape '\\\(escape)'")
                }
                continue
            }
            value.append(character)
        }
        throw YAMLError(line: line, message: "an unclosed \(quote) quote")
    }
}
