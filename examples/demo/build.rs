//! Builds the guests `examples/demo.yaml` runs, and only those: the demo
//! needs nothing but the Rust toolchain.

#[path = "../../tests/build/guests.rs"]
mod guests;

/// The components `examples/demo.yaml` names.
const DEMO_GUESTS: [&str; 5] = ["hello", "transform", "flaky", "echo", "spin"];

fn main() {
    let root = guests::repository_root(2);
    guests::watch(&root);
    println!("cargo:rerun-if-changed={}", root.join("examples/demo.yaml").display());
    guests::cargo_build(&root, "wasm32-wasip2", &DEMO_GUESTS);
}
