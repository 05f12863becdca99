//! Hostile: tries to reach files outside its grants. The input names the
//! attack; the output says whether the sandbox refused it. The host test
//! plants the symlinks and checks that files outside the grants are
//! unchanged.
use serde::{Deserialize, Serialize};
use stepbox_sdk::{StepError, step};

#[derive(Deserialize)]
struct Input {
    attack: String,
}

#[derive(Serialize)]
struct Output {
    attack: String,
    /// `refused: <error>` or `done: <what was read or changed>`.
    outcome: String,
}

/// Each attack, with the paths as the guest sees them: `/data` is granted
/// read-write, `/ro` read-only; `secret.txt` lies next to the granted
/// directory on the host.
fn attack(name: &str) -> std::io::Result<String> {
    use std::fs;
    match name {
        "dotdot" => fs::read_to_string("/data/../secret.txt"),
        "absolute" => fs::read_to_string("/etc/passwd"),
        "symlink" => fs::read_to_string("/data/link-out"),
        "relative-symlink" => fs::read_to_string("/data/rel-out"),
        "trailing-slash-symlink" => {
            fs::read_dir("/data/dir-out/").map(|entries| format!("{} entries", entries.count()))
        }
        "hard-link" => fs::hard_link("/data/../secret.txt", "/data/stolen").map(|()| "linked".into()),
        "hard-link-through-symlink" => {
            fs::hard_link("/data/link-out", "/data/stolen").and_then(|()| fs::read_to_string("/data/stolen"))
        }
        "rename-out" => fs::rename("/data/file.txt", "/data/../moved.txt").map(|()| "renamed".into()),
        "truncate-read-only" => {
            fs::OpenOptions::new().write(true).truncate(true).open("/ro/file.txt").map(|_| "truncated".into())
        }
        "write-read-only" => fs::write("/ro/new.txt", "x").map(|()| "written".into()),
        "delete-read-only" => fs::remove_file("/ro/file.txt").map(|()| "deleted".into()),
        // Swaps the granted `/data/sub` for a symlink to the grant's
        // grandparent, for a later step granted `sub` to follow.
        "plant-symlink" => fs::rename("/data/sub", "/data/sub-old")
            .and_then(|()| symlink(c"../..", c"/data/sub"))
            .map(|()| "planted".into()),
        "read-secret" => fs::read_to_string("/data/secret.txt"),
        other => Ok(format!("unknown attack {other}")),
    }
}

/// `symlink(2)` from wasi-libc, which Rust's standard library links on
/// WASI (its own `symlink_path` is not stable).
fn symlink(target: &std::ffi::CStr, link: &std::ffi::CStr) -> std::io::Result<()> {
    unsafe extern "C" {
        fn symlink(target: *const std::ffi::c_char, link: *const std::ffi::c_char) -> std::ffi::c_int;
    }
    // SAFETY: both are NUL-terminated strings that outlive the call.
    match unsafe { symlink(target.as_ptr(), link.as_ptr()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[step]
fn run(input: Input) -> Result<Output, StepError> {
    let outcome = match attack(&input.attack) {
        Ok(done) => format!("done: {done}"),
        Err(err) => format!("refused: {err}"),
    };
    Ok(Output { attack: input.attack, outcome })
}
