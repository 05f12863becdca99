//! The tests' build script's half for guests in other languages: Python
//! (componentize-py), JavaScript (componentize-js) and C (zig's clang with
//! its bundled wasi-libc; the bindings and the component come from the
//! libraries behind `wit-bindgen c` and `wasm-tools component new`, which
//! the SDK's macro compiles anyway, so no tool is built twice). Each
//! implements the same step as `guest-examples/transform`.
//!
//! Every tool comes from a registry (PyPI, npm) and is fetched into
//! `target/tools` the first time, so the tests need Python 3 with pip and
//! Node.js with npm beside rustup, and no system packages. A missing pip or
//! npm stops the build with what to install. Nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../../runtime/templates/versions.rs"]
#[allow(dead_code)] // WIT_BINDGEN and WASM_TOOLS are for the C template's test
mod versions;
use versions::{COMPONENTIZE_JS, COMPONENTIZE_PY, PREVIEW2_SHIM, ZIG};

pub struct Langs<'a> {
    /// The repository.
    pub root: &'a Path,
    /// Where fetched tools live (`target/tools`).
    pub tools: PathBuf,
    /// Where the components go.
    pub out: PathBuf,
}

impl Langs<'_> {
    /// Builds every guest, the languages side by side (their tools download
    /// while others compile); returns each component with its name.
    pub fn build_all(&self) -> Vec<(String, String)> {
        std::fs::create_dir_all(&self.out).expect("creating the output directory");
        type Build<'a> = fn(&Langs<'a>) -> PathBuf;
        let builds: [(&str, Build<'_>); 3] =
            [("transform-py", Self::python), ("transform-js", Self::javascript), ("transform-c", Self::c)];
        std::thread::scope(|scope| {
            let running: Vec<_> =
                builds.into_iter().map(|(name, build)| (name, scope.spawn(move || build(self)))).collect();
            running
                .into_iter()
                .map(|(name, build)| match build.join() {
                    Ok(path) => (name.to_owned(), path.display().to_string()),
                    Err(panic) => std::panic::resume_unwind(panic),
                })
                .collect()
        })
    }

    fn python(&self) -> PathBuf {
        let site = self.pip_tool("python", COMPONENTIZE_PY);
        let tool = site.join("bin/componentize-py");
        let out = self.out.join("transform-py.wasm");
        let mut build = Command::new(tool);
        build
            .env("PYTHONPATH", &site)
            .arg("-d")
            .arg(self.root.join("wit"))
            .args(["-w", "step", "componentize", "-p"])
            .arg(self.root.join("guest-examples/python/transform"))
            .arg("app")
            .arg("-o")
            .arg(&out);
        run(build, "building guest-examples/python/transform");
        out
    }

    fn javascript(&self) -> PathBuf {
        let tool = self.npm_tool("js", &[COMPONENTIZE_JS, PREVIEW2_SHIM]).join(".bin/componentize-js");
        let out = self.out.join("transform-js.wasm");
        // componentize-js reads the WIT relative to the current directory.
        // This step is built against the earlier contract, 0.1.0, which
        // stepbox still runs unchanged (the languages test checks both).
        let mut build = Command::new(tool);
        build
            .current_dir(self.root)
            .args(["guest-examples/js/transform/transform.js", "-w", "wit/v0.1.0", "-n", "step", "-o"])
            .arg(&out);
        run(build, "building guest-examples/js/transform");
        out
    }

    fn c(&self) -> PathBuf {
        let bindings = self.out.join("c-bindings");
        c_bindings(&self.root.join("wit"), &bindings);

        let source = self.root.join("guest-examples/c/transform");
        let core = self.out.join("transform-c.core.wasm");
        let zig = self.pip_tool("zig", ZIG);
        let mut compile = Command::new("python3");
        compile
            .env("PYTHONPATH", &zig)
            // zig caches the wasi-libc it builds; keep that under target/.
            .env("ZIG_GLOBAL_CACHE_DIR", zig.join("cache"))
            .env("ZIG_LOCAL_CACHE_DIR", zig.join("cache"))
            .args(["-m", "ziglang", "cc", "--target=wasm32-wasi", "-mexec-model=reactor", "-O2", "-s"])
            .args(["-Wall", "-Werror", "-I"])
            .arg(&bindings)
            .arg(source.join("transform.c"))
            .arg(source.join("json.c"))
            .arg(bindings.join("step.c"))
            .arg(bindings.join("step_component_type.o"))
            .arg("-o")
            .arg(&core);
        run(compile, "compiling guest-examples/c/transform (zig cc)");

        // What `wasm-tools component new --adapt` does.
        let module = std::fs::read(&core).expect("reading the C module");
        let component = wit_component::ComponentEncoder::default()
            .validate(true)
            .module(&module)
            .and_then(|encoder| {
                encoder.adapter(
                    "wasi_snapshot_preview1",
                    wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
                )
            })
            .and_then(|mut encoder| encoder.encode())
            .unwrap_or_else(|err| panic!("wrapping the C module as a component failed: {err:#}"));
        let out = self.out.join("transform-c.wasm");
        std::fs::write(&out, component).expect("writing the C component");
        out
    }

    /// Packages from npm, installed into `target/tools/<dir>` once; returns
    /// their `node_modules` directory.
    pub fn npm_tool(&self, dir: &str, packages: &[&str]) -> PathBuf {
        let prefix = self.tools.join(dir);
        // The versions are part of the marker, so changing one installs anew.
        let marker = prefix.join(format!(".installed-{}", packages.join("+").replace('/', "_")));
        if !marker.exists() {
            let _ = std::fs::remove_dir_all(&prefix);
            let mut npm = Command::new("npm");
            npm.args(["install", "--no-audit", "--no-fund", "--prefix"]).arg(&prefix).args(packages);
            fetch(npm, "Node.js 20 or newer with npm (Debian: apt-get install nodejs npm)");
            std::fs::write(&marker, "").expect("writing the install marker");
        }
        prefix.join("node_modules")
    }

    /// A Python package from PyPI, installed into `target/tools/<dir>` once;
    /// returns that directory, for `PYTHONPATH`.
    pub fn pip_tool(&self, dir: &str, package: &str) -> PathBuf {
        let site = self.tools.join(dir);
        // The version is part of the marker, so changing it installs anew.
        let marker = site.join(format!(".installed-{package}"));
        if !marker.exists() {
            let _ = std::fs::remove_dir_all(&site);
            let mut pip = Command::new("python3");
            pip.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
                .arg(&site)
                .arg(package);
            fetch(pip, "Python 3 with pip (Debian: apt-get install python3-pip)");
            std::fs::write(&marker, "").expect("writing the install marker");
        }
        site
    }
}

