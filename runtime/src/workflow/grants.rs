//! A step's grants as its workflow declares them: parsed and checked with
//! the workflow, held to a tenant's ceilings as one unit, and rendered once
//! per execution into the sandbox's [`Grants`], which every attempt of the
//! execution gets (and which `stepbox step run` builds from its flags).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;

use super::diagnostic::Diagnostics;
use super::spec::SecretSource;
use super::spec::StepSpec;
use super::template;
use crate::sandbox::{DirGrant, Grants, HttpGrant, HttpSecret};

/// The largest secret file read: secrets are keys and passwords.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// What a step may reach beyond its own memory, before rendering: config,
/// environment, arguments and stdin are still templates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepGrants {
    /// Values the step reads through `wasi:config`; templates.
    pub config: BTreeMap<String, String>,
    /// Environment variables; templates.
    pub env: BTreeMap<String, String>,
    /// Host directories, resolved against the workflow file's directory.
    pub dirs: Vec<DirGrant>,
    /// Secret name → where its value comes from, and where it may be sent.
    pub secrets: BTreeMap<String, StepSecret>,
    /// Command-line arguments; templates.
    pub args: Vec<String>,
    /// Text on the step's stdin; a template.
    pub stdin: Option<String>,
    /// A private scratch directory per attempt.
    pub scratch: bool,
    /// Fixed clocks and randomness seeded from the input.
    pub deterministic: bool,
    /// Addresses the step may connect or send to.
    pub network: Vec<SocketAddr>,
    /// Outbound HTTP the step may make.
    pub http: Vec<HttpGrant>,
}

/// One secret of a step, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSecret {
    /// Where the value comes from.
    pub source: SecretSource,
    /// Empty: the step reads the value. Otherwise it reads a placeholder,
    /// swapped for the value in the headers of the requests these allow.
    pub send_to: Vec<HttpGrant>,
}

impl StepGrants {
    /// Parses and checks the grants of `step` (id `id`); problems go to `d`.
    pub(crate) fn from_spec(d: &mut Diagnostics, step: &StepSpec, id: &str, base_dir: &Path) -> Self {
        let mut dirs = Vec::new();
        for dir in &step.dirs {
            match DirGrant::parse(&dir.value, base_dir) {
                Ok(grant) => dirs.push(grant),
                Err(message) => d.on(
                    dir,
                    format!("step `{id}`: {message}"),
                    Some("host paths are relative to the workflow file".into()),
                ),
            }
        }
        let mut network = Vec::new();
        for address in step.network.iter().flat_map(|network| &network.connect) {
            match address.value.parse() {
                Ok(address) => network.push(address),
                Err(_) => d.on(
                    address,
                    format!("step `{id}`: `{}` is not an IP:PORT address", address.value),
                    Some(
                        "write an IP address and a port, like 10.0.0.5:443 or [::1]:8080; names are not resolved"
                            .into(),
                    ),
                ),
            }
        }
        let mut http = Vec::new();
        for rule in step.network.iter().flat_map(|network| &network.http) {
            match rule.value.parse() {
                Ok(rule) => http.push(rule),
                Err(message) => d.on(rule, format!("step `{id}`: {message}"), None),
            }
        }
        for key in step.secrets.keys().filter(|key| step.config.contains_key(*key)) {
            d.on(
                &step.id,
                format!("step `{id}`: `{key}` is both a config value and a secret"),
                Some("keep one".into()),
            );
        }
        let mut secrets = BTreeMap::new();
        for (key, secret) in &step.secrets {
            let mut send_to = Vec::new();
            for rule in &secret.send_to {
                match rule.parse::<HttpGrant>() {
                    Ok(rule) if http.iter().any(|grant| rule.within(grant)) => send_to.push(rule),
                    Ok(_) => d.on(
                        &step.id,
                        format!(
                            "step `{id}`: secret `{key}` may be sent to `{rule}`, which `network.http` does not grant"
                        ),
                        Some("every send_to rule must fit inside one of the step's HTTP grants".into()),
                    ),
                    Err(message) => d.on(&step.id, format!("step `{id}`: secret `{key}`: {message}"), None),
                }
            }
            secrets.insert(key.clone(), StepSecret { source: secret.source.clone(), send_to });
        }
        StepGrants {
            config: step.config.clone(),
            env: step.env.clone(),
            dirs,
            secrets,
            args: step.args.clone(),
            stdin: step.stdin.clone(),
            scratch: step.scratch,
            deterministic: step.deterministic,
            network,
            http,
        }
    }

