/// What a probe found out about one capability of the host.
public struct Finding: Sendable, Equatable, Codable {
    /// present / absent / unknown. Unknown means "could not be decided" (never a guess).
    public enum Status: String, Sendable, Codable {
        case present, absent, unknown
    }

    /// One source consulted and what it said.
    public struct Evidence: Sendable, Equatable, Codable {
        public var source: String
        public var result: String
        public init(_ source: String, _ result: String) {
            self.source = source
            self.result = result
        }
    }

    /// Stable identifier, e.g. `fanotify.pre_access`.
    public var id: String
    public var title: String
    public var status: Status
    /// A short value where the finding has one (a version, a filesystem type, a list).
    public var value: String?
    public var evidence: [Evidence]

    public init(_ id: String, _ title: String, _ status: Status, value: String? = nil, evidence: [Evidence] = []) {
        self.id = id
        self.title = title
        self.status = status
        self.value = value
        self.evidence = evidence
    }

    /// The group shown in the table: the id up to the first dot.
    public var group: String { String(id.prefix(while: { $0 != "." })) }
}

/// An ordered collection of findings with lookup by id.
public struct Findings: Sendable, Equatable, Codable {
    public private(set) var all: [Finding] = []

    public init(_ findings: [Finding] = []) {
        for f in findings { add(f) }
    }

    public mutating func add(_ f: Finding) {
        if let i = all.firstIndex(where: { $0.id == f.id }) { all[i] = f } else { all.append(f) }
    }

    public subscript(_ id: String) -> Finding? { all.first { $0.id == id } }

    /// The status of `id`, `unknown` when the finding is missing.
    public func status(_ id: String) -> Finding.Status { self[id]?.status ?? .unknown }
    public func isPresent(_ id: String) -> Bool { status(id) == .present }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(all)
    }

    public init(from decoder: Decoder) throws {
        self.init(try decoder.singleValueContainer().decode([Finding].self))
    }
}
