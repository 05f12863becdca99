//! What a step may reach beyond its own memory. Nothing is granted by
//! default: no directories, no environment, no network, an empty stdin.

use std::collections::BTreeMap;
use std::path::PathBuf;

use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

use super::capture::CappedPipe;

/// The most random bytes one `get-random-bytes` call may ask for.
const MAX_RANDOM_BYTES: u64 = 1024 * 1024;

/// A host directory made visible to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

impl std::str::FromStr for DirGrant {
    type Err = String;

    /// Parses `HOST:GUEST[:ro]` (or `HOST:GUEST:rw`).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let usage = || format!("`{spec}` is not a directory grant; write HOST:GUEST, HOST:GUEST:ro or HOST:GUEST:rw");
        let (rest, read_only) = match spec.rsplit_once(':') {
            Some((rest, "ro")) => (rest, true),
            Some((rest, "rw")) => (rest, false),
            _ => (spec, false),
        };
        let (host, guest) = rest.split_once(':').ok_or_else(usage)?;
        if host.is_empty() || guest.is_empty() {
            return Err(usage());
        }
        Ok(DirGrant { host: PathBuf::from(host), guest: guest.to_owned(), read_only })
    }
}

/// The capabilities of one attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub dirs: Vec<DirGrant>,
    pub env: BTreeMap<String, String>,
    /// Values the step reads through `wasi:config`.
    pub config: BTreeMap<String, String>,
    /// Bytes the guest reads from stdin; empty when not granted.
    pub stdin: Vec<u8>,
}

impl Grants {
    /// A WASI context with exactly these grants; stdout and stderr go to the
    /// given capped pipes.
    pub(crate) fn wasi_ctx(&self, stdout: &CappedPipe, stderr: &CappedPipe) -> anyhow::Result<WasiCtx> {
        let mut builder = WasiCtxBuilder::new();
        builder
            .stdin(MemoryInputPipe::new(self.stdin.clone()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            // One call may not make the host allocate more than this.
            .max_random_size(MAX_RANDOM_BYTES);
        for (key, value) in &self.env {
            builder.env(key, value);
        }
        for dir in &self.dirs {
            let perms = if dir.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
            builder
                .preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|err| anyhow::anyhow!("cannot grant directory {} to the step: {err}", dir.host.display()))?;
        }
        Ok(builder.build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_directory_grants() {
        assert_eq!(
            "data:/data:ro".parse::<DirGrant>().unwrap(),
            DirGrant { host: "data".into(), guest: "/data".into(), read_only: true }
        );
        assert_eq!(
            "/tmp/x:/x".parse::<DirGrant>().unwrap(),
            DirGrant { host: "/tmp/x".into(), guest: "/x".into(), read_only: false }
        );
        assert!("nowhere".parse::<DirGrant>().unwrap_err().contains("HOST:GUEST"));
    }
}
