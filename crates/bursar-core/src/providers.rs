//! Providers and routing for proxy mode: which upstream serves a model, the fallback
//! chain a call may walk, how retries back off, and the per-provider circuit breaker.
//!
//! Everything here is plain data and pure state machines; the HTTP calls are the
//! server's. Time comes in as milliseconds of a monotonic clock, randomness as a number.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::pricebook::{Model, PriceBook};

/// Retries of one hop after its first attempt, unless the provider says otherwise.
pub const DEFAULT_MAX_RETRIES: u32 = 2;
/// The first retry waits about this long; each further one twice as long.
pub const DEFAULT_BACKOFF_BASE_MS: u64 = 100;
/// No single wait between retries is longer than this.
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 5_000;
/// A provider that answers nothing within this time is cut.
pub const DEFAULT_TIMEOUT_MS: u64 = 120_000;
/// Consecutive failures that open a provider's circuit.
pub const DEFAULT_CIRCUIT_FAILURES: u32 = 5;
/// How long an open circuit refuses calls before one probe is let through.
pub const DEFAULT_CIRCUIT_OPEN_MS: u64 = 30_000;
/// The longest whole (non-streamed) answer read from a provider: 256 MiB. The largest
/// legitimate one is an embeddings answer for 2,048 inputs of 3,072 dimensions as
/// indented JSON numbers, about 130 MB.
pub const DEFAULT_MAX_ANSWER_BYTES: u64 = 256 << 20;

/// The wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// api.openai.com, or anything speaking its chat completions API (OpenRouter,
    /// Perplexity, Groq, vLLM, Ollama…) at `base_url`.
    Openai,
    /// api.anthropic.com's messages API.
    Anthropic,
    /// Bursar's built-in simulated provider, answering in process: no key, no network.
    Simulated,
}

/// What Bursar does with the upstream call when its client goes away mid-answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectPolicy {
    /// Cancel the upstream call and settle the tokens generated so far, counted with the
    /// tokenizer and flagged as estimated (the providers bill what they generated).
    #[default]
    Cancel,
    /// Read the upstream answer to its end and settle the provider's own usage.
    Drain,
}

/// How the simulated provider behaves. Deterministic: the same requests in the same
/// order get the same answers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimSettings {
    /// Time before the first byte of every answer.
    pub latency_ms: u64,
    /// Output tokens of an answer; capped by the request's `max_tokens` unless
    /// `ignore_max_tokens`.
    pub completion_tokens: u32,
    /// Share of requests, in percent, that fail with `error_status`: of every 100
    /// requests, the first `error_rate_percent` fail.
    pub error_rate_percent: u8,
    pub error_status: u16,
    /// Output tokens per streamed chunk, and the pause between chunks.
    pub chunk_tokens: u32,
    pub chunk_delay_ms: u64,
    /// Report this model instead of the one asked for (drift).
    pub report_model: Option<String>,
    /// Leave usage out of answers, as some providers do.
    pub omit_usage: bool,
    /// Generate `completion_tokens` whatever `max_tokens` says (a misbehaving provider).
    pub ignore_max_tokens: bool,
}

