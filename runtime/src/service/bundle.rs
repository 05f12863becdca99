//! Bundles: a workflow file with everything it references (includes,
//! components, any other file it names), as `stepbox deploy` sends it and
//! as the service keeps it. A stored bundle is a directory named by its
//! digest, written once and never changed, so a run that pins it can be
//! resumed with exactly the files it started with.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::workflow::{Action, Workflow};

/// Files a bundle may hold.
pub const MAX_FILES: usize = 1_000;
/// The longest path inside a bundle, in bytes.
pub const MAX_PATH: usize = 512;
/// The longest name of one file or directory, as file systems allow.
const MAX_NAME: usize = 255;

/// A bundle on the wire: the files by their paths relative to the bundle's
/// root, each base64-encoded, and which of them is the workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BundleUpload {
    /// The workflow file's path among `files`, e.g. `orders.yaml`.
    pub workflow: String,
    /// Every file of the bundle by its relative path (`/`-separated, no
    /// `..`), its contents base64-encoded (standard alphabet, padded).
    pub files: BTreeMap<String, String>,
}

/// A bundle, decoded and checked: relative, normal paths only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The workflow file's path among `files`.
    pub entry: String,
    /// The files by relative path.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Bundle {
    /// Decodes and checks an upload; the error says which file is wrong
    /// and why.
    pub fn decode(upload: BundleUpload) -> Result<Bundle, String> {
        if upload.files.len() > MAX_FILES {
            return Err(format!("the bundle has {} files; at most {MAX_FILES} are allowed", upload.files.len()));
        }
        let mut files = BTreeMap::new();
        for (path, data) in upload.files {
            check_path(&path)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data.as_bytes())
                .map_err(|err| format!("file `{path}` is not valid base64: {err}"))?;
            files.insert(path, bytes);
        }
        // A path cannot be a file and hold files.
        for path in files.keys() {
            let mut prefix = String::new();
            for part in path.split('/') {
                if !prefix.is_empty() && files.contains_key(&prefix) {
                    return Err(format!("`{prefix}` is a file, so `{path}` cannot be inside it"));
                }
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(part);
            }
        }
        if !files.contains_key(&upload.workflow) {
            return Err(format!("the workflow file `{}` is not among the bundle's files", upload.workflow));
        }
        Ok(Bundle { entry: upload.workflow, files })
    }

    /// The bundle as it is sent.
    pub fn encode(&self) -> BundleUpload {
        let engine = base64::engine::general_purpose::STANDARD;
        BundleUpload {
            workflow: self.entry.clone(),
            files: self.files.iter().map(|(path, bytes)| (path.clone(), engine.encode(bytes))).collect(),
        }
    }

    /// The SHA-256 of the bundle: every path with its contents' digest,
    /// and the entry. Equal bundles have equal digests however they were
    /// sent.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for (path, bytes) in &self.files {
            hasher.update(path.as_bytes());
            hasher.update([0]);
            hasher.update(Sha256::digest(bytes));
        }
        hasher.update(b"entry\0");
        hasher.update(self.entry.as_bytes());
        format!("{:x}", hasher.finalize())
    }

    /// The bundle as the store keeps it, for the service's other nodes.
    pub fn to_stored(&self) -> Vec<u8> {
        serde_json::to_vec(&self.encode()).unwrap_or_default()
    }

    /// The bundle the store kept under `digest`, checked as an upload is
    /// and against the digest.
    pub fn from_stored(digest: &str, bytes: &[u8]) -> Result<Bundle, String> {
        let upload: BundleUpload = serde_json::from_slice(bytes)
            .map_err(|err| format!("the store's bundle {digest} cannot be read: {err}"))?;
        let bundle = Bundle::decode(upload)?;
        let found = bundle.digest();
        if found != digest {
            return Err(format!("the store's bundle {digest} has digest {found}"));
        }
        Ok(bundle)
    }

    /// Bytes of all files together.
    pub fn size(&self) -> usize {
        self.files.values().map(Vec::len).sum()
    }

    /// The bundle of a workflow loaded from its file: the file, its
    /// components and the workflows it includes by a literal path (with
    /// theirs), and the `extra` files (for includes chosen by a template).
    /// Paths are kept relative to the deepest directory holding them all,
    /// so the workflow's relative references work unchanged.
    pub fn of_workflow(workflow: &Workflow, extra: &[PathBuf]) -> Result<Bundle, String> {
        let path = workflow.file.as_path();
        let mut paths = Vec::new();
        collect(workflow, &mut paths);
        paths.extend(extra.iter().cloned());
        let mut absolute = Vec::new();
        for file in &paths {
            absolute.push(file.canonicalize().map_err(|err| format!("cannot read {}: {err}", file.display()))?);
        }
        let entry = path.canonicalize().map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        let root = absolute.iter().fold(entry.parent().unwrap_or(Path::new("/")).to_owned(), |root, file| {
            common_ancestor(&root, file.parent().unwrap_or(Path::new("/")))
        });
        let relative = |file: &Path| -> Result<String, String> {
            let inside =
                file.strip_prefix(&root).map_err(|_| format!("{} is outside {}", file.display(), root.display()))?;
            inside.to_str().map(ToOwned::to_owned).ok_or_else(|| format!("{} is not a UTF-8 path", file.display()))
        };
        let mut files = BTreeMap::new();
        for file in absolute.iter().chain([&entry]) {
            let bytes = std::fs::read(file).map_err(|err| format!("cannot read {}: {err}", file.display()))?;
            files.insert(relative(file)?, bytes);
        }
        let bundle = Bundle { entry: relative(&entry)?, files };
        if bundle.files.len() > MAX_FILES {
            return Err(format!(
                "the workflow references {} files; a bundle holds at most {MAX_FILES}",
                bundle.files.len()
            ));
        }
        Ok(bundle)
    }
}