    /// The grants of one execution, whose templates see `context` and whose
    /// rendered input is `input`, without its secrets: those are read where
    /// each attempt runs ([`resolve_secrets`]), so a coordinator handing an
    /// attempt to a worker never holds their values. A deterministic step's
    /// seed is taken from the input. The error names the field that could
    /// not be rendered.
    pub fn render(&self, context: &minijinja::Value, input: &Value) -> Result<Grants, String> {
        let text =
            |text: &str, what: &str| template::render_text(text, context).map_err(|err| format!("`{what}`: {err}"));
        let map = |map: &BTreeMap<String, String>, what: &str| {
            map.iter()
                .map(|(key, value)| Ok((key.clone(), text(value, &format!("{what}.{key}"))?)))
                .collect::<Result<_, String>>()
        };
        // Seeded from the input, so the same input gives the same output.
        let deterministic = self.deterministic.then(|| {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(input.to_string());
            u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
        });
        Ok(Grants {
            dirs: self.dirs.clone(),
            env: map(&self.env, "env")?,
            config: map(&self.config, "config")?,
            stdin: self
                .stdin
                .as_deref()
                .map(|stdin| text(stdin, "stdin"))
                .transpose()?
                .unwrap_or_default()
                .into_bytes(),
            secrets: BTreeMap::new(),
            args: self.args.iter().map(|arg| text(arg, "args")).collect::<Result<_, String>>()?,
            scratch: self.scratch,
            deterministic,
            network: self.network.clone(),
            http: self.http.clone(),
            http_secrets: Vec::new(),
        })
    }
}

/// Puts the values of `secrets` into `grants`: read from the host's
/// environment or from `secrets_dir`; a secret that may only be sent gets
/// a fresh placeholder in `config`. The error names the secret.
pub fn resolve_secrets(
    secrets: &BTreeMap<String, StepSecret>,
    secrets_dir: Option<&Path>,
    grants: &mut Grants,
) -> Result<(), String> {
    for (key, secret) in secrets {
        let value = read_secret(&secret.source, secrets_dir).map_err(|why| format!("secret `{key}`: {why}"))?;
        if secret.send_to.is_empty() {
            grants.secrets.insert(key.clone(), value);
        } else {
            let sendable = HttpSecret::new(key, value, secret.send_to.clone());
            grants.config.insert(key.clone(), sendable.placeholder.clone());
            grants.http_secrets.push(sendable);
        }
    }
    Ok(())
}

/// The value of one secret: an environment variable of the host, or a file
/// in the secrets directory, opened beneath it so neither `..` nor a
/// symlink leads out. A file's trailing line break is not part of the
/// value.
fn read_secret(source: &SecretSource, secrets_dir: Option<&Path>) -> Result<String, String> {
    match source {
        SecretSource::Env(var) => {
            std::env::var(var).map_err(|_| format!("it reads the environment variable {var}, which is not set"))
        }
        SecretSource::File(name) => {
            let dir = secrets_dir.ok_or_else(|| {
                format!("it reads the file {name}, but no secrets directory is set (start stepbox with --secrets-dir)")
            })?;
            let cannot = |err: std::io::Error| format!("cannot read the file {name} in {}: {err}", dir.display());
            let dir = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority()).map_err(cannot)?;
            let file = dir.open(name).map_err(cannot)?;
            let mut value = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_SECRET_FILE + 1), &mut value)
                .map_err(cannot)?;
            if value.len() as u64 > MAX_SECRET_FILE {
                return Err(format!("the file {name} is over the {MAX_SECRET_FILE}-byte limit of a secret"));
            }
            let trimmed = value.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&value);
            Ok(trimmed.to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_is_read_beneath_the_secrets_directory_without_its_line_break() {
        let dir = std::env::temp_dir().join(format!("stepbox-secret-files-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/key"), "s3cret\r\n").unwrap();
        std::fs::write(dir.join("big"), vec![b'x'; MAX_SECRET_FILE as usize + 1]).unwrap();
        let file = |name: &str| read_secret(&SecretSource::File(name.into()), Some(&dir));
        assert_eq!(file("sub/key").unwrap(), "s3cret");
        assert!(file("../etc/passwd").unwrap_err().contains("cannot read the file ../etc/passwd"));
        assert!(file("/etc/passwd").unwrap_err().contains("cannot read the file /etc/passwd"));
        assert!(file("big").unwrap_err().contains("over the 65536-byte limit"));
        let none = read_secret(&SecretSource::File("sub/key".into()), None).unwrap_err();
        assert!(none.contains("no secrets directory is set (start stepbox with --secrets-dir)"), "{none}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
