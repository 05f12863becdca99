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
use wasmtime_wasi::{FsPerms, HostMonotonicClock, HostWallClock, WasiCtxBuilder};

use super::capture::CappedPipe;

/// The most random bytes one `get-random-bytes` call may ask for.
const MAX_RANDOM_BYTES: u64 = 1024 * 1024;

/// A host directory made visible to the guest.
///
/// The path is resolved (symlinks and `..`) when the grant is made, and the
/// directory it leads to then is the one an attempt gets: when an attempt
/// starts, the directory is opened again (beneath its tenant's ceiling, when
/// there is one, so nothing that resolves outside it can be reached) and
/// refused unless it is still that same directory. A step that swaps a
/// directory on the path for a symlink cannot redirect a later grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    /// The directory on the host, resolved.
    pub host: PathBuf,
    /// Where the guest sees it.
    pub guest: String,
    /// Whether the guest may only read.
    pub read_only: bool,
    /// The device and inode the path led to when the grant was made.
    identity: (u64, u64),
    /// The tenant's ceiling directory it is opened beneath, if any.
    ceiling: Option<PathBuf>,
}

impl DirGrant {
    /// Grants the directory `host` at `guest`; fails when `host` is not a
    /// directory, or `guest` is where a step's scratch directory appears
    /// (a grant there would pass for it).
    pub fn new(host: &Path, guest: impl Into<String>, read_only: bool) -> Result<Self, String> {
        let guest = guest.into();
        if Path::new(&guest).starts_with(SCRATCH) {
            return Err(format!(
                "{guest} is where a step's scratch directory appears; grant {} at another path",
                host.display()
            ));
        }
        let missing = |err: std::io::Error| format!("directory {} cannot be granted: {err}", host.display());
        let resolved = host.canonicalize().map_err(missing)?;
        let metadata = std::fs::metadata(&resolved).map_err(missing)?;
        if !metadata.is_dir() {
            return Err(format!("{} is not a directory", host.display()));
        }
        Ok(DirGrant { host: resolved, guest, read_only, identity: identity(&metadata), ceiling: None })
    }

    /// Parses `HOST:GUEST[:ro]` (or `HOST:GUEST:rw`), HOST relative to
    /// `base_dir`, and grants it.
    pub fn parse(spec: &str, base_dir: &Path) -> Result<Self, String> {
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
        DirGrant::new(&base_dir.join(host), guest, read_only)
    }

    /// The same grant, opened beneath `ceiling` (a resolved directory that
    /// holds it) when an attempt starts.
    pub fn beneath(self, ceiling: PathBuf) -> Self {
        DirGrant { ceiling: Some(ceiling), ..self }
    }

    /// Opens the directory for one attempt: beneath the ceiling if there is
    /// one, and only if it is still the directory granted.
    fn open(&self) -> anyhow::Result<std::fs::File> {
        let dir = match &self.ceiling {
            Some(ceiling) => {
                let inside = self.host.strip_prefix(ceiling).map_err(|_| {
                    anyhow::anyhow!("directory {} is not under {}", self.host.display(), ceiling.display())
                })?;
                let ceiling = cap_std::fs::Dir::open_ambient_dir(ceiling, cap_std::ambient_authority())?;
                let dir = if inside.as_os_str().is_empty() { ceiling } else { ceiling.open_dir(inside)? };
                dir.into_std_file()
            }
            None => std::fs::File::open(&self.host)?,
        };
        let metadata = dir.metadata()?;
        if !metadata.is_dir() || identity(&metadata) != self.identity {
            anyhow::bail!(
                "{} is no longer the directory that was granted (it, or a directory on its path, was replaced); \
                 load the workflow again to grant what is there now",
                self.host.display()
            );
        }
        Ok(dir)
    }
}

/// A directory's device and inode.
fn identity(metadata: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (metadata.dev(), metadata.ino())
}

/// A path that opens exactly the directory `dir` holds open, whatever has
/// since changed at its old path.
fn held_path(dir: &std::fs::File) -> PathBuf {
    use std::os::fd::AsRawFd;
    let fds = if cfg!(target_os = "linux") { "/proc/self/fd" } else { "/dev/fd" };
    Path::new(fds).join(dir.as_raw_fd().to_string())
}

/// Outbound HTTP a step may make: one host (or every subdomain of one, with
/// `*.`), on one port or the scheme's default ports, with some or all methods.
///
/// Written `[METHOD,METHOD@]HOST[:PORT]`: `api.example.com` allows any method
/// to ports 80 and 443; `GET,HEAD@*.example.com:8443` allows reads from every
/// subdomain on port 8443.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct HttpGrant {
    /// Lower case; starts with `*.` for a wildcard over subdomains.
    pub host: String,
    /// `None`: 80 for `http`, 443 for `https`.
    pub port: Option<u16>,
    /// Upper case; empty allows every method.
    pub methods: Vec<String>,
}

