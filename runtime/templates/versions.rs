// The versions of the guest toolchains that `stepbox new` prints and the
// tests' build script fetches, kept in one place so both build the same.
// Included by `src/cli/new.rs` and by `tests/build/langs.rs`.

/// componentize-py, from PyPI.
pub const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
/// ComponentizeJS, from npm.
pub const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";
/// componentize-js loads this at run time but lists it only as a development
/// dependency, so it is installed beside it, at the version it was built with.
pub const PREVIEW2_SHIM: &str = "@bytecodealliance/preview2-shim@0.25.0";
/// zig's C compiler, from PyPI: it targets wasm32-wasi with the wasi-libc it
/// bundles, so C steps need no system packages.
pub const ZIG: &str = "ziglang==0.17.1";
/// wit-bindgen's C generator, from crates.io, which the C template's
/// build.sh runs.
pub const WIT_BINDGEN: &str = "wit-bindgen-cli@0.46.0";
/// wasm-tools, from crates.io, which the C template's build.sh runs.
pub const WASM_TOOLS: &str = "wasm-tools@1.239.0";
