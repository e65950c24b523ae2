import Testing
@testable import Probe
import Syscall

@Suite struct ModuleStateTests {
    func kmod(_ state: String?, path: String? = nil, load: Int32 = 0) -> Libraries.KmodAnswer {
        Libraries.KmodAnswer(loadResources: load, initState: state, initStateError: state == nil ? -2 : nil, path: path, libraryVersion: "30")
    }

    /// This host: no /lib/modules, libkmod says "coming" for a built-in driver with parameters.
    @Test func builtInWithoutModulesDirectory() {
        let i = ModuleState.Inputs(name: "erofs", sysModuleDir: true, sysModuleInitState: nil, modulesDirPresent: false,
                                   listedBuiltin: false, kmod: kmod("coming", load: -2), config: "y", registeredFilesystem: true)
        #expect(ModuleState.decide(i).0 == .builtIn)
    }

    @Test func loadedModule() {
        let i = ModuleState.Inputs(name: "fuse", sysModuleDir: true, sysModuleInitState: "live", modulesDirPresent: true,
                                   listedBuiltin: false, kmod: kmod("live", path: "/lib/modules/x/fuse.ko"), config: "m", registeredFilesystem: true)
        #expect(ModuleState.decide(i).0 == .loaded)
    }

    @Test func loadableNotLoaded() {
        let i = ModuleState.Inputs(name: "nbd", sysModuleDir: false, sysModuleInitState: nil, modulesDirPresent: true,
                                   listedBuiltin: false, kmod: kmod(nil, path: "/lib/modules/x/nbd.ko"), config: "m", registeredFilesystem: nil)
        #expect(ModuleState.decide(i).0 == .loadable)
    }

    @Test func builtInWithoutSysfsEntry() {
        let i = ModuleState.Inputs(name: "erofs", sysModuleDir: false, sysModuleInitState: nil, modulesDirPresent: true,
                                   listedBuiltin: true, kmod: kmod("builtin"), config: nil, registeredFilesystem: true)
        #expect(ModuleState.decide(i).0 == .builtIn)
    }

    @Test func absentEverywhere() {
        let i = ModuleState.Inputs(name: "nbd", sysModuleDir: false, sysModuleInitState: nil, modulesDirPresent: false,
                                   listedBuiltin: false, kmod: kmod(nil, load: -2), config: "n", registeredFilesystem: nil)
        #expect(ModuleState.decide(i).0 == .absent)
    }

    @Test func undecidableWithoutAnySource() {
        let i = ModuleState.Inputs(name: "nbd", sysModuleDir: false, sysModuleInitState: nil, modulesDirPresent: true,
                                   listedBuiltin: false, kmod: nil, config: nil, registeredFilesystem: nil)
        #expect(ModuleState.decide(i).0 == .unknown)
    }
}
