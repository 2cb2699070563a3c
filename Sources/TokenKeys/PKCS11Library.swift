import CPKCS11
import Glibc
import SDSModel
import Synchronization

/// A PKCS#11 module loaded with `dlopen` (once per path in the process) and its function list,
/// with every call serialized: a token's sessions are used one call at a time, which SoftHSM and
/// most HSM libraries need and which keeps the wrapper small.
///
/// Only what finding one private key and signing with it needs: initialize and finalize, the
/// slot whose token has a label, a session, login, object lookup, key type, sign.
final class PKCS11Library: @unchecked Sendable {
    let path: String
    private let functions: UnsafeMutablePointer<CK_FUNCTION_LIST>
    /// Every call into the module, one at a time; `generation` counts re-initialisations, so a
    /// key whose session predates the last one opens a new session instead of re-initialising again.
    let lock = Mutex(0)

    private static let loaded = Mutex<[String: PKCS11Library]>([:])

    /// The module at `path`, loaded and initialized once.
    static func load(_ path: String) throws(TokenError) -> PKCS11Library {
        try loaded.withLock { (libraries: inout [String: PKCS11Library]) throws(TokenError) -> PKCS11Library in
            if let library = libraries[path] { return library }
            guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
                let reason = dlerror().map { String(cString: $0) } ?? "unknown error"
                throw TokenError(.configuration, "cannot load the PKCS#11 module \(path): \(reason)")
            }
            guard let symbol = dlsym(handle, "C_GetFunctionList") else {
                throw TokenError(.configuration, "\(path) is not a PKCS#11 module (no C_GetFunctionList)")
            }
            let getFunctionList = unsafeBitCast(symbol, to: CK_C_GetFunctionList.self)
            var list: UnsafeMutablePointer<CK_FUNCTION_LIST>?
            let rv = getFunctionList(&list)
            guard rv == CKR_OK, let list else { throw TokenError(.configuration, "\(path): C_GetFunctionList failed (\(Self.name(rv)))") }
            let library = PKCS11Library(path: path, functions: list)
            try library.initialize()
            libraries[path] = library
            return library
        }
    }

    private init(path: String, functions: UnsafeMutablePointer<CK_FUNCTION_LIST>) {
        self.path = path
        self.functions = functions
    }

    /// `C_Initialize` with the OS's locking (the module may be called from any thread).
    func initialize() throws(TokenError) {
        var arguments = CK_C_INITIALIZE_ARGS()
        arguments.flags = CK_FLAGS(CKF_OS_LOCKING_OK)
        let rv = withUnsafeMutablePointer(to: &arguments) { functions.pointee.C_Initialize($0) }
        guard rv == CKR_OK || rv == CKR_CRYPTOKI_ALREADY_INITIALIZED else {
            throw TokenError(.unavailable, "\(path): C_Initialize failed (\(Self.name(rv)))")
        }
    }

    /// `C_Finalize` then `C_Initialize`: what brings SoftHSM back after its token directory
    /// returns (a new session alone never does). Every session of the module is gone after it.
    func reinitialize() throws(TokenError) {
        _ = functions.pointee.C_Finalize(nil)
        try initialize()
    }

    /// The slot holding the token labelled `label` (or slot `slotID`).
    func slot(token label: String?, slotID: UInt?) throws(TokenError) -> CK_SLOT_ID {
        var count: CK_ULONG = 0
        try check(functions.pointee.C_GetSlotList(CK_BBOOL(CK_TRUE), nil, &count), "C_GetSlotList")
        var slots = [CK_SLOT_ID](repeating: 0, count: Int(count))
        try check(functions.pointee.C_GetSlotList(CK_BBOOL(CK_TRUE), &slots, &count), "C_GetSlotList")
        for slot in slots.prefix(Int(count)) {
            if let slotID, CK_SLOT_ID(slotID) != slot { continue }
            guard let label else { return slot }
            var info = CK_TOKEN_INFO()
            guard functions.pointee.C_GetTokenInfo(slot, &info) == CKR_OK else { continue }
            let padded = withUnsafeBytes(of: info.label) { Array($0) }
            if String(decoding: padded, as: UTF8.self).trimmingTrailingSpaces == label { return slot }
        }
        throw TokenError(.unavailable, "no token \(label.map { "labelled '\($0)'" } ?? "in slot \(slotID ?? 0)") is present")
    }

    /// A read-only session on `slot`, logged in as the user with `pin`.
    func openSession(slot: CK_SLOT_ID, pin: [UInt8]) throws(TokenError) -> CK_SESSION_HANDLE {
        var session: CK_SESSION_HANDLE = 0
        try check(functions.pointee.C_OpenSession(slot, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, &session), "C_OpenSession")
        var pin = pin
        let rv = functions.pointee.C_Login(session, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count))
        guard rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN else {
            _ = functions.pointee.C_CloseSession(session)
            if rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LEN_RANGE || rv == CKR_PIN_LOCKED {
                throw TokenError(.configuration, "the token refused the PIN (\(Self.name(rv)))")
            }
            throw TokenError(.unavailable, "C_Login failed (\(Self.name(rv)))")
        }
        return session
    }

    func closeSession(_ session: CK_SESSION_HANDLE) { _ = functions.pointee.C_CloseSession(session) }

    /// The private key labelled `label` and/or with `id`, and its type (`CKK_EC`, `CKK_RSA`, ...).
    func privateKey(in session: CK_SESSION_HANDLE, label: String?, id: [UInt8]?) throws(TokenError) -> (CK_OBJECT_HANDLE, CK_KEY_TYPE) {
        var keyClass = CK_OBJECT_CLASS(CKO_PRIVATE_KEY)
        var labelBytes = Array((label ?? "").utf8)
        var idBytes = id ?? []
        var handles = [CK_OBJECT_HANDLE](repeating: 0, count: 2)
        var count: CK_ULONG = 0
        // The template's pointers live only inside these closures: the calls are made there,
        // their results checked outside.
        let (initRV, findRV) = withUnsafeMutableBytes(of: &keyClass) { classBytes in
            labelBytes.withUnsafeMutableBytes { labelBuffer in
                idBytes.withUnsafeMutableBytes { idBuffer -> (CK_RV, CK_RV) in
                    var template = [CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_CLASS), pValue: classBytes.baseAddress, ulValueLen: CK_ULONG(classBytes.count))]
                    if label != nil {
                        template.append(CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_LABEL), pValue: labelBuffer.baseAddress, ulValueLen: CK_ULONG(labelBuffer.count)))
                    }
                    if id != nil {
                        template.append(CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_ID), pValue: idBuffer.baseAddress, ulValueLen: CK_ULONG(idBuffer.count)))
                    }
                    let initRV = functions.pointee.C_FindObjectsInit(session, &template, CK_ULONG(template.count))
                    guard initRV == CKR_OK else { return (initRV, CK_RV(CKR_OK)) }
                    defer { _ = functions.pointee.C_FindObjectsFinal(session) }
                    return (initRV, functions.pointee.C_FindObjects(session, &handles, 2, &count))
                }
            }
        }
        try check(initRV, "C_FindObjectsInit")
        try check(findRV, "C_FindObjects")
        guard count <= 1 else { throw TokenError(.configuration, "the URI names more than one private key") }
        guard count == 1 else { throw TokenError(.configuration, "the token holds no private key the URI names") }
        var keyType = CK_KEY_TYPE(0)
        let rv = withUnsafeMutableBytes(of: &keyType) { buffer in
            var attribute = CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_KEY_TYPE), pValue: buffer.baseAddress, ulValueLen: CK_ULONG(buffer.count))
            return functions.pointee.C_GetAttributeValue(session, handles[0], &attribute, 1)
        }
        try check(rv, "C_GetAttributeValue")
        return (handles[0], keyType)
    }

    /// `C_SignInit` + `C_Sign` of `data` with `mechanism` (no parameters).
    func sign(_ data: [UInt8], mechanism: CK_MECHANISM_TYPE, key: CK_OBJECT_HANDLE, session: CK_SESSION_HANDLE) throws(TokenError) -> [UInt8] {
        var chosen = CK_MECHANISM(mechanism: mechanism, pParameter: nil, ulParameterLen: 0)
        try check(functions.pointee.C_SignInit(session, &chosen, key), "C_SignInit")
        var data = data
        var length: CK_ULONG = 0
        try check(functions.pointee.C_Sign(session, &data, CK_ULONG(data.count), nil, &length), "C_Sign")
        var signature = [UInt8](repeating: 0, count: Int(length))
        try check(functions.pointee.C_Sign(session, &data, CK_ULONG(data.count), &signature, &length), "C_Sign")
        return Array(signature.prefix(Int(length)))
    }

    private func check(_ rv: CK_RV, _ call: String) throws(TokenError) {
        guard rv != CKR_OK else { return }
        throw TokenError(.unavailable, "\(call) failed (\(Self.name(rv)))", code: rv)
    }

    /// A return value's name, for the one line a human reads.
    static func name(_ rv: CK_RV) -> String {
        let names: [CK_RV: String] = [
            CK_RV(CKR_GENERAL_ERROR): "CKR_GENERAL_ERROR", CK_RV(CKR_FUNCTION_FAILED): "CKR_FUNCTION_FAILED",
            CK_RV(CKR_ARGUMENTS_BAD): "CKR_ARGUMENTS_BAD", CK_RV(CKR_DEVICE_ERROR): "CKR_DEVICE_ERROR",
            CK_RV(CKR_DEVICE_MEMORY): "CKR_DEVICE_MEMORY", CK_RV(CKR_DEVICE_REMOVED): "CKR_DEVICE_REMOVED",
            CK_RV(CKR_KEY_HANDLE_INVALID): "CKR_KEY_HANDLE_INVALID", CK_RV(CKR_MECHANISM_INVALID): "CKR_MECHANISM_INVALID",
            CK_RV(CKR_OBJECT_HANDLE_INVALID): "CKR_OBJECT_HANDLE_INVALID", CK_RV(CKR_PIN_INCORRECT): "CKR_PIN_INCORRECT",
            CK_RV(CKR_PIN_LOCKED): "CKR_PIN_LOCKED", CK_RV(CKR_SESSION_CLOSED): "CKR_SESSION_CLOSED",
            CK_RV(CKR_SESSION_HANDLE_INVALID): "CKR_SESSION_HANDLE_INVALID", CK_RV(CKR_TOKEN_NOT_PRESENT): "CKR_TOKEN_NOT_PRESENT",
            CK_RV(CKR_TOKEN_NOT_RECOGNIZED): "CKR_TOKEN_NOT_RECOGNIZED", CK_RV(CKR_USER_NOT_LOGGED_IN): "CKR_USER_NOT_LOGGED_IN",
            CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED): "CKR_CRYPTOKI_NOT_INITIALIZED", CK_RV(CKR_SLOT_ID_INVALID): "CKR_SLOT_ID_INVALID",
        ]
        return names[rv] ?? "CKR 0x" + String(rv, radix: 16)
    }
}

extension String {
    fileprivate var trimmingTrailingSpaces: String {
        var text = self
        while text.last == " " || text.last == "\0" { text.removeLast() }
        return text
    }
}

/// Why a token could not be used: its configuration (a wrong PIN, no such key, a module that
/// does not load: refused at start), or it is unavailable now (removed, its session closed:
/// issuance answers `unavailable` and recovers by itself). Never holds the PIN.
public struct TokenError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable { case configuration, unavailable }
    public var kind: Kind
    public var message: String
    /// The module's return value, when one caused it.
    public var code: UInt?

    init(_ kind: Kind, _ message: String, code: CK_RV? = nil) {
        self.kind = kind
        self.message = message
        self.code = code.map { UInt($0) }
    }

    public var description: String { message }
}
