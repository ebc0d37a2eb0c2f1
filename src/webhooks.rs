//! Webhook deliveries: the deliverer task that every `kiln serve` runs. Deliveries are
//! written by database triggers in the same transaction as the job change they announce
//! (migrations/0004_webhooks.sql); this task claims due ones (SKIP LOCKED, so any number of
//! servers can run it), POSTs them signed the Standard Webhooks way (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`, what OpenAI's
//! `client.webhooks.unwrap` verifies), records every attempt, and retries failures with
//! exponential backoff and jitter until `max_attempts`.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::store::Store;
use crate::store::webhooks::{AttemptResult, ClaimedDelivery};

/// The events kiln emits. OpenAI's three come first; `running` and `checkpoint` are kiln's.
pub const EVENT_TYPES: [&str; 5] = [
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "fine_tuning.job.running",
    "fine_tuning.job.checkpoint",
];

/// How deliveries are retried (`KILN_WEBHOOK_*`).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Attempts before a delivery is given up (`failed`).
    pub max_attempts: u32,
    /// The wait before the second attempt; each later wait is four times the one before
    /// (capped at six hours), with ±25% jitter.
    pub retry_base: Duration,
    /// How long one attempt may take (connect, send and the receiver's answer).
    pub timeout: Duration,
    /// How often to look for due deliveries when no notification arrives.
    pub poll: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            max_attempts: 8,
            retry_base: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            poll: Duration::from_secs(2),
        }
    }
}

/// Deliveries sent side by side per claim.
const BATCH: i64 = 16;
/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);

/// The wait after failed attempt `attempt` (1-based): base·4^(attempt-1), capped, ±25%.
pub fn backoff(settings: &WebhookSettings, attempt: u32) -> Duration {
    let exp = 4f64.powi(attempt.saturating_sub(1).min(16) as i32);
    let wait = (settings.retry_base.as_secs_f64() * exp).min(MAX_BACKOFF.as_secs_f64());
    let jitter = 0.75 + rand::random::<f64>() * 0.5;
    Duration::from_secs_f64(wait * jitter)
}

/// The `webhook-signature` header: one `v1,<base64>` per secret, space-separated (a rotated
/// endpoint signs with the old secret too while it is still valid). Secrets are `whsec_`
/// plus base64 key bytes; anything else is used as raw bytes, as the Standard Webhooks
/// libraries do.
pub fn signature(secrets: &[String], msg_id: &str, timestamp: i64, body: &str) -> String {
    secrets
        .iter()
        .map(|secret| {
            let key = match secret.strip_prefix("whsec_") {
                Some(b64) => STANDARD
                    .decode(b64)
                    .unwrap_or_else(|_| secret.as_bytes().to_vec()),
                None => secret.as_bytes().to_vec(),
            };
            // HMAC takes keys of any length.
            let mut mac = match Hmac::<Sha256>::new_from_slice(&key) {
                Ok(mac) => mac,
                Err(_) => unreachable!("HMAC accepts every key length"),
            };
            mac.update(format!("{msg_id}.{timestamp}.{body}").as_bytes());
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The client deliveries go out with: no redirects (a receiver cannot bounce a signed
/// event elsewhere), a bounded attempt time.
pub fn client(settings: &WebhookSettings) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("kiln-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Longest part of a failing receiver's answer kept with the attempt.
const ERROR_BODY_CHARS: usize = 300;

/// Sends one delivery once. A 2xx answer is success; anything else (another status, a
/// timeout, a refused connection) is a failed attempt with the reason recorded.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    msg_id: &str,
    secrets: &[String],
    body: &str,
) -> AttemptResult {
    let timestamp = chrono::Utc::now().timestamp();
    let started = Instant::now();
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", msg_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header(
            "webhook-signature",
            signature(secrets, msg_id, timestamp, body),
        )
        .body(body.to_owned())
        .send()
        .await;
    match response {
        Ok(r) => {
            let status = r.status();
            let error = if status.is_success() {
                None
            } else {
                let text = r.text().await.unwrap_or_default();
                let snippet: String = text.chars().take(ERROR_BODY_CHARS).collect();
                Some(format!("the receiver answered {status}: {snippet}"))
            };
            AttemptResult {
                status_code: Some(status.as_u16()),
                error,
                duration: started.elapsed(),
                succeeded: status.is_success(),
            }
        }
        Err(e) => AttemptResult {
            status_code: None,
            error: Some(describe(&e)),
            duration: started.elapsed(),
            succeeded: false,
        },
    }
}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = e.source();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {cause}")
    }
}

/// Runs the deliverer until `stop` turns true.
pub fn spawn(
    store: Store,
    settings: WebhookSettings,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(run(store, settings, stop))
}

async fn run(store: Store, settings: WebhookSettings, mut stop: watch::Receiver<bool>) {
    let client = client(&settings);
    let lease = settings.timeout + Duration::from_secs(30);
    let mut listener = None;
    loop {
        if *stop.borrow() {
            return;
        }
        if listener.is_none() {
            listener = store.webhook_listener().await.ok();
        }
        let claimed = match store.claim_webhook_deliveries(BATCH, lease).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "webhook deliverer cannot claim; retrying");
                Vec::new()
            }
        };
        let full = claimed.len() as i64 == BATCH;
        let sends = claimed
            .into_iter()
            .map(|d| deliver(&store, &client, &settings, d));
        futures_util::future::join_all(sends).await;
        if full {
            continue;
        }
        // Sleep until a notification, the poll interval, or shutdown.
        let wait = async {
            match listener.as_mut() {
                Some(l) => match tokio::time::timeout(settings.poll, l.try_recv()).await {
                    Ok(Ok(Some(_))) | Err(_) => true,
                    // Connection lost: reconnect on the next round.
                    Ok(Ok(None)) | Ok(Err(_)) => false,
                },
                None => {
                    tokio::time::sleep(settings.poll).await;
                    true
                }
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            keep = wait => if !keep { listener = None; },
        }
    }
}

