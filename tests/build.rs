//! Builds every crate of `guest-examples/` for wasm32-wasip2 (and the plain
//! programs among them for wasm32-wasip1 too, as preview1 modules), in a
//! target directory of its own, and writes their paths as constants (one per
//! example, named after it; `_WASIP1` for the preview1 builds) for the tests
//! to load. The Python, JavaScript and C guests are built by
//! `build_langs.rs`.

#[path = "build_langs.rs"]
mod build_langs;

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const TARGETS: [&str; 2] = ["wasm32-wasip2", "wasm32-wasip1"];

/// Plain programs (`fn main`) that are also built as preview1 modules.
const PREVIEW1_PROGRAMS: [&str; 1] = ["wordcount"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap();
    let guests = root.join("guest-examples");
    for watched in ["guest-examples", "sdk", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    ensure_targets_installed();

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("guest-examples");
    let mut artifacts = cargo_build(&guests, &target_dir, "wasm32-wasip2", &[]);
    for (name, path) in cargo_build(&guests, &target_dir, "wasm32-wasip1", &PREVIEW1_PROGRAMS) {
        artifacts.push((format!("{name}-wasip1"), path));
    }
    let langs =
        build_langs::Langs { root, tools: target_dir.parent().unwrap().join("tools"), out: target_dir.join("langs") };
    artifacts.extend(langs.build_all());
    artifacts.sort();
    assert!(!artifacts.is_empty(), "cargo built no .wasm files in guest-examples");

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
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("guests.rs");
    std::fs::write(out, code).unwrap();
}

/// Builds the `packages` of the guest-examples workspace (all when empty)
/// for `target`; returns each .wasm file with its crate name.
fn cargo_build(guests: &Path, target_dir: &Path, target: &str, packages: &[&str]) -> Vec<(String, String)> {
    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .args(["build", "--release", "--target", target, "--message-format=json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(guests.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for package in packages {
        cargo.args(["-p", package]);
    }
    // Settings meant for the host build must not leak into the wasm build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cargo.env_remove(var);
    }
    let output = cargo.output().expect("running cargo to build guest-examples");
    if !output.status.success() {
        panic!(
            "building guest-examples for {target} failed (see the errors above); try \
             `cd guest-examples && cargo build --release --target {target}`"
        );
    }
    let mut artifacts = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let name = message["target"]["name"].as_str().unwrap_or_default().to_owned();
        for file in message["filenames"].as_array().into_iter().flatten() {
            let file = file.as_str().unwrap_or_default();
            if file.ends_with(".wasm") {
                artifacts.push((name.clone(), file.to_owned()));
            }
        }
    }
    artifacts
}

/// rust-toolchain.toml lists the wasm targets, but rustup adds them only when
/// it installs the toolchain; add them here if an existing toolchain lacks them.
fn ensure_targets_installed() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output().expect("running rustc --print sysroot");
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let missing: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|target| !Path::new(&sysroot).join("lib/rustlib").join(target).exists())
        .collect();
    if missing.is_empty() {
        return;
    }
    let mut rustup = Command::new("rustup");
    rustup.args(["target", "add"]).args(&missing);
    if let Some(toolchain) = env::var_os("RUSTUP_TOOLCHAIN") {
        rustup.arg("--toolchain").arg(toolchain);
    }
    let status = rustup.status();
    if !matches!(status, Ok(status) if status.success()) {
        panic!(
            "the Rust targets {missing:?} are not installed and `rustup target add` failed; install them with \
             `rustup target add {}`",
            missing.join(" ")
        );
    }
}
