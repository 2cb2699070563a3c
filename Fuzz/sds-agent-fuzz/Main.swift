import Foundation
import TestSupport

// Built two ways (scripts/fuzz.sh):
// - with `-sanitize=fuzzer -DFUZZING`: libFuzzer's driver runs the target `SDS_FUZZ_TARGET` names;
// - plainly (every `swift build`): `sds-agent-fuzz replay DIR…` runs every file of the seed
//   corpus through its target (DIR's name), and `sds-agent-fuzz seeds DIR` writes the seeds
//   that need a key (a signed token).

#if FUZZING
// SwiftPM links an executable's entry point under its own name, so libFuzzer's `main` is never
// used: ours hands the command line to libFuzzer's driver instead.
@main
struct Fuzzer {
    static func main() {
        let name = ProcessInfo.processInfo.environment["SDS_FUZZ_TARGET"] ?? ""
        guard let target = FuzzTarget(rawValue: name) else {
            FileHandle.standardError.write(Data("set SDS_FUZZ_TARGET to one of \(FuzzTarget.allCases.map(\.rawValue))\n".utf8))
            exit(2)
        }
        selected = target
        var argc = CommandLine.argc
        var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv, testOneInput))
    }
}

nonisolated(unsafe) private var selected: FuzzTarget = .config

private func testOneInput(_ start: UnsafePointer<UInt8>?, _ count: Int) -> Int32 {
    let data = start.map { Data(bytes: $0, count: count) } ?? Data()
    selected.run(data)
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32
) -> Int32
#else
@main
struct FuzzReplay {
    static func main() throws {
        let arguments = Array(CommandLine.arguments.dropFirst())
        switch arguments.first {
        case "replay":
            var total = 0
            for directory in arguments.dropFirst() {
                let name = URL(fileURLWithPath: directory).lastPathComponent
                guard let target = FuzzTarget(rawValue: name) else {
                    throw FuzzError("\(directory): its name must be a target: \(FuzzTarget.allCases.map(\.rawValue))")
                }
                let files = try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
                for file in files {
                    target.run(try Data(contentsOf: URL(fileURLWithPath: directory + "/" + file)))
                }
                print("\(name): \(files.count) inputs replayed, no trap")
                total += files.count
            }
            guard total > 0 else { throw FuzzError("no inputs replayed") }
        case "seeds":
            guard arguments.count == 2 else { throw FuzzError("usage: sds-agent-fuzz seeds DIR") }
            let directory = arguments[1] + "/token"
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            let claims = TokenFactory.claims(namespace: "demo", serviceAccount: "fuzz", now: FuzzTarget.now, ttl: 3600)
            try Data(FuzzTarget.tokens.sign(claims: claims).utf8).write(to: URL(fileURLWithPath: directory + "/signed-valid"))
        default:
            throw FuzzError("usage: sds-agent-fuzz replay CORPUS/TARGET… | seeds CORPUS")
        }
    }
}

struct FuzzError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
#endif
