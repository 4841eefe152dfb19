//! Calls to providers: over HTTP with reqwest, or in process to the simulated provider,
//! both seen by the proxy as a status and a body (whole, or a stream of bytes). Each
//! provider has its circuit breaker here.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use bursar_core::providers::{CircuitBreaker, Provider, ProviderKind, Routing};
use bursar_core::FastMap;
use futures_util::{Stream, StreamExt};
use parking_lot::Mutex;

use super::wire::Dialect;
use crate::sim::{SimAnswer, Simulator};

/// How long a connection to a provider may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Anthropic API version sent with every call.
const ANTHROPIC_VERSION: &str = "2023-06-01";

pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// The proxied endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Chat,
    Messages,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Messages => "/v1/messages",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    pub fn dialect(self) -> Dialect {
        match self {
            Endpoint::Messages => Dialect::Anthropic,
            Endpoint::Chat | Endpoint::Embeddings => Dialect::OpenAi,
        }
    }

    /// The endpoint of the same kind in another dialect (where a translated call goes).
    pub fn speaking(self, d: Dialect) -> Endpoint {
        match (self, d) {
            (Endpoint::Embeddings, _) => Endpoint::Embeddings,
            (_, Dialect::OpenAi) => Endpoint::Chat,
            (_, Dialect::Anthropic) => Endpoint::Messages,
        }
    }
}

/// Can this provider answer this endpoint (chat in either dialect is translated;
/// Anthropic has no embeddings)?
pub fn speaks(kind: ProviderKind, ep: Endpoint) -> bool {
    kind != ProviderKind::Anthropic || ep != Endpoint::Embeddings
}

/// The dialect a provider is spoken to in, for a client speaking `client`: the
/// simulated provider speaks both.
pub fn provider_dialect(kind: ProviderKind, client: Dialect) -> Dialect {
    match kind {
        ProviderKind::Simulated => client,
        ProviderKind::Openai => Dialect::OpenAi,
        ProviderKind::Anthropic => Dialect::Anthropic,
    }
}

pub enum UpBody {
    Full(Bytes),
    Stream(ByteStream),
}

pub struct UpResponse {
    pub status: StatusCode,
    pub body: UpBody,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpError {
    #[error("the provider did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the provider could not be reached: {0}")]
    Unreachable(String),
    /// The provider answered with a redirect, which is not followed: the call would go
    /// to an address nobody configured, and its body (a 307 or 308 sends it again) with
    /// it. The status and the address it names, if any (logged, not told to the caller).
    #[error("the provider answered {}, a redirect", .0.as_u16())]
    Redirected(StatusCode, Option<String>),
    /// The provider's answer (with this status) was longer than the provider's
    /// `max_answer_bytes`; it was not read.
    #[error("the provider's answer ({}) was longer than {} bytes", .0.as_u16(), .1)]
    TooLarge(StatusCode, u64),
}

/// Reads a whole answer, refusing one longer than `limit` bytes before it is held in
/// memory: by its `Content-Length` when it gives one, else as its chunks arrive. An
/// answer in one chunk is not copied.
async fn read_whole(
    mut resp: reqwest::Response,
    status: StatusCode,
    limit: u64,
) -> Result<Bytes, UpError> {
    let too_large = |len: usize| u64::try_from(len).map_or(true, |n| n > limit);
    let failed = |e: reqwest::Error| UpError::Unreachable(e.without_url().to_string());
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(UpError::TooLarge(status, limit));
    }
    let Some(first) = resp.chunk().await.map_err(failed)? else {
        return Ok(Bytes::new());
    };
    if too_large(first.len()) {
        return Err(UpError::TooLarge(status, limit));
    }
    let Some(second) = resp.chunk().await.map_err(failed)? else {
        return Ok(first);
    };
    let mut whole = first.to_vec();
    let mut next = Some(second);
    while let Some(chunk) = next {
        if too_large(whole.len().saturating_add(chunk.len())) {
            return Err(UpError::TooLarge(status, limit));
        }
        whole.extend_from_slice(&chunk);
        next = resp.chunk().await.map_err(failed)?;
    }
    Ok(Bytes::from(whole))
}

pub struct Upstreams {
    http: reqwest::Client,
    /// Each HTTP provider's URL per endpoint, parsed once.
    urls: FastMap<String, HashMap<Endpoint, reqwest::Url>>,
    sims: FastMap<String, Arc<Simulator>>,
    breakers: FastMap<String, Mutex<CircuitBreaker>>,
    keys: FastMap<String, String>,
    epoch: Instant,
}