/// The files `workflow` needs besides itself.
fn collect(workflow: &Workflow, paths: &mut Vec<PathBuf>) {
    paths.extend(workflow.components.values().map(|component| component.path.clone()));
    for step in &workflow.steps {
        if let Action::Include { workflow: Some(included), .. } = &step.action {
            paths.push(included.file.clone());
            collect(included, paths);
        }
    }
}

fn common_ancestor(a: &Path, b: &Path) -> PathBuf {
    a.components().zip(b.components()).take_while(|(x, y)| x == y).map(|(x, _)| x).collect()
}

/// Checks that `path` is relative and normal: `/`-separated names, none
/// empty, `.` or `..`, so it cannot name anything outside the bundle.
fn check_path(path: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("file path `{path}` {why}; use a relative path like `steps/charge.wasm`"));
    if path.is_empty() {
        return bad("is empty");
    }
    if path.len() > MAX_PATH {
        return Err(format!("a file path is {} bytes long; at most {MAX_PATH} are allowed", path.len()));
    }
    if path.contains('\\') || path.contains('\0') || path.chars().any(char::is_control) {
        return bad("holds a backslash or a control character");
    }
    if path.starts_with('/') {
        return bad("is absolute");
    }
    if path.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return bad("has an empty, `.` or `..` part");
    }
    if path.split('/').any(|part| part.len() > MAX_NAME) {
        return bad(&format!("has a name longer than {MAX_NAME} bytes"));
    }
    // What the file system makes of it must be the same plain names.
    if !Path::new(path).components().all(|part| matches!(part, Component::Normal(_))) {
        return bad("is not a plain relative path");
    }
    Ok(())
}

/// Where the service keeps bundles: `bundles/<digest>/` in the data
/// directory.
#[derive(Debug, Clone)]
pub struct Bundles {
    root: PathBuf,
}

impl Bundles {
    /// The bundles of the data directory `data_dir`.
    pub fn new(data_dir: &Path) -> Bundles {
        Bundles { root: data_dir.join("bundles") }
    }

    /// The directory of the bundle with `digest`.
    pub fn dir(&self, digest: &str) -> PathBuf {
        self.root.join(digest)
    }

    /// The directory of the bundle with `digest`: stored here already, or
    /// brought from `store`, where the node that deployed it put it.
    pub fn fetch(&self, store: &dyn crate::store::Store, digest: &str) -> Result<PathBuf, String> {
        let dir = self.dir(digest);
        if dir.is_dir() {
            return Ok(dir);
        }
        let bytes = store
            .blob(digest)
            .map_err(|err| format!("cannot load bundle {digest}: {err}"))?
            .ok_or_else(|| format!("bundle {digest} is neither here nor in the store"))?;
        let bundle = Bundle::from_stored(digest, &bytes)?;
        let stored = self.stage(&bundle).and_then(|staged| self.commit(staged, digest));
        stored.map_err(|err| format!("cannot store bundle {digest} in {}: {err}", self.root.display()))
    }

