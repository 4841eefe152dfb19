//! A small client for Bursar's authorization API (and the admin API, for tools).
//!
//! ```no_run
//! # async fn demo() -> Result<(), bursar_client::Error> {
//! use bursar_client::{Authorize, Client, Settle, TokenUsage};
//! let bursar = Client::new("http://127.0.0.1:8080", "bsr_demo_alice_member_key_000001");
//! let permit = bursar
//!     .authorize(&Authorize::model("gpt-4o-mini").prompt_tokens(1200).max_tokens(300), Some("req-42"))
//!     .await?;
//! // ... call the provider with permit.max_tokens ...
//! let done = bursar
//!     .settle(&permit.authorization_id, &Settle::tokens(TokenUsage { input_tokens: 1200, cached_input_tokens: 0, output_tokens: 250 }))
//!     .await?;
//! println!("cost ${}", done.cost);
//! # Ok(()) }
//! ```
//!
//! Money travels as exact decimal strings and stays a `String` here: the client does no
//! arithmetic on it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use reqwest::Method;

/// How long one request may take before the client gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Bursar answered with an error; `code` is its stable machine-readable code.
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        retry_after_secs: Option<u64>,
    },
    #[error("request failed: {0}")]
    Http(String),
    #[error("unexpected answer: {0}")]
    Decode(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tags {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_user: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub custom: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// An authorization request; build it with [`Authorize::model`] or [`Authorize::api`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Authorize {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<u64>,
    pub tags: Tags,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

impl Authorize {
    pub fn model(model: &str) -> Self {
        Authorize {
            model: Some(model.to_string()),
            ..Default::default()
        }
    }

    pub fn api(api: &str, quantity: u64) -> Self {
        Authorize {
            api: Some(api.to_string()),
            quantity: Some(quantity),
            ..Default::default()
        }
    }

    pub fn prompt_tokens(mut self, n: u64) -> Self {
        self.prompt_tokens = Some(n);
        self
    }

    pub fn messages(mut self, m: Vec<Message>) -> Self {
        self.messages = Some(m);
        self
    }

    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    pub fn tags(mut self, tags: Tags) -> Self {
        self.tags = tags;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BudgetView {
    pub budget_id: String,
    pub scope: String,
    pub value: String,
    pub window: String,
    pub period_start: i64,
    pub limit: String,
    pub spent: String,
    pub held: String,
    pub remaining: String,
    pub level: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Permit {
    pub authorization_id: String,
    pub model: Option<String>,
    pub api: Option<String>,
    pub price_version: String,
    pub held: String,
    pub prompt_tokens: u64,
    pub max_tokens: Option<u32>,
    pub quantity: u64,
    pub expires_at: String,
    pub downgraded_from: Option<String>,
    pub shadow_denial: Option<String>,
    pub budgets: Vec<BudgetView>,
    pub replayed: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Settle {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<TokenUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_used: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u32>,
    pub estimated: bool,
}

impl Settle {
    pub fn tokens(usage: TokenUsage) -> Self {
        Settle {
            usage: Some(usage),
            ..Default::default()
        }
    }

    pub fn quantity(q: u64) -> Self {
        Settle {
            quantity: Some(q),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Void {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<TokenUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Settlement {
    pub authorization_id: String,
    pub outcome: String,
    pub cost: String,
    pub charge: String,
    pub released: String,
    pub overage: String,
    pub model_used: Option<String>,
    pub price_version: String,
    pub drift: bool,
    pub replayed: bool,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    message: String,
    code: String,
}

/// A client bound to one Bursar and one key.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base_url: &str, api_key: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(DEFAULT_TIMEOUT)
            .build()
            .unwrap_or_default();
        Client {
            base: base_url.trim_end_matches('/').to_string(),
            key: api_key.to_string(),
            http,
        }
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, Error> {
        let resp = req
            .bearer_auth(&self.key)
            .send()
            .await
            .map_err(|e| Error::Http(e.to_string()))?;
        let status = resp.status();
        let retry_after_secs = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = resp.bytes().await.map_err(|e| Error::Http(e.to_string()))?;
        if status.is_success() {
            let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(body).map_err(|e| Error::Decode(e.to_string()));
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (b.error.code, b.error.message),
            Err(_) => (
                "unknown".into(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ),
        };
        Err(Error::Api {
            status: status.as_u16(),
            code,
            message,
            retry_after_secs,
        })
    }

    /// Authorize a call; with an idempotency key, a retry returns the first answer.
    pub async fn authorize(
        &self,
        req: &Authorize,
        idempotency_key: Option<&str>,
    ) -> Result<Permit, Error> {
        let mut r = self
            .http
            .post(format!("{}/v1/authorizations", self.base))
            .json(req);
        if let Some(k) = idempotency_key {
            r = r.header("Idempotency-Key", k);
        }
        self.send(r).await
    }

    pub async fn settle(
        &self,
        authorization_id: &str,
        usage: &Settle,
    ) -> Result<Settlement, Error> {
        let r = self
            .http
            .post(format!(
                "{}/v1/authorizations/{authorization_id}/settle",
                self.base
            ))
            .json(usage);
        self.send(r).await
    }

    pub async fn void(&self, authorization_id: &str, body: &Void) -> Result<Settlement, Error> {
        let r = self
            .http
            .post(format!(
                "{}/v1/authorizations/{authorization_id}/void",
                self.base
            ))
            .json(body);
        self.send(r).await
    }

    /// Any JSON endpoint (admin tools); `body` is sent as JSON when given.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, Error> {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            r = r.json(b);
        }
        self.send(r).await
    }
}
