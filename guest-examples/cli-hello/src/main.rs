//! A plain WASI command: it exports `wasi:cli/run`, not a step's `run`.
fn main() {
    println!("hello from a command");
}