impl Upstreams {
    /// Reads each provider's key from its environment variable, once.
    pub fn new(routing: &Routing) -> Self {
        let mut sims = FastMap::default();
        let mut breakers = FastMap::default();
        let mut keys = FastMap::default();
        let mut urls = FastMap::default();
        for p in &routing.providers {
            let parsed = [Endpoint::Chat, Endpoint::Messages, Endpoint::Embeddings]
                .into_iter()
                .filter_map(|ep| {
                    let u = reqwest::Url::parse(&format!("{}{}", p.base_url, ep.path())).ok()?;
                    Some((ep, u))
                })
                .collect();
            urls.insert(p.name.clone(), parsed);
            if p.kind == ProviderKind::Simulated {
                sims.insert(p.name.clone(), Arc::new(Simulator::new(p.simulate.clone())));
            }
            breakers.insert(
                p.name.clone(),
                Mutex::new(CircuitBreaker::new(p.circuit_failures, p.circuit_open_ms)),
            );
            if let Some(var) = &p.api_key_env {
                match std::env::var(var) {
                    Ok(k) if !k.is_empty() => {
                        keys.insert(p.name.clone(), k);
                    }
                    _ => {
                        tracing::warn!(provider = %p.name, variable = %var, "provider key variable is not set")
                    }
                }
            }
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // A provider's redirect is its answer, not followed (`UpError::Redirected`).
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(256)
            .build()
            .unwrap_or_default();
        Upstreams {
            http,
            urls,
            sims,
            breakers,
            keys,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// May a call go to this provider now (its circuit is closed, or this is the probe)?
    pub fn allow(&self, p: &Provider) -> bool {
        self.breakers
            .get(&p.name)
            .is_none_or(|b| b.lock().allow(self.now_ms()))
    }

    pub fn record(&self, p: &Provider, ok: bool) {
        if let Some(b) = self.breakers.get(&p.name) {
            let mut b = b.lock();
            if ok {
                b.record_success();
            } else {
                let was_open = b.is_open();
                b.record_failure(self.now_ms());
                if b.is_open() && !was_open {
                    tracing::warn!(provider = %p.name, "circuit opened");
                    metrics::counter!("bursar_circuit_opened_total", "provider" => p.name.clone())
                        .increment(1);
                }
            }
        }
    }

    pub fn circuit_open(&self, name: &str) -> bool {
        self.breakers.get(name).is_some_and(|b| b.lock().is_open())
    }

    /// Sends one request. A stream is returned as soon as the provider's headers arrive
    /// (the caller applies the idle timeout between chunks); anything else is read whole.
    pub async fn send(
        &self,
        p: &Provider,
        ep: Endpoint,
        body: Bytes,
        stream: bool,
    ) -> Result<UpResponse, UpError> {
        if let Some(sim) = self.sims.get(&p.name) {
            return self.simulate(sim, p, ep, &body).await;
        }
        let Some(url) = self.urls.get(&p.name).and_then(|m| m.get(&ep)) else {
            return Err(UpError::Unreachable(format!(
                "`{}` is not a valid URL",
                p.base_url
            )));
        };
        let mut req = self
            .http
            .post(url.clone())
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = self.keys.get(&p.name) {
            req = match p.kind {
                ProviderKind::Anthropic => req.header("x-api-key", key),
                _ => req.bearer_auth(key),
            };
        }
        if p.kind == ProviderKind::Anthropic {
            req = req.header("anthropic-version", ANTHROPIC_VERSION);
        }
        let resp = tokio::time::timeout(p.timeout, req.send())
            .await
            .map_err(|_| UpError::Timeout(p.timeout))?
            .map_err(|e| UpError::Unreachable(e.without_url().to_string()))?;
        let status =
            StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .map(str::to_string);
            return Err(UpError::Redirected(status, location));
        }
        if stream && status.is_success() {
            let s = resp
                .bytes_stream()
                .map(|r| r.map_err(|e| e.without_url().to_string()));
            return Ok(UpResponse {
                status,
                body: UpBody::Stream(Box::pin(s)),
            });
        }
        let bytes = tokio::time::timeout(p.timeout, read_whole(resp, status, p.max_answer_bytes))
            .await
            .map_err(|_| UpError::Timeout(p.timeout))??;
        Ok(UpResponse {
            status,
            body: UpBody::Full(bytes),
        })
    }

    async fn simulate(
        &self,
        sim: &Simulator,
        p: &Provider,
        ep: Endpoint,
        body: &[u8],
    ) -> Result<UpResponse, UpError> {
        let latency = Duration::from_millis(sim.settings.latency_ms);
        if latency >= p.timeout {
            tokio::time::sleep(p.timeout).await;
            return Err(UpError::Timeout(p.timeout));
        }
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) else {
            return Err(UpError::Unreachable(
                "the request body is not a JSON object".into(),
            ));
        };
        let answer = match ep {
            Endpoint::Embeddings => sim.embeddings(&map),
            _ => sim.chat(ep.dialect(), &map),
        };
        Ok(match answer {
            SimAnswer::Full { status, body } => UpResponse {
                status,
                body: UpBody::Full(body),
            },
            SimAnswer::Stream { events, delay } => UpResponse {
                status: StatusCode::OK,
                body: UpBody::Stream(Box::pin(crate::sim::event_stream(events, delay))),
            },
        })
    }
}
