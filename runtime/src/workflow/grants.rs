//! A step's grants as its workflow declares them: parsed and checked with
//! the workflow, held to a tenant's ceilings as one unit, and rendered once
//! per execution into the sandbox's [`Grants`], which every attempt of the
//! execution gets (and which `stepbox step run` builds from its flags).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;

use super::diagnostic::Diagnostics;
use super::spec::StepSpec;
use super::template;
use crate::sandbox::{DirGrant, Grants, HttpGrant};

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
    /// Secret name → the host environment variable holding it.
    pub secrets: BTreeMap<String, String>,
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

impl StepGrants {
    /// Parses and checks the grants of `step` (id `id`); problems go to `d`.
    pub(crate) fn from_spec(d: &mut Diagnostics, step: &StepSpec, id: &str, base_dir: &Path) -> Self {
        let mut dirs = Vec::new();
        for dir in &step.dirs {
            match dir.value.parse::<DirGrant>() {
                Ok(mut grant) => {
                    grant.host = base_dir.join(&grant.host);
                    if !grant.host.is_dir() {
                        d.on(
                            dir,
                            format!("step `{id}`: directory {} does not exist", grant.host.display()),
                            Some("host paths are relative to the workflow file".into()),
                        );
                    }
                    dirs.push(grant);
                }
                Err(message) => d.on(dir, message, None),
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
        StepGrants {
            config: step.config.clone(),
            env: step.env.clone(),
            dirs,
            secrets: step.secrets.iter().map(|(key, secret)| (key.clone(), secret.env.clone())).collect(),
            args: step.args.clone(),
            stdin: step.stdin.clone(),
            scratch: step.scratch,
            deterministic: step.deterministic,
            network,
            http,
        }
    }

    /// The grants of one execution, whose templates see `context` and whose
    /// rendered input is `input`: secrets read from the host's environment,
    /// a deterministic step's seed taken from the input. The error names
    /// the field that could not be rendered.
    pub fn render(&self, context: &minijinja::Value, input: &Value) -> Result<Grants, String> {
        let text =
            |text: &str, what: &str| template::render_text(text, context).map_err(|err| format!("`{what}`: {err}"));
        let map = |map: &BTreeMap<String, String>, what: &str| {
            map.iter()
                .map(|(key, value)| Ok((key.clone(), text(value, &format!("{what}.{key}"))?)))
                .collect::<Result<_, String>>()
        };
        let secrets = self
            .secrets
            .iter()
            .map(|(key, var)| match std::env::var(var) {
                Ok(value) => Ok((key.clone(), value)),
                Err(_) => Err(format!("secret `{key}` reads the environment variable {var}, which is not set")),
            })
            .collect::<Result<_, String>>()?;
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
            secrets,
            args: self.args.iter().map(|arg| text(arg, "args")).collect::<Result<_, String>>()?,
            scratch: self.scratch,
            deterministic,
            network: self.network.clone(),
            http: self.http.clone(),
        })
    }
}
