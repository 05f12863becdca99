//! `stepbox new`: a step project in Rust, Python, JavaScript or C that
//! builds with the commands it prints. Every project carries the WIT
//! contract (`wit/`) it is built against.

use std::path::{Path, PathBuf};

use super::CliError;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  stepbox new greeter\n  stepbox new greeter --lang python\n  stepbox new \
                        ./steps/greeter --lang c")]
pub(crate) struct Args {
    /// The directory to create; its last part names the step.
    path: PathBuf,
    /// The language of the step.
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    lang: Lang,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Lang {
    Rust,
    Python,
    Js,
    C,
}

/// A file of a template: its path in the project and its text, in which
/// `__NAME__` stands for the step's name.
type File = (&'static str, &'static str);

/// The contract every project is built against, as in this repository's
/// `wit/`.
const WIT: &[File] = &[
    ("wit/step.wit", include_str!("../../../wit/step.wit")),
    ("wit/deps/cli/cli.wit", include_str!("../../../wit/deps/cli/cli.wit")),
    ("wit/deps/clocks/clocks.wit", include_str!("../../../wit/deps/clocks/clocks.wit")),
    ("wit/deps/config/store.wit", include_str!("../../../wit/deps/config/store.wit")),
    ("wit/deps/config/world.wit", include_str!("../../../wit/deps/config/world.wit")),
    ("wit/deps/filesystem/filesystem.wit", include_str!("../../../wit/deps/filesystem/filesystem.wit")),
    ("wit/deps/http/http.wit", include_str!("../../../wit/deps/http/http.wit")),
    ("wit/deps/io/io.wit", include_str!("../../../wit/deps/io/io.wit")),
    ("wit/deps/keyvalue/atomics.wit", include_str!("../../../wit/deps/keyvalue/atomics.wit")),
    ("wit/deps/keyvalue/store.wit", include_str!("../../../wit/deps/keyvalue/store.wit")),
    ("wit/deps/keyvalue/world.wit", include_str!("../../../wit/deps/keyvalue/world.wit")),
    ("wit/deps/logging/logging.wit", include_str!("../../../wit/deps/logging/logging.wit")),
    ("wit/deps/random/random.wit", include_str!("../../../wit/deps/random/random.wit")),
    ("wit/deps/sockets/sockets.wit", include_str!("../../../wit/deps/sockets/sockets.wit")),
];

const RUST: &[File] = &[
    ("Cargo.toml", include_str!("../../templates/rust/Cargo.toml")),
    (".cargo/config.toml", include_str!("../../templates/rust/.cargo/config.toml")),
    ("src/lib.rs", include_str!("../../templates/rust/src/lib.rs")),
];

const PYTHON: &[File] = &[("app.py", include_str!("../../templates/python/app.py"))];

const JS: &[File] = &[("app.js", include_str!("../../templates/js/app.js"))];

/// The JSON reader is the one the C example step uses.
const C: &[File] = &[
    ("build.sh", include_str!("../../templates/c/build.sh")),
    ("__NAME__.c", include_str!("../../templates/c/step.c")),
    ("json.c", include_str!("../../../guest-examples/c/transform/json.c")),
    ("json.h", include_str!("../../../guest-examples/c/transform/json.h")),
];

/// The tool versions the printed commands fetch, as the tests use them.
mod versions {
    include!("../../templates/versions.rs");
}
use versions::{COMPONENTIZE_JS, COMPONENTIZE_PY, PREVIEW2_SHIM, WASM_TOOLS, WIT_BINDGEN, ZIG};

impl Lang {
    fn files(self) -> &'static [File] {
        match self {
            Lang::Rust => RUST,
            Lang::Python => PYTHON,
            Lang::Js => JS,
            Lang::C => C,
        }
    }

