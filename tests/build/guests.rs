//! Building the Rust crates of `guest-examples/` for wasm, shared by the
//! build scripts of the tests (every guest) and of `cargo demo` (only the
//! guests the demo runs). Included with `#[path]`, so a build script that
//! needs it compiles nothing extra.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository root, from the manifest directory of a crate `depth`
/// levels below it.
pub fn repository_root(depth: usize) -> PathBuf {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    manifest_dir.ancestors().nth(depth).expect("the crate lies inside the repository").to_owned()
}

/// Where the guests are built: `target/guest-examples` of the repository,
/// which is where the example workflows look for them, wherever
/// `CARGO_TARGET_DIR` puts the host build.
pub fn target_dir(root: &Path) -> PathBuf {
    root.join("target/guest-examples")
}

/// Rebuilds when the guests, the SDK or the contract change.
pub fn watch(root: &Path) {
    for watched in ["guest-examples", "sdk", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
}

/// Builds the `packages` of the guest-examples workspace (all when empty)
/// for `target`; returns each .wasm file with its crate name.
pub fn cargo_build(root: &Path, target: &str, packages: &[&str]) -> Vec<(String, String)> {
    ensure_target_installed(target);
    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .args(["build", "--release", "--target", target, "--message-format=json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(root.join("guest-examples/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir(root))
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
    assert!(!artifacts.is_empty(), "cargo built no .wasm files in guest-examples for {target}");
    artifacts
}

/// rust-toolchain.toml lists the wasm targets, but rustup adds them only when
/// it installs the toolchain; add `target` here if an existing toolchain
/// lacks it.
fn ensure_target_installed(target: &str) {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output().expect("running rustc --print sysroot");
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(target).exists() {
        return;
    }
    let mut rustup = Command::new("rustup");
    rustup.args(["target", "add", target]);
    if let Some(toolchain) = env::var_os("RUSTUP_TOOLCHAIN") {
        rustup.arg("--toolchain").arg(toolchain);
    }
    let status = rustup.status();
    if !matches!(status, Ok(status) if status.success()) {
        panic!(
            "the Rust target {target} is not installed and `rustup target add` failed; install it with \
             `rustup target add {target}`"
        );
    }
}
