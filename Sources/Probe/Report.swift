#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import Syscall

/// Everything one probe run found, ready for `--json` or the table.
public struct ProbeReport: Codable, Sendable {
    public static let currentSchemaVersion = 1

    public var schemaVersion: Int = ProbeReport.currentSchemaVersion
    public var tool: String
    public var cacheDir: String
    public var image: String?
    public var durationMs: Double
    /// Wall time of each check group, for `make bench`.
    public var groupDurationsMs: [String: Double]
    public var findings: Findings
    public var plans: [Plan]
    /// What this build implements (the planner rejects the rest).
    public var implementedBackends: [Backend]

    /// 0: at least one backend can mount a local image here; 1: none can.
    public var exitCode: Int32 {
        plans.first { $0.source == .local }?.chosen != nil ? 0 : 1
    }

    public func json() throws -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try enc.encode(self), as: UTF8.self)
    }

    /// A grouped, aligned table; `color` adds ANSI colours for a terminal.
    public func table(color: Bool) -> String {
        func paint(_ s: String, _ code: String) -> String { color ? "\u{1B}[\(code)m\(s)\u{1B}[0m" : s }
        func mark(_ s: Finding.Status) -> String {
            switch s {
            case .present: return paint("yes    ", "32")
            case .absent: return paint("no     ", "31")
            case .unknown: return paint("unknown", "33")
            }
        }
        var lines: [String] = []
        var group = ""
        let width = findings.all.map(\.title.count).max() ?? 20
        for f in findings.all {
            if f.group != group {
                group = f.group
                lines.append("")
                lines.append(paint(group, "1"))
            }
            let title = f.title.padded(to: width)
            var line = "  \(title)  \(mark(f.status))"
            if let v = f.value, !v.isEmpty { line += "  \(v)" }
            lines.append(line)
            for e in f.evidence {
                lines.append(paint("      \(e.source): \(e.result)", "2"))
            }
        }
        for plan in plans {
            lines.append("")
            let chosen = plan.chosen.map { "\($0.rawValue)" } ?? "none"
            lines.append(paint("backend for a \(plan.source.rawValue) image: \(chosen)", "1"))
            for c in plan.candidates {
                let v: String
                switch c.verdict {
                case .viable: v = paint("viable    ", "32")
                case .unverified: v = paint("unverified", "33")
                case .rejected: v = paint("rejected  ", "31")
                }
                lines.append("  \(c.backend.rawValue.padded(to: 9)) \(v)  \(c.reasons.joined(separator: "; "))")
            }
        }
        lines.append("")
        lines.append("probe took \(formatDecimal(durationMs)) ms")
        while lines.first == "" { lines.removeFirst() }
        return lines.joined(separator: "\n") + "\n"
    }
}

/// Runs every check against the host.
public enum HostProbe {
    static func ms(since t: DispatchTime) -> Double { Double(DispatchTime.now().uptimeNanoseconds - t.uptimeNanoseconds) / 1e6 }

    public static func run(_ options: ProbeOptions, implemented: Set<Backend>, tool: String = "erofs-compat") -> ProbeReport {
        let start = DispatchTime.now()
        let ctx = ProbeContext(options: options)
        var findings = Findings()
        var times: [String: Double] = ["context": ms(since: start)]
        let groups: [(String, (ProbeContext) -> [Finding])] = [
            ("kernel", SystemChecks.kernel), ("fanotify", FanotifyChecks.run), ("erofs", EROFSChecks.run),
            ("block", BlockChecks.run), ("fuse", FuseChecks.run), ("fsverity", VerityChecks.run), ("system", SystemChecks.system),
        ]
        for (name, check) in groups {
            let t = DispatchTime.now()
            check(ctx).forEach { findings.add($0) }
            times[name] = ms(since: t)
        }
        if let image = options.image {
            ImageChecks.run(ctx, image: image, kernelFeatures: ImageChecks.kernelFeatures(ctx)).forEach { findings.add($0) }
        }
        let plans = [Planner.plan(findings, source: .local, implemented: implemented),
                     Planner.plan(findings, source: .remote, implemented: implemented)]
        return ProbeReport(tool: tool, cacheDir: options.cacheDir, image: options.image, durationMs: ms(since: start), groupDurationsMs: times,
                           findings: findings, plans: plans, implementedBackends: Backend.allCases.filter(implemented.contains))
    }
}
