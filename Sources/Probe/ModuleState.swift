import Syscall

/// How a kernel feature that can be a module is present: decided by cross-checking libkmod with
/// /sys/module, /proc/filesystems and the kernel config, because libkmod alone reports built-in
/// modules as "coming" on hosts without /lib/modules.
public enum ModuleState: String, Sendable, Codable {
    case builtIn = "built-in"
    case loaded
    case loadable
    case absent
    case unknown

    /// Everything the decision looks at, gathered by `ModuleState.gather`.
    package struct Inputs: Sendable, Equatable {
        package var name: String
        package var sysModuleDir: Bool
        package var sysModuleInitState: String?
        package var modulesDirPresent: Bool
        package var listedBuiltin: Bool
        package var kmod: Libraries.KmodAnswer?
        package var config: String?
        /// Registered in /proc/filesystems (nil when the module is not a filesystem).
        package var registeredFilesystem: Bool?

        package init(name: String, sysModuleDir: Bool, sysModuleInitState: String?, modulesDirPresent: Bool,
                    listedBuiltin: Bool, kmod: Libraries.KmodAnswer?, config: String?, registeredFilesystem: Bool?) {
            self.name = name
            self.sysModuleDir = sysModuleDir
            self.sysModuleInitState = sysModuleInitState
            self.modulesDirPresent = modulesDirPresent
            self.listedBuiltin = listedBuiltin
            self.kmod = kmod
            self.config = config
            self.registeredFilesystem = registeredFilesystem
        }
    }

    /// Reads the inputs for module `name` from `host` (libkmod only on the live host).
    package static func gather(_ name: String, host: Host, release: String, config: KernelConfig?,
                              configKey: String, filesystem: String?) -> Inputs {
        let sysDir = host.isDirectory("/sys/module/\(name)")
        let initState = host.read("/sys/module/\(name)/initstate")?.trimmed
        let modDir = "/lib/modules/\(release)"
        let builtinList = host.read(modDir + "/modules.builtin") ?? ""
        let listed = builtinList.split(separator: "\n").contains { $0.hasSuffix("/\(name).ko") }
        var fsRegistered: Bool?
        if let filesystem, let text = host.read("/proc/filesystems") {
            fsRegistered = ProcFilesystems.parse(text).contains(filesystem)
        }
        return Inputs(name: name, sysModuleDir: sysDir, sysModuleInitState: initState,
                      modulesDirPresent: host.isDirectory(modDir), listedBuiltin: listed,
                      kmod: host.isLive ? Libraries.kmod(module: name) : nil,
                      config: config.map { $0.value(configKey) }, registeredFilesystem: fsRegistered)
    }

    /// The cross-checked verdict with the evidence behind it.
    package static func decide(_ i: Inputs) -> (ModuleState, [Finding.Evidence]) {
        var ev: [Finding.Evidence] = []
        if let k = i.kmod {
            let st = k.initState ?? "error \(k.initStateError ?? 0)"
            ev.append(.init("libkmod", "kmod_load_resources=\(k.loadResources), initstate=\(st)" + (k.path.map { ", path=\($0)" } ?? "")))
        }
        ev.append(.init("/sys/module/\(i.name)", i.sysModuleDir ? "present" + (i.sysModuleInitState.map { ", initstate=\($0)" } ?? " without initstate (built in)") : "absent"))
        if let c = i.config { ev.append(.init("kernel config", "\(i.name): \(c)")) }
        if let r = i.registeredFilesystem { ev.append(.init("/proc/filesystems", r ? "registered" : "not registered")) }
        if !i.modulesDirPresent { ev.append(.init("/lib/modules", "absent: no loadable modules; libkmod cannot tell built-ins apart")) }

        if i.sysModuleDir {
            if i.sysModuleInitState != nil { return (.loaded, ev) }
            return (.builtIn, ev)
        }
        if i.listedBuiltin || i.kmod?.initState == "builtin" || i.config == "y" {
            // Built in but without parameters it has no /sys/module entry.
            if i.registeredFilesystem != false { return (.builtIn, ev) }
        }
        if i.kmod?.path != nil || i.config == "m" {
            if i.modulesDirPresent || i.kmod?.path != nil { return (.loadable, ev) }
        }
        if i.registeredFilesystem == true { return (.builtIn, ev) }
        if i.config == "n" || (i.config == nil && !i.modulesDirPresent) || i.kmod != nil || i.registeredFilesystem == false {
            return (.absent, ev)
        }
        return (.unknown, ev)
    }

    /// A finding for the module.
    package static func finding(id: String, title: String, _ inputs: Inputs) -> Finding {
        let (state, ev) = decide(inputs)
        let status: Finding.Status = switch state {
        case .builtIn, .loaded, .loadable: .present
        case .absent: .absent
        case .unknown: .unknown
        }
        return Finding(id, title, status, value: state.rawValue, evidence: ev)
    }
}
