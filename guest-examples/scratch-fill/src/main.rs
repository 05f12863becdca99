//! Tries to put more in `/scratch` than `limits.scratch` allows, the ways
//! a program can, and reports where the host stopped it. Built as a
//! command component and as a preview1 module, so both are held to the
//! same size.
//!
//! Input (stdin): `{"how": H, "mib": N}` where `H` is
//! - `"append"`: 1 MiB writes to one file until one fails,
//! - `"files"`: a 1 MiB file after another,
//! - `"pwrite"`: 1 MiB writes at ever higher offsets (positioned writes),
//! - `"sparse"`: one file resized to `N` MiB without writing it,
//! - `"dirs"`: empty directories until one cannot be made,
//! - `"truncate"`: `N` MiB written, the file truncated, `N` MiB again,
//! - `"cross"`: a 1 GiB sparse file made in the granted `/data` moved and
//!   linked into `/scratch`, a scratch file linked and moved out; the
//!   output is then each of those outcomes (`"ok"` or the error's kind).
//!
//! Output (stdout): `{"written": bytes written, "entries": entries made,
//! "error": the error's kind or null, "held": bytes of the files in
//! /scratch at the end}`.
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};

const MIB: usize = 1 << 20;

fn main() {
    let mut stdin = String::new();
    std::io::stdin().read_to_string(&mut stdin).expect("stdin");
    let input: serde_json::Value = serde_json::from_str(&stdin).expect("JSON input");
    let mib = input["mib"].as_u64().unwrap_or(1);
    if input["how"] == "cross" {
        println!("{}", cross());
        return;
    }
    let chunk = vec![7u8; MIB];
    let (mut written, mut entries) = (0u64, 0u64);
    let result = match input["how"].as_str().unwrap_or_default() {
        "append" => (|| {
            let mut file = OpenOptions::new().create(true).append(true).open("/scratch/log")?;
            loop {
                file.write_all(&chunk)?;
                written += MIB as u64;
            }
        })(),
        "files" => (|| loop {
            File::create(format!("/scratch/file-{entries}"))?.write_all(&chunk)?;
            entries += 1;
            written += MIB as u64;
        })(),
        "pwrite" => (|| {
            let file = File::create("/scratch/blocks")?;
            loop {
                write_at(&file, &chunk, written)?;
                written += MIB as u64;
            }
        })(),
        "sparse" => File::create("/scratch/sparse").and_then(|file| file.set_len(mib * MIB as u64)),
        "dirs" => (|| loop {
            std::fs::create_dir(format!("/scratch/dir-{entries}"))?;
            entries += 1;
        })(),
        "truncate" => (|| {
            let mut file = File::create("/scratch/reused")?;
            for _ in 0..2 {
                file.set_len(0)?;
                file.rewind()?;
                for _ in 0..mib {
                    file.write_all(&chunk)?;
                    written += MIB as u64;
                }
            }
            Ok(())
        })(),
        other => panic!("unknown way {other}"),
    };
    let held: u64 = std::fs::read_dir("/scratch")
        .expect("/scratch")
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .map(|meta| meta.len())
        .sum();
    let error = result.err().map(|err| format!("{:?}", err.kind()));
    println!("{}", serde_json::json!({ "written": written, "entries": entries, "error": error, "held": held }));
}

/// Moves and links across the edge of `/scratch`.
fn cross() -> serde_json::Value {
    let outcome = |result: std::io::Result<()>| match result {
        Ok(()) => "ok".to_owned(),
        Err(err) => format!("{:?}", err.kind()),
    };
    File::create("/data/outside").and_then(|file| file.set_len(1 << 30)).expect("a sparse file in /data");
    std::fs::write("/scratch/mine", "x").expect("a file in /scratch");
    serde_json::json!({
        "move_in": outcome(std::fs::rename("/data/outside", "/scratch/inside")),
        "link_in": outcome(std::fs::hard_link("/data/outside", "/scratch/linked")),
        "link_out": outcome(std::fs::hard_link("/scratch/mine", "/data/linked")),
        "move_out": outcome(std::fs::rename("/scratch/mine", "/data/moved")),
    })
}

/// A positioned write (`pwrite`, which std keeps unstable on WASI), so
/// the host sees a write at an offset rather than through a stream.
fn write_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    unsafe extern "C" {
        fn pwrite(fd: i32, buf: *const u8, len: usize, offset: i64) -> isize;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    let mut done = 0;
    while done < bytes.len() {
        let rest = &bytes[done..];
        // SAFETY: `rest` is valid for `rest.len()` bytes and `fd` is open.
        let n = unsafe { pwrite(fd, rest.as_ptr(), rest.len(), (offset + done as u64) as i64) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        done += n as usize;
    }
    Ok(())
}