impl HttpGrant {
    /// Whether a request may go out under this grant. `host` is the
    /// request's host (compared without case); `default_port` is the port of
    /// the request's scheme (80 or 443).
    pub fn allows(&self, method: &str, host: &str, port: u16, default_port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let host_ok = match self.host.strip_prefix("*.") {
            Some(parent) => is_subdomain(&host, parent),
            None => host == self.host,
        };
        let method_ok = self.methods.is_empty() || self.methods.iter().any(|m| m == method);
        host_ok && port == self.port.unwrap_or(default_port) && method_ok
    }

    /// Whether every request this grant allows is also allowed by `wider`
    /// (a tenant's ceiling).
    pub fn within(&self, wider: &HttpGrant) -> bool {
        let host_ok = self.host == wider.host
            || wider
                .host
                .strip_prefix("*.")
                .is_some_and(|parent| is_subdomain(self.host.strip_prefix("*.").unwrap_or(&self.host), parent));
        let method_ok = wider.methods.is_empty()
            || (!self.methods.is_empty() && self.methods.iter().all(|m| wider.methods.contains(m)));
        host_ok && self.port == wider.port && method_ok
    }
}

/// Whether `host` is a proper subdomain of `parent` (`a.example.com` of
/// `example.com`, not `badexample.com`).
fn is_subdomain(host: &str, parent: &str) -> bool {
    host.strip_suffix(parent).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
}

impl TryFrom<String> for HttpGrant {
    type Error = String;

    fn try_from(spec: String) -> Result<Self, Self::Error> {
        spec.parse()
    }
}

impl std::fmt::Display for HttpGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.methods.is_empty() {
            write!(f, "{}@", self.methods.join(","))?;
        }
        f.write_str(&self.host)?;
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

impl std::str::FromStr for HttpGrant {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let usage = |why: &str| {
            format!(
                "`{spec}` is not an HTTP grant ({why}); write [METHODS@]HOST[:PORT], like api.example.com, \
                 GET,POST@api.example.com:8443 or *.example.com"
            )
        };
        let (methods, authority) = match spec.split_once('@') {
            Some((methods, authority)) => (methods.split(',').map(str::trim).collect(), authority),
            None => (Vec::new(), spec),
        };
        let methods: Vec<String> = methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        if let Some(bad) = methods.iter().find(|m| m.is_empty() || http::Method::from_bytes(m.as_bytes()).is_err()) {
            return Err(usage(&format!("`{bad}` is not an HTTP method")));
        }
        // An IPv6 address is bracketed, so a port is whatever follows `]:`
        // or the only `:`.
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                (host, Some(port.parse::<u16>().map_err(|_| usage(&format!("`{port}` is not a port")))?))
            }
            _ => (authority, None),
        };
        let name = host.strip_prefix("*.").unwrap_or(host);
        let valid_name = !name.is_empty()
            && !name.contains('*')
            && (name.starts_with('[') && name.ends_with(']')
                || name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'));
        if !valid_name {
            return Err(usage("the host must be a name, an IP address or *.NAME"));
        }
        Ok(HttpGrant { host: host.to_ascii_lowercase(), port, methods })
    }
}

/// The capabilities of one attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Host directories.
    pub dirs: Vec<DirGrant>,
    /// Environment variables.
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
    /// Outbound HTTP (`wasi:http/outgoing-handler`) the step may make; any
    /// other request fails with `HTTP-request-denied`.
    pub http: Vec<HttpGrant>,
    /// Secrets the step holds only as placeholders (in `config`): the host
    /// puts the value in place of the placeholder in the headers of the
    /// requests each one may be sent with.
    pub http_secrets: Vec<HttpSecret>,
}

/// A secret a step may send but never see.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpSecret {
    /// What the step sees instead of the value: random, so it tells
    /// nothing, and new for each execution.
    pub placeholder: String,
    /// The value.
    pub value: String,
    /// The requests whose headers may carry it.
    pub send_to: Vec<HttpGrant>,
}

impl HttpSecret {
    /// A secret `name` with a fresh placeholder.
    pub fn new(name: &str, value: String, send_to: Vec<HttpGrant>) -> Self {
        let placeholder = format!("stepbox-secret-{name}-{:032x}", rand::random::<u128>());
        HttpSecret { placeholder, value, send_to }
    }
}

