//! A tenant's lifecycle webhooks from this node: the events it sees go on
//! a bounded queue, and one task per tenant `POST`s them to the tenant's
//! URL in batches (up to [`MAX_BATCH`] events or [`BATCH_WINDOW`]), each
//! signed `X-Pushgate-Signature: sha256=<hex HMAC-SHA256(secret, body)>`;
//! the body carries `sent_at` (also in `X-Pushgate-Timestamp`), so the
//! signature covers the time a receiver checks against replays. A batch
//! is retried with backoff on 5xx, 429, time-outs and refused connections
//! for `retry_for`, one batch at a time so that events arrive in order;
//! meanwhile new events wait in the queue, and past `max_queue` they are
//! dropped and counted — a slow or absent receiver never holds up a
//! client, a push or a handshake.

use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::config::{WebhookConfig, WebhookEvent};
use crate::metrics::{WEBHOOK_EVENTS, WEBHOOK_RETRIES};

/// Events one `POST` carries at most.
pub const MAX_BATCH: usize = 100;
/// How long the first event of a batch waits for more.
pub const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// The longest wait between two tries of a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// One event, as the receiver gets it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub tenant: Arc<str>,
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<u64>,
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub at: u64,
}

/// One tenant's webhooks on this node (made with the tenant's settings: a
/// change of them makes a new one, and the old one sends what it has).
pub struct Webhooks {
    tenant: Arc<str>,
    config: Arc<WebhookConfig>,
    queue: WebhookQueue<Event>,
}

impl Webhooks {
    pub fn new(tenant: &str, config: WebhookConfig) -> Self {
        let config = Arc::new(config);
        let format = PushgateFormat {
            secret: config.secret.clone(),
        };
        let target = WebhookTarget {
            url: config.url.clone(),
            timeout: config.timeout,
            retry_for: config.retry_for,
            max_queue: config.max_queue,
        };
        Self {
            tenant: Arc::from(tenant),
            queue: WebhookQueue::new(tenant, target, format),
            config,
        }
    }

    /// True if the tenant asked for `event`.
    pub fn wants(&self, event: WebhookEvent) -> bool {
        self.config.events.contains(&event)
    }

    /// Queues `event` if the tenant asked for it; never waits.
    pub fn send(
        &self,
        event: WebhookEvent,
        user: &str,
        connection: Option<u64>,
        topic: Option<&str>,
        node: &str,
    ) {
        if !self.wants(event) {
            return;
        }
        self.queue.push(Event {
            kind: event.as_str(),
            tenant: self.tenant.clone(),
            user: user.to_owned(),
            connection,
            node: node.to_owned(),
            topic: topic.map(str::to_owned),
            at: crate::clock::now_micros() / 1000,
        });
    }
}