    /// Writes `bundle` into a new staging directory beside the stored
    /// ones, to be checked there; dropping it removes it.
    pub fn stage(&self, bundle: &Bundle) -> std::io::Result<tempfile::TempDir> {
        crate::store::create_private_dir(&self.root)?;
        let staging = tempfile::Builder::new().prefix(".staging-").tempdir_in(&self.root)?;
        for (path, bytes) in &bundle.files {
            let file = staging.path().join(path);
            if let Some(parent) = file.parent() {
                crate::store::create_private_dir(parent)?;
            }
            let mut out = std::os::unix::fs::OpenOptionsExt::mode(
                std::fs::OpenOptions::new().write(true).create_new(true),
                0o600,
            )
            .open(&file)?;
            out.write_all(bytes)?;
            out.sync_all()?;
        }
        Ok(staging)
    }

    /// Moves a checked staging directory into place as the bundle with
    /// `digest`, unless that bundle is stored already; returns its
    /// directory. Renamed whole, so a bundle directory that exists is
    /// complete.
    pub fn commit(&self, staged: tempfile::TempDir, digest: &str) -> std::io::Result<PathBuf> {
        let dir = self.dir(digest);
        if dir.is_dir() {
            return Ok(dir);
        }
        let staging = staged.keep();
        match std::fs::rename(&staging, &dir) {
            Ok(()) => Ok(dir),
            // Another deploy stored the same bundle meanwhile.
            Err(_) if dir.is_dir() => {
                let _ = std::fs::remove_dir_all(&staging);
                Ok(dir)
            }
            Err(err) => {
                let _ = std::fs::remove_dir_all(&staging);
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(files: &[(&str, &[u8])], workflow: &str) -> BundleUpload {
        let engine = base64::engine::general_purpose::STANDARD;
        BundleUpload {
            workflow: workflow.into(),
            files: files.iter().map(|(path, bytes)| ((*path).to_owned(), engine.encode(bytes))).collect(),
        }
    }

    #[test]
    fn paths_that_could_leave_the_bundle_are_refused_with_the_reason() {
        for (path, why) in [
            ("../x.wasm", "`..`"),
            ("/etc/passwd", "absolute"),
            ("a//b", "empty"),
            ("./a", "`.`"),
            ("a\\..\\b", "backslash"),
            ("a\nb", "control"),
            ("", "empty"),
            (&format!("{}/x", "n".repeat(256)), "longer than 255"),
        ] {
            let err = Bundle::decode(upload(&[(path, b"x"), ("w.yaml", b"")], "w.yaml")).unwrap_err();
            assert!(err.contains(why), "{path:?}: {err}");
        }
        let err = Bundle::decode(upload(&[("a", b"x"), ("a/b", b"y")], "a")).unwrap_err();
        assert!(err.contains("`a` is a file"), "{err}");
        let err = Bundle::decode(upload(&[("w.yaml", b"")], "other.yaml")).unwrap_err();
        assert!(err.contains("`other.yaml` is not among"), "{err}");
        let mut bad = upload(&[("w.yaml", b"")], "w.yaml");
        bad.files.insert("x".into(), "not base64!".into());
        assert!(Bundle::decode(bad).unwrap_err().contains("file `x` is not valid base64"));
    }

    #[test]
    fn the_digest_depends_on_contents_paths_and_entry_only() {
        let a = Bundle::decode(upload(&[("w.yaml", b"1"), ("c.wasm", b"2")], "w.yaml")).unwrap();
        let same = Bundle::decode(upload(&[("c.wasm", b"2"), ("w.yaml", b"1")], "w.yaml")).unwrap();
        assert_eq!(a.digest(), same.digest());
        let changed = Bundle::decode(upload(&[("w.yaml", b"1"), ("c.wasm", b"3")], "w.yaml")).unwrap();
        let moved = Bundle::decode(upload(&[("w.yaml", b"1"), ("d.wasm", b"2")], "w.yaml")).unwrap();
        let entry = Bundle::decode(upload(&[("w.yaml", b"1"), ("c.wasm", b"2")], "c.wasm")).unwrap();
        for other in [changed, moved, entry] {
            assert_ne!(a.digest(), other.digest());
        }
        assert_eq!(Bundle::decode(a.encode()).unwrap(), a);
    }

    #[test]
    fn a_stored_bundle_is_complete_and_stored_once_and_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let bundles = Bundles::new(dir.path());
        let bundle = Bundle::decode(upload(&[("w.yaml", b"1"), ("steps/c.wasm", b"2")], "w.yaml")).unwrap();
        let stored = bundles.commit(bundles.stage(&bundle).unwrap(), &bundle.digest()).unwrap();
        assert_eq!(std::fs::read(stored.join("steps/c.wasm")).unwrap(), b"2");
        assert_eq!(bundles.commit(bundles.stage(&bundle).unwrap(), &bundle.digest()).unwrap(), stored);
        drop(bundles.stage(&bundle).unwrap());
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("bundles")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from(bundle.digest())], "no staging directory is left");
    }
}
