//! A plain WASI program that knows nothing of stepbox: it reads JSON from
//! stdin and writes JSON to stdout. The tests build it twice, as a command
//! component (wasm32-wasip2) and as a preview1 module (wasm32-wasip1).
//!
//! Input: `{"text": "..."}`, counted into `{"words", "lines", "args",
//! "greeting"}` (`greeting` from the `GREETING` environment variable).
//! `{"exit": N}` makes it print a reason to stderr and exit with N;
//! `{"plain": true}` makes it print plain text instead of JSON.
use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut stdin = String::new();
    if let Err(err) = std::io::stdin().read_to_string(&mut stdin) {
        eprintln!("cannot read stdin: {err}");
        return ExitCode::from(2);
    }
    let input: serde_json::Value = match serde_json::from_str(&stdin) {
        Ok(input) => input,
        Err(err) => {
            eprintln!("the input is not JSON: {err}");
            return ExitCode::from(65);
        }
    };
    if let Some(code) = input["exit"].as_u64() {
        eprintln!("asked to exit with {code}");
        return ExitCode::from(code as u8);
    }
    let text = input["text"].as_str().unwrap_or_default();
    let words = text.split_whitespace().count();
    if input["plain"] == true {
        println!("{words} words");
        return ExitCode::SUCCESS;
    }
    let output = serde_json::json!({
        "words": words,
        "lines": text.lines().count(),
        "args": std::env::args().collect::<Vec<_>>(),
        "greeting": std::env::var("GREETING").ok(),
    });
    println!("{output}");
    ExitCode::SUCCESS
}