    /// The commands that build the step, run from the project directory
    /// (tools the step needs go into `.tools/`), and the component they
    /// produce.
    fn build(self, name: &str) -> (Vec<String>, String) {
        match self {
            Lang::Rust => (
                vec!["cargo build --release".into()],
                format!("target/wasm32-wasip2/release/{}.wasm", name.replace('-', "_")),
            ),
            Lang::Python => (
                vec![
                    format!("python3 -m pip install --quiet --target .tools {COMPONENTIZE_PY}"),
                    format!(
                        "PYTHONPATH=.tools .tools/bin/componentize-py -d wit -w step componentize app -o {name}.wasm"
                    ),
                ],
                format!("{name}.wasm"),
            ),
            Lang::Js => (
                vec![
                    format!("npm install --no-audit --no-fund --prefix .tools {COMPONENTIZE_JS} {PREVIEW2_SHIM}"),
                    format!(".tools/node_modules/.bin/componentize-js app.js -w wit -n step -o {name}.wasm"),
                ],
                format!("{name}.wasm"),
            ),
            Lang::C => (vec!["sh build.sh".into()], format!("{name}.wasm")),
        }
    }
}

pub(crate) fn new(args: Args) -> Result<u8, CliError> {
    let Some(name) = args.path.file_name().and_then(|name| name.to_str()).map(str::to_owned) else {
        return Err(CliError::Usage(format!("`{}` does not end in a name for the step", args.path.display())));
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(CliError::Usage(format!("`{name}` cannot name a step; use letters, digits, `-` and `_`")));
    }
    if args.path.exists() {
        return Err(CliError::Usage(format!("{} already exists; pick a new directory", args.path.display())));
    }
    if let Err(err) = write_project(&args.path, &name, args.lang) {
        let _ = std::fs::remove_dir_all(&args.path);
        return Err(CliError::Failed(format!("cannot create {}: {err}", args.path.display())));
    }
    let (commands, component) = args.lang.build(&name);
    println!("Created {} ({:?} step `{name}`). Build and run it with:\n", args.path.display(), args.lang);
    println!("  cd {}", args.path.display());
    for command in commands {
        println!("  {command}");
    }
    println!("  stepbox step run {component} --input '{{\"name\": \"Ada\"}}'");
    if args.lang == Lang::C {
        println!("\n`build.sh` needs python3 with pip, wit-bindgen and wasm-tools; it says how to install them.");
    }
    Ok(0)
}

fn write_project(dir: &Path, name: &str, lang: Lang) -> std::io::Result<()> {
    for (path, text) in WIT.iter().chain(lang.files()) {
        let path = dir.join(path.replace("__NAME__", name));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(
            path,
            text.replace("__NAME__", name)
                .replace("__SDK__", &sdk_dependency())
                .replace("__ZIG__", ZIG)
                .replace("__WIT_BINDGEN__", WIT_BINDGEN)
                .replace("__WASM_TOOLS__", WASM_TOOLS),
        )?;
    }
    if lang == Lang::C {
        std::fs::write(
            dir.join("wasi_snapshot_preview1.reactor.wasm"),
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?;
    }
    Ok(())
}

/// How a Rust project depends on the SDK: this checkout's `sdk/` when
/// stepbox runs from one, else the repository.
fn sdk_dependency() -> String {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    match local.canonicalize() {
        Ok(path) => format!("{{ path = {:?} }}", path.display().to_string()),
        Err(_) => "{ git = \"https://github.com/stepbox/stepbox\" }".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of `wit/` is embedded, so new projects build against the
    /// whole contract; earlier contracts (`wit/v0.1.0`) are not carried.
    #[test]
    fn the_embedded_wit_is_the_whole_wit_directory() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let earlier = root.join("wit/v0.1.0");
        assert!(earlier.join("step.wit").is_file(), "the earlier contract is kept");
        let mut on_disk = Vec::new();
        let mut dirs = vec![root.join("wit")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path == earlier {
                    continue;
                }
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    on_disk.push(path.strip_prefix(&root).unwrap().display().to_string());
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = WIT.iter().map(|(path, _)| path.to_string()).collect();
        embedded.sort();
        assert_eq!(embedded, on_disk);
    }
}