impl Default for SimSettings {
    fn default() -> Self {
        SimSettings {
            latency_ms: 0,
            completion_tokens: 64,
            error_rate_percent: 0,
            error_status: 500,
            chunk_tokens: 4,
            chunk_delay_ms: 0,
            report_model: None,
            omit_usage: false,
            ignore_max_tokens: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProvider {
    name: String,
    kind: ProviderKind,
    base_url: Option<String>,
    /// The environment variable holding the provider's key (never the key itself).
    api_key_env: Option<String>,
    /// Price-book providers (`openai`, `anthropic`, …) whose models this one serves.
    #[serde(default)]
    serves: Vec<String>,
    /// Models this one serves, by any id the price book resolves.
    #[serde(default)]
    models: Vec<String>,
    timeout_ms: Option<u64>,
    max_retries: Option<u32>,
    on_disconnect: Option<DisconnectPolicy>,
    circuit_failures: Option<u32>,
    circuit_open_ms: Option<u64>,
    max_answer_bytes: Option<u64>,
    simulate: Option<SimSettings>,
}

/// A configured upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: String,
    pub api_key_env: Option<String>,
    pub serves: Vec<String>,
    /// Canonical model ids.
    pub models: Vec<String>,
    pub timeout: Duration,
    pub max_retries: u32,
    pub on_disconnect: DisconnectPolicy,
    pub circuit_failures: u32,
    pub circuit_open_ms: u64,
    /// A whole answer longer than this is not read: the call is settled at its hold's
    /// worst case (the provider billed it) and the client told why.
    pub max_answer_bytes: u64,
    pub simulate: SimSettings,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouting {
    #[serde(default)]
    aliases: BTreeMap<String, String>,
    #[serde(default)]
    fallbacks: BTreeMap<String, Vec<String>>,
    default_provider: Option<String>,
    backoff_base_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
}

/// Providers, aliases and fallback chains, checked against the price book.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub providers: Vec<Provider>,
    /// Alias (exact text) → the model id it stands for.
    pub aliases: BTreeMap<String, String>,
    /// Canonical model id → the canonical ids to try, in order, when it fails.
    pub fallbacks: BTreeMap<Arc<str>, Vec<Arc<str>>>,
    pub default_provider: Option<String>,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

/// Why a model cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no provider is configured for model `{model}` (provider `{provider}` in the price book)")]
pub struct NoProvider {
    pub model: String,
    pub provider: String,
}

fn default_base_url(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Openai => "https://api.openai.com",
        ProviderKind::Anthropic => "https://api.anthropic.com",
        ProviderKind::Simulated => "",
    }
}

impl Routing {
    pub(crate) fn parse(
        providers: Vec<RawProvider>,
        raw: RawRouting,
        book: &PriceBook,
        p: &mut Vec<String>,
    ) -> Routing {
        let mut out = Vec::new();
        let book_providers: std::collections::BTreeSet<&str> =
            book.models().iter().map(|m| m.provider.as_str()).collect();
        for rp in providers {
            let owner = format!("provider `{}`", rp.name);
            if !crate::config::valid_id(&rp.name) {
                p.push(format!("{owner}: invalid name"));
            }
            if out.iter().any(|o: &Provider| o.name == rp.name) {
                p.push(format!("{owner}: declared twice"));
            }
            let base_url = rp
                .base_url
                .unwrap_or_else(|| default_base_url(rp.kind).to_string())
                .trim_end_matches('/')
                .to_string();
            if rp.kind != ProviderKind::Simulated
                && !(base_url.starts_with("http://") || base_url.starts_with("https://"))
            {
                p.push(format!(
                    "{owner}: base_url must start with http:// or https://"
                ));
            }
            if rp.simulate.is_some() && rp.kind != ProviderKind::Simulated {
                p.push(format!(
                    "{owner}: `simulate` settings need kind = \"simulated\""
                ));
            }
            let sim = rp.simulate.unwrap_or_default();
            if sim.error_rate_percent > 100 {
                p.push(format!(
                    "{owner}: simulate.error_rate_percent must be 0 to 100"
                ));
            }
            if !(400..=599).contains(&sim.error_status) {
                p.push(format!(
                    "{owner}: simulate.error_status must be an HTTP error (400-599)"
                ));
            }
            if sim.chunk_tokens == 0 {
                p.push(format!("{owner}: simulate.chunk_tokens must be at least 1"));
            }
            for s in &rp.serves {
                if s != "*" && !book_providers.contains(s.as_str()) {
                    p.push(format!(
                        "{owner}: serves `{s}`, which no model of the price book has as provider"
                    ));
                }
            }
            let mut models = Vec::new();
            for m in &rp.models {
                match book.resolve(m) {
                    Ok(model) => models.push(model.id.to_string()),
                    Err(e) => p.push(format!("{owner}: {e}")),
                }
            }
            if rp.timeout_ms == Some(0) {
                p.push(format!("{owner}: timeout_ms must be at least 1"));
            }
            if rp.circuit_failures == Some(0) {
                p.push(format!("{owner}: circuit_failures must be at least 1"));
            }
            if rp.max_answer_bytes == Some(0) {
                p.push(format!("{owner}: max_answer_bytes must be at least 1"));
            }
            out.push(Provider {
                name: rp.name,
                kind: rp.kind,
                base_url,
                api_key_env: rp.api_key_env,
                serves: rp.serves,
                models,
                timeout: Duration::from_millis(rp.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS)),
                max_retries: rp.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
                on_disconnect: rp.on_disconnect.unwrap_or_default(),
                circuit_failures: rp.circuit_failures.unwrap_or(DEFAULT_CIRCUIT_FAILURES),
                circuit_open_ms: rp.circuit_open_ms.unwrap_or(DEFAULT_CIRCUIT_OPEN_MS),
                max_answer_bytes: rp.max_answer_bytes.unwrap_or(DEFAULT_MAX_ANSWER_BYTES),
                simulate: sim,
            });
        }
        let mut aliases = BTreeMap::new();
        for (alias, target) in raw.aliases {
            match book.resolve(&target) {
                Ok(m) => {
                    aliases.insert(alias, m.id.to_string());
                }
                Err(e) => p.push(format!("routing alias `{alias}`: {e}")),
            }
        }
        let mut fallbacks = BTreeMap::new();
        for (from, chain) in raw.fallbacks {
            let from_id = match book.resolve(aliases.get(&from).unwrap_or(&from)) {
                Ok(m) => m.id.clone(),
                Err(e) => {
                    p.push(format!("routing fallback of `{from}`: {e}"));
                    continue;
                }
            };
            let mut ids = Vec::new();
            for to in chain {
                match book.resolve(aliases.get(&to).unwrap_or(&to)) {
                    Ok(m) if m.id == from_id || ids.contains(&m.id) => p.push(format!(
                        "routing fallback of `{from}`: `{to}` appears twice in the chain"
                    )),
                    Ok(m) => ids.push(m.id.clone()),
                    Err(e) => p.push(format!("routing fallback of `{from}`: {e}")),
                }
            }
            fallbacks.insert(from_id, ids);
        }
        if let Some(d) = &raw.default_provider {
            if !out.iter().any(|o| &o.name == d) {
                p.push(format!(
                    "routing.default_provider `{d}` is not a declared provider"
                ));
            }
        }
        Routing {
            providers: out,
            aliases,
            fallbacks,
            default_provider: raw.default_provider,
            backoff_base_ms: raw.backoff_base_ms.unwrap_or(DEFAULT_BACKOFF_BASE_MS),
            backoff_max_ms: raw.backoff_max_ms.unwrap_or(DEFAULT_BACKOFF_MAX_MS),
        }
    }

    /// The model id a request names, after aliases.
    pub fn unalias<'a>(&'a self, requested: &'a str) -> &'a str {
        self.aliases
            .get(requested)
            .map_or(requested, String::as_str)
    }

    /// The models to try, in order: the routed one, then its fallbacks.
    pub fn chain(&self, canonical: &Arc<str>) -> Vec<Arc<str>> {
        let mut v = vec![canonical.clone()];
        if let Some(f) = self.fallbacks.get(canonical) {
            v.extend(f.iter().cloned());
        }
        v
    }

    /// The provider that serves a model: one naming the model, then one serving its
    /// price-book provider (or `*`), then the default.
    pub fn provider_for(&self, model: &Model) -> Result<&Provider, NoProvider> {
        self.providers
            .iter()
            .find(|p| p.models.iter().any(|m| **m == *model.id))
            .or_else(|| {
                self.providers
                    .iter()
                    .find(|p| p.serves.iter().any(|s| s == &model.provider))
            })
            .or_else(|| {
                self.providers
                    .iter()
                    .find(|p| p.serves.iter().any(|s| s == "*"))
            })
            .or_else(|| {
                self.default_provider
                    .as_ref()
                    .and_then(|d| self.providers.iter().find(|p| &p.name == d))
            })
            .ok_or_else(|| NoProvider {
                model: model.id.to_string(),
                provider: model.provider.clone(),
            })
    }

    /// The wait before retry number `attempt` (0 for the first retry): exponential, capped,
    /// with "equal jitter" (half fixed, half drawn from `random`) so that many clients
    /// retrying together spread out.
    pub fn backoff(&self, attempt: u32, random: u64) -> Duration {
        let exp = self
            .backoff_base_ms
            .saturating_mul(1u64 << attempt.min(20))
            .min(self.backoff_max_ms);
        let half = exp / 2;
        let jitter = if half == 0 { 0 } else { random % (half + 1) };
        Duration::from_millis(half + jitter)
    }
}

/// Where a circuit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed {
        failures: u32,
    },
    Open {
        until_ms: u64,
    },
    /// One probe is in flight; other calls are refused until it ends.
    HalfOpen,
}

