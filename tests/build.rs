//! Builds every crate of `guest-examples/` for wasm32-wasip2 (and the plain
//! programs among them for wasm32-wasip1 too, as preview1 modules), and the
//! Python, JavaScript and C guests, then writes their paths as constants
//! (one per example, named after it; `_WASIP1` for the preview1 builds) for
//! the tests to load. It also fetches schemathesis, which the service's tests
//! run against the API.

#[path = "build/guests.rs"]
mod guests;
#[path = "build/langs.rs"]
mod langs;

use std::env;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Plain programs (`fn main`) that are also built as preview1 modules.
const PREVIEW1_PROGRAMS: [&str; 2] = ["wordcount", "scratch-fill"];

/// schemathesis, from PyPI: the service's tests run it against the API's
/// OpenAPI document.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// playwright-core, from npm: the console's tests drive Debian's chromium
/// with it (its own browser downloads are not needed).
const PLAYWRIGHT: &str = "playwright-core@1.64.1";

fn main() {
    let root = guests::repository_root(1);
    guests::watch(&root);
    let target_dir = guests::target_dir(&root);
    let langs =
        langs::Langs { root: &root, tools: target_dir.parent().unwrap().join("tools"), out: target_dir.join("langs") };
    // The other languages' tools download and build beside the Rust guests.
    let (mut schemathesis, mut playwright) = (PathBuf::new(), PathBuf::new());
    let mut artifacts = std::thread::scope(|scope| {
        let others = scope.spawn(|| langs.build_all());
        let tools =
            scope.spawn(|| (langs.pip_tool("schemathesis", SCHEMATHESIS), langs.npm_tool("playwright", &[PLAYWRIGHT])));
        let mut artifacts = guests::cargo_build(&root, "wasm32-wasip2", &[]);
        for (name, path) in guests::cargo_build(&root, "wasm32-wasip1", &PREVIEW1_PROGRAMS) {
            artifacts.push((format!("{name}-wasip1"), path));
        }
        match others.join() {
            Ok(others) => artifacts.extend(others),
            Err(panic) => std::panic::resume_unwind(panic),
        }
        match tools.join() {
            Ok((site, modules)) => (schemathesis, playwright) = (site, modules.join("playwright-core")),
            Err(panic) => std::panic::resume_unwind(panic),
        }
        artifacts
    });
    artifacts.sort();

    let mut code = String::new();
    for (name, path) in &artifacts {
        let constant = name.to_uppercase().replace('-', "_");
        writeln!(code, "/// Built from `guest-examples/`.").unwrap();
        writeln!(code, "pub const {constant}: &str = {path:?};").unwrap();
    }
    writeln!(code, "/// Every example, by crate name.").unwrap();
    writeln!(code, "pub const ALL: &[(&str, &str)] = &[").unwrap();
    for (name, path) in &artifacts {
        writeln!(code, "    ({name:?}, {path:?}),").unwrap();
    }
    writeln!(code, "];").unwrap();
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    std::fs::write(out.join("guests.rs"), code).unwrap();
    let tools = format!(
        "/// Where schemathesis is installed: its `bin/st`, with this directory as `PYTHONPATH`.\npub const SCHEMATHESIS: &str = {:?};\n\
         /// The playwright-core package, for `require`.\npub const PLAYWRIGHT: &str = {:?};\n",
        schemathesis.display().to_string(),
        playwright.display().to_string()
    );
    std::fs::write(out.join("tools.rs"), tools).unwrap();
}
