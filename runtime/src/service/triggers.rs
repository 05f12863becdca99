//! Runs started by triggers declared in the workflow file (`on:`): a
//! signed webhook, and cron schedules. Each start is made once: a webhook
//! by its delivery id, a schedule tick by its time, through the same
//! idempotency keys as the API's, so a replay or a restart starts nothing
//! twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::runs::Once;
use super::{Scope, Service, ServiceError};
use crate::run::Run;
use crate::workflow::template;

/// The longest delivery id, in bytes.
const MAX_DELIVERY: usize = 256;

/// A webhook request as the server received it.
pub struct Delivery<'a> {
    /// `X-Stepbox-Signature-256`: `sha256=` and the hex HMAC-SHA256 of the
    /// body under the webhook's secret.
    pub signature: Option<&'a str>,
    /// `X-Stepbox-Delivery`: the sender's id of this delivery; a replay
    /// carries the same.
    pub id: Option<&'a str>,
    /// The headers, by lowercase name, for the input template.
    pub headers: BTreeMap<String, String>,
    /// The body as sent.
    pub body: &'a [u8],
}

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under
/// `secret`; compared in constant time.
fn signed(secret: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex) = signature.strip_prefix("sha256=") else { return false };
    let Some(bytes) = decode_hex(hex) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(body);
    mac.verify_slice(&bytes).is_ok()
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

impl Service {
    /// Starts a run of `tenant`'s workflow `name` from a webhook delivery:
    /// its signature checked against the workflow's secret, its inputs from
    /// the `with` template (or the body), once per delivery id. Returns the
    /// run, and whether it is new (a replay returns the first delivery's).
    pub async fn webhook(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        delivery: Delivery<'_>,
    ) -> Result<(Run, bool), ServiceError> {
        self.accepting()?;
        // Every way the hook is not there answers alike.
        let missing = || ServiceError::NotFound(format!("no webhook at /v1/hooks/{tenant}/{name}"));
        let scope = Scope::Tenant(tenant.to_owned());
        let version = self.workflow(&scope, name, None).await.map_err(|_| missing())?;
        let deployed = self.deployed(&version).await?;
        let webhook = deployed.workflow.triggers.webhook.as_ref().ok_or_else(missing)?;
        let signature = delivery.signature.ok_or_else(|| {
            ServiceError::Unauthorized(
                "sign the body: send X-Stepbox-Signature-256: sha256=<hex HMAC-SHA256 of the body with the webhook's secret>"
                    .into(),
            )
        })?;
        if !signed(&webhook.secret, delivery.body, signature) {
            return Err(ServiceError::Unauthorized(
                "X-Stepbox-Signature-256 does not match the body: sign the exact bytes sent with the webhook's secret"
                    .into(),
            ));
        }
        let id = delivery.id.filter(|id| !id.is_empty() && id.len() <= MAX_DELIVERY).ok_or_else(|| {
            ServiceError::BadRequest {
                code: "invalid_delivery",
                message: format!(
                    "send X-Stepbox-Delivery with an id of this delivery (1 to {MAX_DELIVERY} bytes); a replay sends the same"
                ),
            }
        })?;
        let invalid = |message: String| ServiceError::Invalid { code: "invalid_inputs", message };
        let body: serde_json::Value = serde_json::from_slice(delivery.body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(delivery.body).into_owned()));
        let inputs = match &webhook.with {
            Some(with) => {
                let context = minijinja::context! {
                    body => template::to_jinja(&body),
                    headers => template::to_jinja(&delivery.headers),
                };
                template::render_value(with, &context).map_err(|err| invalid(format!("the webhook's `with`: {err}")))?
            }
            None => body,
        };
        let serde_json::Value::Object(inputs) = inputs else {
            return Err(invalid(format!("the webhook's inputs must be a JSON object, not {inputs}")));
        };
        let labels =
            BTreeMap::from([("trigger".to_owned(), "webhook".to_owned()), ("delivery".to_owned(), id.to_owned())]);
        let once = Once {
            key: format!("webhook:{name}:{id}"),
            request: format!("{:x}", Sha256::digest(delivery.body)),
            named: "delivery id",
        };
        self.start_version(&version, &inputs, labels, Some(once)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hmac_of_the_exact_body_under_the_secret_is_a_signature() {
        let secret = "0123456789abcdef";
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(b"{\"a\":1}");
        let good =
            format!("sha256={}", mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>());
        assert!(signed(secret, b"{\"a\":1}", &good));
        assert!(!signed(secret, b"{\"a\":2}", &good), "another body");
        assert!(!signed("another secret!!", b"{\"a\":1}", &good), "another secret");
        assert!(!signed(secret, b"{\"a\":1}", &good.replace("sha256=", "sha1=")));
        assert!(!signed(secret, b"{\"a\":1}", &good[..good.len() - 2]), "a cut signature");
        assert!(!signed(secret, b"{\"a\":1}", "sha256=zz"));
    }
}