/// A per-provider circuit breaker: it opens after `threshold` consecutive failures,
/// refuses calls for `open_ms`, then lets one probe through; the probe's success closes
/// it, its failure opens it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreaker {
    pub threshold: u32,
    pub open_ms: u64,
    pub state: CircuitState,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, open_ms: u64) -> Self {
        CircuitBreaker {
            threshold: threshold.max(1),
            open_ms,
            state: CircuitState::Closed { failures: 0 },
        }
    }

    /// May a call go to the provider now? Turns an open circuit whose time is up into
    /// half-open, admitting this call as the probe.
    pub fn allow(&mut self, now_ms: u64) -> bool {
        match self.state {
            CircuitState::Closed { .. } => true,
            CircuitState::Open { until_ms } if now_ms >= until_ms => {
                self.state = CircuitState::HalfOpen;
                true
            }
            CircuitState::Open { .. } | CircuitState::HalfOpen => false,
        }
    }

    pub fn record_success(&mut self) {
        self.state = CircuitState::Closed { failures: 0 };
    }

    pub fn record_failure(&mut self, now_ms: u64) {
        self.state = match self.state {
            CircuitState::Closed { failures } if failures + 1 < self.threshold => {
                CircuitState::Closed {
                    failures: failures + 1,
                }
            }
            _ => CircuitState::Open {
                until_ms: now_ms.saturating_add(self.open_ms),
            },
        };
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.state, CircuitState::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_circuit_opens_after_consecutive_failures_and_closes_after_a_good_probe() {
        let mut c = CircuitBreaker::new(3, 1_000);
        c.record_failure(0);
        c.record_success();
        c.record_failure(10);
        c.record_failure(20);
        assert!(
            c.allow(30),
            "two failures in a row do not open a threshold of 3"
        );
        c.record_failure(30);
        assert_eq!(c.state, CircuitState::Open { until_ms: 1_030 });
        assert!(!c.allow(1_029));
        assert!(c.allow(1_030), "the probe goes through when the time is up");
        assert!(!c.allow(1_031), "only one probe at a time");
        c.record_failure(1_040);
        assert_eq!(c.state, CircuitState::Open { until_ms: 2_040 });
        assert!(c.allow(2_040));
        c.record_success();
        assert!(c.allow(2_041) && !c.is_open());
    }

    #[test]
    fn backoff_grows_is_capped_and_jitters_within_half() {
        let r = Routing {
            backoff_base_ms: 100,
            backoff_max_ms: 1_000,
            ..Routing::default()
        };
        assert_eq!(r.backoff(0, 0), Duration::from_millis(50));
        assert_eq!(r.backoff(0, 50), Duration::from_millis(100));
        assert_eq!(r.backoff(1, 0), Duration::from_millis(100));
        assert_eq!(r.backoff(2, 7), Duration::from_millis(207));
        // Capped at 1 s: half fixed, half jitter.
        assert_eq!(r.backoff(30, 0), Duration::from_millis(500));
        assert_eq!(r.backoff(30, 500), Duration::from_millis(1_000));
        for a in 0..40 {
            for rnd in [0, 1, 99, 12_345, u64::MAX] {
                let d = r.backoff(a, rnd);
                assert!(d <= Duration::from_millis(1_000) && d >= Duration::from_millis(50));
            }
        }
    }
}