async fn deliver(
    store: &Store,
    client: &reqwest::Client,
    settings: &WebhookSettings,
    d: ClaimedDelivery,
) {
    let result = send(client, &d.url, &d.id, &d.secrets, &d.payload).await;
    let attempt = d.attempts.max(1) as u32;
    metrics::counter!(
        "kiln_webhook_attempts_total",
        "outcome" => if result.succeeded { "succeeded" } else { "failed" }
    )
    .increment(1);
    if !result.succeeded {
        tracing::info!(
            delivery = %d.id,
            event = %d.event_type,
            attempt,
            error = result.error.as_deref().unwrap_or(""),
            "webhook delivery attempt failed"
        );
    }
    let retry_in = backoff(settings, attempt);
    if let Err(e) = store
        .finish_webhook_attempt(
            &d.id,
            d.attempts,
            &result,
            settings.max_attempts as i32,
            retry_in,
        )
        .await
    {
        // The claim's lease expires and another round retries it.
        tracing::warn!(delivery = %d.id, error = %e, "could not record a webhook attempt");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        // From the Standard Webhooks specification's reference libraries.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned();
        let sig = signature(
            &[secret],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_rotated_endpoint_signs_with_both_secrets() {
        let sig = signature(&[new(), new()], "msg_1", 1, "{}");
        assert_eq!(sig.split(' ').count(), 2);
        assert!(sig.split(' ').all(|s| s.starts_with("v1,")));
    }

    fn new() -> String {
        crate::store::webhooks::new_secret()
    }

    #[test]
    fn backoff_grows_fourfold_with_jitter_and_a_cap() {
        let settings = WebhookSettings {
            retry_base: Duration::from_secs(10),
            ..WebhookSettings::default()
        };
        for attempt in 1..=4 {
            let expected = 10.0 * 4f64.powi(attempt as i32 - 1);
            let got = backoff(&settings, attempt).as_secs_f64();
            assert!(
                got >= expected * 0.75 && got <= expected * 1.25,
                "attempt {attempt}: {got}"
            );
        }
        assert!(backoff(&settings, 30) <= MAX_BACKOFF.mul_f64(1.25));
    }
}