/// Runs an install command; `needs` names what it needs when it cannot run.
fn fetch(mut command: Command, needs: &str) {
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(_) => panic!("`{command:?}` failed (see above); it fetches a tool the tests need to build guests"),
        Err(err) => panic!("cannot run `{command:?}` ({err}); the tests need {needs} to build their guests"),
    }
}

fn run(mut command: Command, what: &str) {
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(_) => panic!("{what} failed (see the errors above)"),
        Err(err) => panic!("{what}: cannot run `{command:?}`: {err}"),
    }
}

/// What `wit-bindgen c wit --world step --features clocks-timezone
/// --out-dir OUT` does: C bindings of the step world into `out`.
fn c_bindings(wit: &Path, out: &Path) {
    let mut resolve = wit_bindgen_core::wit_parser::Resolve::default();
    // wit/deps/cli imports a clock interface behind this feature gate.
    resolve.features.insert("clocks-timezone".to_owned());
    let mut files = wit_bindgen_core::Files::default();
    let generated = resolve
        .push_path(wit)
        .and_then(|(package, _)| resolve.select_world(&[package], Some("step")))
        .and_then(|world| wit_bindgen_c::Opts::default().build().generate(&resolve, world, &mut files));
    if let Err(err) = generated {
        panic!("generating the C bindings of {} failed: {err:#}", wit.display());
    }
    std::fs::create_dir_all(out).expect("creating the C bindings directory");
    for (name, contents) in files.iter() {
        std::fs::write(out.join(name), contents).expect("writing the C bindings");
    }
}