/// How a batch of events goes out: its body, and the headers that sign
/// it.
pub trait WebhookFormat: Send + Sync + 'static {
    type Event: Send + 'static;
    fn request(&self, batch: &[Self::Event]) -> (String, Vec<(&'static str, String)>);
}

/// The lifecycle webhooks' own format: `{"sent_at", "events"}`, signed
/// `X-Pushgate-Signature`.
struct PushgateFormat {
    secret: String,
}

impl WebhookFormat for PushgateFormat {
    type Event = Event;

    fn request(&self, batch: &[Event]) -> (String, Vec<(&'static str, String)>) {
        let sent_at = crate::clock::now_micros() / 1000;
        let body = serde_json::json!({ "sent_at": sent_at, "events": batch }).to_string();
        let headers = vec![
            (
                "x-pushgate-signature",
                signature(&self.secret, body.as_bytes()),
            ),
            ("x-pushgate-timestamp", sent_at.to_string()),
        ];
        (body, headers)
    }
}

/// Where a tenant's webhooks go and how patiently.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    pub url: String,
    /// How long one `POST` may take before it is retried.
    pub timeout: Duration,
    /// How long a batch is retried before it is dropped.
    pub retry_for: Duration,
    /// Events waiting to be sent, at most.
    pub max_queue: usize,
}

/// A bounded queue of one tenant's events and the task that sends them in
/// batches, in `F`'s format.
pub struct WebhookQueue<E> {
    tenant: Arc<str>,
    /// Started at the first event (a tenant is made outside the runtime too).
    queue: OnceLock<mpsc::Sender<E>>,
    start: Box<dyn Fn(mpsc::Receiver<E>) + Send + Sync>,
    max_queue: usize,
}

impl<E: Send + 'static> WebhookQueue<E> {
    pub fn new<F: WebhookFormat<Event = E>>(
        tenant: &str,
        target: WebhookTarget,
        format: F,
    ) -> Self {
        let tenant: Arc<str> = Arc::from(tenant);
        let max_queue = target.max_queue;
        let (name, target, format) = (tenant.clone(), Arc::new(target), Arc::new(format));
        Self {
            tenant,
            queue: OnceLock::new(),
            start: Box::new(move |events| {
                tokio::spawn(send_batches(
                    name.clone(),
                    target.clone(),
                    format.clone(),
                    events,
                ));
            }),
            max_queue,
        }
    }

    /// Queues `event`; never waits (past `max_queue` it is dropped and
    /// counted).
    pub fn push(&self, event: E) {
        let queue = self.queue.get_or_init(|| {
            let (queue, events) = mpsc::channel(self.max_queue);
            (self.start)(events);
            queue
        });
        if queue.try_send(event).is_err() {
            ::metrics::counter!(WEBHOOK_EVENTS, "tenant" => self.tenant.to_string(), "outcome" => "dropped")
                .increment(1);
        }
    }
}

/// The HTTP client every tenant's webhooks share.
fn client() -> &'static reqwest::Client {
    static CLIENT: LazyLock<reqwest::Client> = LazyLock::new(|| {
        // The node's TLS uses ring; the client's certificates are the
        // platform's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .user_agent(concat!("pushgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the webhook client starts")
    });
    &CLIENT
}

/// `sha256=<hex>` of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

async fn send_batches<F: WebhookFormat>(
    tenant: Arc<str>,
    target: Arc<WebhookTarget>,
    format: Arc<F>,
    mut events: mpsc::Receiver<F::Event>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = events.recv().await {
        batch.push(first);
        let until = tokio::time::Instant::now() + BATCH_WINDOW;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(until, events.recv()).await {
                Ok(Some(event)) => batch.push(event),
                Ok(None) | Err(_) => break,
            }
        }
        let (body, headers) = format.request(&batch);
        send_batch(&tenant, &target, body, &headers, batch.len()).await;
        batch.clear();
    }
}

async fn send_batch(
    tenant: &str,
    target: &WebhookTarget,
    body: String,
    headers: &[(&'static str, String)],
    events: usize,
) {
    let count = |outcome: &'static str| {
        ::metrics::counter!(WEBHOOK_EVENTS, "tenant" => tenant.to_owned(), "outcome" => outcome)
            .increment(events as u64);
    };
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut request = client()
            .post(&target.url)
            .timeout(target.timeout)
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let answer = request.body(body.clone()).send().await;
        let retry = match answer {
            Ok(answer) if answer.status().is_success() => {
                count("sent");
                return;
            }
            Ok(answer)
                if answer.status().is_client_error()
                    && answer.status() != reqwest::StatusCode::TOO_MANY_REQUESTS =>
            {
                tracing::warn!(%tenant, status = %answer.status(), events, "webhook refused: events dropped");
                count("failed");
                return;
            }
            Ok(answer) => format!("status {}", answer.status()),
            Err(err) => err.to_string(),
        };
        if started.elapsed() + backoff > target.retry_for {
            tracing::warn!(%tenant, reason = %retry, events, "webhook not delivered in retry_for: events dropped");
            count("failed");
            return;
        }
        tracing::debug!(%tenant, reason = %retry, "webhook failed, retrying");
        ::metrics::counter!(WEBHOOK_RETRIES, "tenant" => tenant.to_owned()).increment(1);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_signature_is_the_hex_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            super::signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