/// Never prints the value.
impl std::fmt::Debug for HttpSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSecret").field("placeholder", &self.placeholder).field("send_to", &self.send_to).finish()
    }
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
    /// A WASI context builder with exactly these grants (built for WASI 0.2
    /// or preview1 by the caller); stdout and stderr go to the given capped
    /// pipes, `scratch` (when granted) appears at `/scratch`. No directory
    /// grant may hold or lie inside one of `reserved` (stepbox's own files).
    pub(crate) fn wasi_builder(
        &self,
        stdout: &CappedPipe,
        stderr: &CappedPipe,
        scratch: Option<&Path>,
        reserved: &[&Path],
    ) -> anyhow::Result<WasiCtxBuilder> {
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
        // Resolved only when there is a grant to check (a few syscalls each).
        let reserved: Vec<_> = match self.dirs.is_empty() {
            true => Vec::new(),
            false => reserved.iter().filter_map(|reserved| reserved.canonicalize().ok()).collect(),
        };
        for dir in &self.dirs {
            let cannot = |err: anyhow::Error| anyhow::anyhow!("cannot grant directory {}: {err:#}", dir.host.display());
            if let Some(reserved) = reserved.iter().find(|r| r.starts_with(&dir.host) || dir.host.starts_with(r)) {
                return Err(cannot(anyhow::anyhow!(
                    "it overlaps stepbox's data directory or scratch directories ({}), which no step may reach; \
                     grant a directory outside it",
                    reserved.display()
                )));
            }
            let opened = dir.open().map_err(cannot)?;
            let perms = if dir.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
            builder
                .preopened_dir(held_path(&opened), &dir.guest, perms)
                .map_err(|err| cannot(anyhow::anyhow!("{err:#}")))?;
        }
        Ok(builder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_directory_is_granted_where_the_scratch_directory_appears() {
        let dir = std::env::temp_dir();
        for guest in ["/scratch", "/scratch/more"] {
            let err = DirGrant::new(&dir, guest, false).unwrap_err();
            assert!(err.contains("is where a step's scratch directory appears"), "{err}");
        }
        DirGrant::new(&dir, "/scratchpad", false).expect("another name");
    }

    #[test]
    fn parses_directory_grants() {
        let base = std::env::temp_dir().canonicalize().unwrap();
        let dir = base.join(format!("stepbox-grant-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let name = dir.file_name().unwrap().to_str().unwrap();
        let grant = DirGrant::parse(&format!("{name}:/data:ro"), &base).unwrap();
        assert_eq!((grant.host.as_path(), grant.guest.as_str(), grant.read_only), (dir.as_path(), "/data", true));
        let grant = DirGrant::parse(&format!("{}:/x", dir.display()), Path::new("/elsewhere")).unwrap();
        assert_eq!((grant.host.as_path(), grant.read_only), (dir.as_path(), false));
        assert!(DirGrant::parse("nowhere", &base).unwrap_err().contains("HOST:GUEST"));
        assert!(DirGrant::parse("no/such/dir:/x", &base).unwrap_err().contains("cannot be granted"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn http(spec: &str) -> HttpGrant {
        spec.parse().unwrap()
    }

    #[test]
    fn parses_http_grants() {
        assert_eq!(http("Api.Example.com"), HttpGrant { host: "api.example.com".into(), port: None, methods: vec![] });
        assert_eq!(
            http("get,POST@*.example.com:8443"),
            HttpGrant { host: "*.example.com".into(), port: Some(8443), methods: vec!["GET".into(), "POST".into()] }
        );
        assert_eq!(http("[::1]:8080").port, Some(8080));
        assert_eq!(http("[::1]").port, None);
        for bad in ["", "a:b", "*", "a*.example.com", "G ET@x", "@x", "x:99999", "ex ample.com"] {
            let err = bad.parse::<HttpGrant>().unwrap_err();
            assert!(err.contains("[METHODS@]HOST[:PORT]"), "{bad}: {err}");
        }
    }

    #[test]
    fn http_grants_match_host_port_and_method() {
        let exact = http("GET@api.example.com");
        assert!(exact.allows("GET", "API.example.com", 443, 443));
        assert!(exact.allows("GET", "api.example.com", 80, 80));
        assert!(!exact.allows("POST", "api.example.com", 443, 443));
        assert!(!exact.allows("GET", "api.example.com", 8443, 443));
        assert!(!exact.allows("GET", "api.example.com", 443, 80));
        assert!(!exact.allows("GET", "evil.api.example.com", 443, 443));
        assert!(!exact.allows("GET", "api.example.com.evil.net", 443, 443));

        let wild = http("*.example.com:8080");
        assert!(wild.allows("DELETE", "a.b.example.com", 8080, 80));
        assert!(!wild.allows("GET", "example.com", 8080, 80));
        assert!(!wild.allows("GET", "badexample.com", 8080, 80));
        assert!(!wild.allows("GET", "a.example.com", 80, 80));
    }

    #[test]
    fn http_grants_nest_within_ceilings() {
        assert!(http("GET@a.example.com").within(&http("*.example.com")));
        assert!(http("*.a.example.com").within(&http("*.example.com")));
        assert!(http("*.example.com").within(&http("*.example.com")));
        assert!(!http("example.com").within(&http("*.example.com")));
        assert!(!http("*.example.com").within(&http("a.example.com")));
        assert!(!http("a.example.com").within(&http("GET@a.example.com")));
        assert!(http("GET@a.example.com").within(&http("GET,POST@a.example.com")));
        assert!(!http("a.example.com:8080").within(&http("a.example.com")));
        assert!(!http("a.example.com").within(&http("a.example.com:443")));
        assert!(http("a.example.com:8080").within(&http("a.example.com:8080")));
    }
}
