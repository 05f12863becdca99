//! What a step may reach beyond its own memory. Nothing is granted by
//! default: no directories, no environment, no network, an empty stdin.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::SeedableRng;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{FsPerms, HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder};

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
    /// Config values that are secret: the step reads them through
    /// `wasi:config` like the others, and every record of the attempt
    /// (logs, stdout, stderr, errors, output) has them replaced by
    /// `[redacted]`.
    pub secrets: BTreeMap<String, String>,
    /// Command-line arguments (`wasi:cli/environment.get-arguments`).
    pub args: Vec<String>,
    /// A private, empty directory at `/scratch`, removed after the attempt.
    pub scratch: bool,
    /// Fixed clocks and randomness from this seed, so the same input gives
    /// the same output.
    pub deterministic: Option<u64>,
    /// Addresses the step may connect to (TCP) or send to (UDP); nothing
    /// else, and no name lookups.
    pub network: Vec<SocketAddr>,
}

/// Where a scratch directory appears in the guest.
pub const SCRATCH: &str = "/scratch";

/// The wall clock of a deterministic step: always 2000-01-01T00:00:00Z.
struct FixedWallClock;

impl HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::from_secs(946_684_800)
    }
}

/// The monotonic clock of a deterministic step: starts at 0 and moves one
/// microsecond per reading, so timings depend only on what the step does.
#[derive(Default)]
struct SteppingClock(AtomicU64);

impl HostMonotonicClock for SteppingClock {
    fn resolution(&self) -> u64 {
        1_000
    }

    fn now(&self) -> u64 {
        self.0.fetch_add(1_000, Ordering::Relaxed)
    }
}

impl Grants {
    /// A WASI context with exactly these grants; stdout and stderr go to the
    /// given capped pipes, `scratch` (when granted) appears at `/scratch`.
    pub(crate) fn wasi_ctx(
        &self,
        stdout: &CappedPipe,
        stderr: &CappedPipe,
        scratch: Option<&Path>,
    ) -> anyhow::Result<WasiCtx> {
        let mut builder = WasiCtxBuilder::new();
        builder
            .stdin(MemoryInputPipe::new(self.stdin.clone()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .args(&self.args)
            .allow_ip_name_lookup(false)
            // One call may not make the host allocate more than this.
            .max_random_size(MAX_RANDOM_BYTES);
        if self.network.is_empty() {
            builder.allow_tcp(false).allow_udp(false);
        } else {
            let allowed = Arc::new(self.network.clone());
            builder.allow_tcp(true).allow_udp(true).socket_addr_check(move |addr, use_| {
                let permitted = match use_ {
                    // Binding happens implicitly before a connect, on the
                    // wildcard address; listening and accepting are not granted.
                    SocketAddrUse::TcpBind | SocketAddrUse::UdpBind => addr.ip().is_unspecified() && addr.port() == 0,
                    SocketAddrUse::TcpConnect | SocketAddrUse::UdpSend | SocketAddrUse::UdpReceive => {
                        allowed.contains(&addr)
                    }
                    _ => false,
                };
                Box::pin(async move { permitted })
            });
        }
        if let Some(seed) = self.deterministic {
            builder
                .wall_clock(FixedWallClock)
                .monotonic_clock(SteppingClock::default())
                .secure_random(rand::rngs::StdRng::seed_from_u64(seed))
                .insecure_random(rand::rngs::StdRng::seed_from_u64(seed.rotate_left(17)))
                .insecure_random_seed(u128::from(seed));
        }
        for (key, value) in &self.env {
            builder.env(key, value);
        }
        if let Some(scratch) = scratch {
            builder
                .preopened_dir(scratch, SCRATCH, FsPerms::ReadWrite)
                .map_err(|err| anyhow::anyhow!("cannot create the scratch directory: {err}"))?;
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
