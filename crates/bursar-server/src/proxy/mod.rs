//! Proxy mode: OpenAI- and Anthropic-compatible endpoints that run the whole enforcement
//! flow around each call.
//!
//! One call: read and check the body (refused before any money is held) → identify the
//! key → route the model (aliases) → for each hop of its fallback chain: authorize at
//! that model's price (plan, task, class, rate limits, budgets, shaping) → pick the
//! provider (circuit breaker) → send, retrying 429/5xx/timeouts with backoff → on
//! failure void at $0 and try the next hop → settle from the provider's usage (or from
//! counted tokens, flagged estimated) → answer.
//!
//! A provider that speaks the other dialect (an Anthropic provider behind
//! `/v1/chat/completions`, an OpenAI-style one behind `/v1/messages`) is reached through
//! [`translate`]: the request, the answer, its errors and its stream are rewritten, and
//! the usage is read from the provider's own answer first.
//!
//! The call runs on the request's task, and goes on in a task of its own if the client
//! goes away ([`Detachable`]), so nothing cancels it half way: a non-streamed answer is
//! still settled, and a stream is settled by the provider's [`DisconnectPolicy`].

mod egress;
pub mod translate;
pub mod upstream;
pub mod wire;

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bursar_core::engine::{
    AuthorizeRequest, Caller, ExpiryPolicy, Metered, Permit, Prompt, Settlement, Usage,
};
use bursar_core::ledger::Tags;
use bursar_core::pricebook::{Model, PriceBook, TokenUsage, TokenizerKind};
use bursar_core::providers::{DisconnectPolicy, Provider};
use bursar_core::tokens;
use bursar_core::Money;
use bytes::BytesMut;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use bursar_store::Ticket;

use crate::error::ApiError;
use crate::Services;
use translate::{Data, StreamTranslator};
use upstream::{provider_dialect, speaks, Endpoint, UpBody, UpError, UpResponse};
use wire::{Dialect, Fields, Seen};

/// Events buffered between the provider and a slow client before the provider is made
/// to wait: a stream is passed through, never held whole.
const STREAM_BUFFER_EVENTS: usize = 32;

/// An error in the caller's dialect.
pub struct ProxyError {
    pub dialect: Dialect,
    pub error: ApiError,
}

impl ProxyError {
    fn new(dialect: Dialect, error: impl Into<ApiError>) -> Self {
        ProxyError {
            dialect,
            error: error.into(),
        }
    }
}

/// Anthropic's error types, by status.
pub(crate) fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        match self.dialect {
            Dialect::OpenAi => self.error.into_response(),
            Dialect::Anthropic => {
                let e = self.error;
                let mut resp = e.clone().into_response();
                let message = if e.status.is_server_error() && e.code != "store_unavailable" {
                    "internal error".to_string()
                } else {
                    e.message.clone()
                };
                let body = json!({"type": "error", "error": {
                    "type": anthropic_type(e.status), "message": message, "code": e.code}});
                *resp.body_mut() = Body::from(body.to_string());
                resp.headers_mut().remove(header::CONTENT_LENGTH);
                resp
            }
        }
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
}

/// A model whose provider does not speak the endpoint called.
fn wrong_dialect(model: &str, provider: &Provider, ep: Endpoint) -> ApiError {
    invalid(format!(
        "model `{model}` is served by provider `{}`, which does not speak {}; call it through its own API",
        provider.name,
        ep.path()
    ))
}

async fn read_body(s: &Services, body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, s.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the request body is larger than {} bytes (or was cut off)",
                    s.max_body_bytes
                ),
            )
        })
}

/// Tags from `x-bursar-*` headers: workflow, campaign, agent, feature, task, end-user,
/// and `x-bursar-tag-NAME` for custom tags.
fn tags_from(headers: &HeaderMap, end_user: Option<String>) -> Result<Tags, ApiError> {
    let mut tags = Tags {
        end_user,
        ..Tags::default()
    };
    for (name, value) in headers {
        let Some(field) = name.as_str().strip_prefix("x-bursar-") else {
            continue;
        };
        let v = value
            .to_str()
            .map_err(|_| invalid(format!("header `{name}` must be visible ASCII")))?
            .to_string();
        if v.is_empty() || v.len() > 200 {
            return Err(invalid(format!(
                "header `{name}` must have 1 to 200 characters"
            )));
        }
        match field {
            "workflow" => tags.workflow = Some(v),
            "campaign" => tags.campaign = Some(v),
            "agent" => tags.agent = Some(v),
            "feature" => tags.feature = Some(v),
            "task" => tags.task = Some(v),
            "end-user" => tags.end_user = Some(v),
            other => {
                if let Some(tag) = other.strip_prefix("tag-") {
                    tags.custom.insert(tag.to_string(), v);
                }
            }
        }
    }
    Ok(tags)
}

/// The names of Bursar's headers, made once (`from_static` checks a name each time it
/// runs).
mod names {
    use axum::http::HeaderName;

    pub(super) static AUTHORIZATION_ID: HeaderName =
        HeaderName::from_static("x-bursar-authorization-id");
    pub(super) static MODEL: HeaderName = HeaderName::from_static("x-bursar-model");
    pub(super) static HELD: HeaderName = HeaderName::from_static("x-bursar-held");
    pub(super) static COST: HeaderName = HeaderName::from_static("x-bursar-cost");
    pub(super) static CHARGE: HeaderName = HeaderName::from_static("x-bursar-charge");
    pub(super) static REMAINING: HeaderName = HeaderName::from_static("x-bursar-remaining");
    pub(super) static CACHE: HeaderName = HeaderName::from_static("x-bursar-cache");
    pub(super) static COST_SAVED: HeaderName = HeaderName::from_static("x-bursar-cost-saved");
    pub(super) static LIMIT_REQUESTS: HeaderName =
        HeaderName::from_static("x-ratelimit-limit-requests");
    pub(super) static REMAINING_REQUESTS: HeaderName =
        HeaderName::from_static("x-ratelimit-remaining-requests");
    pub(super) static RESET_REQUESTS: HeaderName =
        HeaderName::from_static("x-ratelimit-reset-requests");
    pub(super) static LIMIT_TOKENS: HeaderName =
        HeaderName::from_static("x-ratelimit-limit-tokens");
    pub(super) static REMAINING_TOKENS: HeaderName =
        HeaderName::from_static("x-ratelimit-remaining-tokens");
    pub(super) static RESET_TOKENS: HeaderName =
        HeaderName::from_static("x-ratelimit-reset-tokens");
}

/// The values of Bursar's own headers on one answer, written one after another into
/// one buffer and handed out as slices of it: two allocations for an answer's ten values
/// (the buffer and, at the first slice, its shared count), not one or two each, and no
/// `core::fmt` between. Text that is no valid header value (a model name, say) becomes
/// `-`.
struct HeaderValues(BytesMut);

impl HeaderValues {
    /// Room for the longest answer's values (an id, a model name, five amounts, six
    /// rate-limit figures) without growing.
    fn new() -> Self {
        HeaderValues(BytesMut::with_capacity(256))
    }

    /// The bytes written since the last value, as a value.
    fn take(&mut self) -> HeaderValue {
        HeaderValue::from_maybe_shared(self.0.split().freeze())
            .unwrap_or(HeaderValue::from_static("-"))
    }

    fn text(&mut self, t: &[u8]) -> HeaderValue {
        self.0.extend_from_slice(t);
        self.take()
    }

    fn money(&mut self, m: Money) -> HeaderValue {
        m.with_text(|t| self.text(t))
    }

    fn id(&mut self, id: uuid::Uuid) -> HeaderValue {
        self.text(
            id.hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .as_bytes(),
        )
    }

    fn number(&mut self, n: u64, unit: &str) -> HeaderValue {
        self.0
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        self.0.extend_from_slice(unit.as_bytes());
        self.take()
    }
}

/// Bursar's headers on a proxied answer: the authorization, the model routed, what was
/// held (and, once settled, the cost, the charge and what is left), and the caller's rate
/// limits in OpenAI's `x-ratelimit-*` form.
fn add_headers(h: &mut HeaderMap, permit: &Permit, settled: Option<&Settlement>) {
    // Grown once, not once for every few headers.
    h.reserve(6 + 3 * permit.rate_limits.len().min(2));
    let mut v = HeaderValues::new();
    h.insert(
        names::AUTHORIZATION_ID.clone(),
        v.id(permit.authorization_id),
    );
    if let Some(m) = &permit.model {
        h.insert(names::MODEL.clone(), v.text(m.as_bytes()));
    }
    h.insert(names::HELD.clone(), v.money(permit.held));
    let released_extra = settled.map_or(Money::ZERO, |st| permit.held.saturating_sub(st.cost));
    if let Some(st) = settled {
        h.insert(names::COST.clone(), v.money(st.cost));
        h.insert(names::CHARGE.clone(), v.money(st.charge));
    }
    if let Some(remaining) = permit.budgets.iter().map(|b| b.remaining).min() {
        let now = remaining.saturating_add(released_extra).max(Money::ZERO);
        h.insert(names::REMAINING.clone(), v.money(now));
    }
    // The most restrictive limit of each dimension is the one a client must respect.
    let mut tightest: [Option<&bursar_core::engine::RateStanding>; 2] = [None, None];
    for r in &permit.rate_limits {
        let slot = &mut tightest[usize::from(r.dimension != "requests")];
        match slot {
            Some(t) if r.remaining >= t.remaining => {}
            _ => *slot = Some(r),
        }
    }
    for r in tightest.into_iter().flatten() {
        let (limit, remaining, reset) = match r.dimension.as_ref() {
            "requests" => (
                &names::LIMIT_REQUESTS,
                &names::REMAINING_REQUESTS,
                &names::RESET_REQUESTS,
            ),
            _ => (
                &names::LIMIT_TOKENS,
                &names::REMAINING_TOKENS,
                &names::RESET_TOKENS,
            ),
        };
        h.insert(limit.clone(), v.number(u64::from(r.limit_per_minute), ""));
        h.insert(remaining.clone(), v.number(r.remaining, ""));
        h.insert(reset.clone(), v.number(r.reset_ms, "ms"));
    }
}

/// One proxied call, as the future that runs it sees it.
struct Call {
    s: Arc<Services>,
    caller: Caller,
    tenant: String,
    ep: Endpoint,
    body: wire::RequestBody,
    /// The model the client asked for (after aliases), sent upstream on the first hop.
    client_model: String,
    chain: Vec<Arc<str>>,
    /// What was read of the request: the prompt to count with each hop's tokenizer, the
    /// output cap, streaming.
    req: wire::ChatRequest,
    tags: Tags,
    started: Instant,
    /// Where to keep a good answer, and until when (tenants with the cache on).
    cache: Option<([u8; 32], chrono::DateTime<chrono::Utc>)>,
}

/// What a hop's attempts came to.
enum HopEnd {
    /// A 2xx answer.
    Answer(UpResponse),
    /// A 4xx other than 429: the request itself is wrong; passed back, not retried.
    Refused(UpResponse),
    /// 429, 5xx, timeouts and unreachable providers, after every retry.
    Failed(ApiError),
    /// A 2xx answer longer than the provider's `max_answer_bytes`, not read: the
    /// provider billed a call whose usage Bursar cannot see.
    Unread(u64),
}

fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

impl Call {
    fn dialect(&self) -> Dialect {
        self.ep.dialect()
    }

    fn prompt_tokens(&self, model: &Model) -> u64 {
        let n = match self.ep {
            Endpoint::Embeddings => self
                .req
                .texts
                .iter()
                .map(|t| tokens::count_text(model.tokenizer, t))
                .sum(),
            _ => tokens::count_messages(model.tokenizer, &self.req.messages),
        };
        n + self.req.extra_prompt_tokens
    }

    /// Voids a hold that reached no provider, or whose provider failed or refused: the
    /// provider bills nothing for those.
    async fn void_unbilled(&self, permit: &Permit, reason: &str) {
        let r = self
            .s
            .finish(&self.tenant, permit.authorization_id, None, false)
            .await;
        match r {
            Ok(Ok((_, ticket))) => {
                if let Err(e) = ticket.wait().await {
                    tracing::error!(error = %e, "voiding a hold failed; it will expire");
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, reason, "voiding a hold failed"),
            Err(e) => tracing::error!(error = %e, reason, "voiding a hold failed; it will expire"),
        }
    }

    async fn settle(
        &self,
        permit: &Permit,
        usage: TokenUsage,
        reported: Option<String>,
        estimated: bool,
        provider_time: Duration,
    ) -> Result<(Settlement, Ticket), ApiError> {
        // A reported model the price book does not know cannot be priced: the call is
        // priced as routed, and the mismatch is logged and counted. A known one is
        // passed on by its canonical id.
        let model_used = reported.and_then(|m| {
            let known = self.s.engine.price_book().resolve(&m).ok();
            if known.is_none() {
                tracing::warn!(reported = %m, "provider reported a model the price book does not know");
                metrics::counter!("bursar_unknown_reported_model_total").increment(1);
            }
            known.map(|k| k.id.clone())
        });
        let usage = Usage {
            tokens: usage,
            quantity: 0,
            model_used,
            latency_ms: Some(u32::try_from(provider_time.as_millis()).unwrap_or(u32::MAX)),
            estimated,
        };
        let (settlement, ticket) = self
            .s
            .finish(&self.tenant, permit.authorization_id, Some(usage), true)
            .await??;
        if settlement.drift {
            metrics::counter!("bursar_model_drift_total").increment(1);
        }
        if settlement.overage > Money::ZERO {
            metrics::counter!("bursar_overages_total").increment(1);
        }
        if estimated {
            metrics::counter!("bursar_estimated_settlements_total").increment(1);
        }
        Ok((settlement, ticket))
    }

    /// The body sent upstream for this hop, in the provider's dialect `up` (translated
    /// when the client speaks the other one).
    ///
    /// The output cap goes in the field the client used. When the client gave none (or
    /// spoke Anthropic's dialect to an OpenAI-style provider), OpenAI's own models get
    /// `max_completion_tokens` (its reasoning and GPT-5 models refuse `max_tokens`);
    /// every other provider gets `max_tokens`.
    fn upstream_body(
        &self,
        hop: usize,
        permit: &Permit,
        routed_model: &Model,
        up: Dialect,
    ) -> Result<Bytes, ApiError> {
        let client = self.dialect();
        let model = if hop == 0 && permit.downgraded_from.is_none() {
            self.client_model.clone()
        } else {
            permit.model.as_deref().unwrap_or_default().to_string()
        };
        // The fields Bursar sets: the model, the output cap, the stream's options.
        let mut set: [Option<(&'static str, Value)>; 3] =
            [Some(("model", Value::String(model))), None, None];
        if self.ep != Endpoint::Embeddings {
            if let Some(mt) = permit.max_tokens {
                let field = if up == Dialect::Anthropic {
                    "max_tokens"
                } else if client == Dialect::OpenAi && self.req.max_tokens.is_some() {
                    self.req.max_tokens_field
                } else if routed_model.provider == "openai" {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                set[1] = Some((field, json!(mt)));
            }
            if self.req.stream && up == Dialect::OpenAi {
                let mut opts = match self.body.field("stream_options")?.map(Cow::into_owned) {
                    Some(Value::Object(o)) => o,
                    _ => Map::new(),
                };
                opts.insert("include_usage".into(), Value::Bool(true));
                set[2] = Some(("stream_options", Value::Object(opts)));
            }
        }
        let bytes = if up == client || self.ep == Endpoint::Embeddings {
            // The client's own body: each field as the client wrote it, but those Bursar
            // sets and those it counted from a parsed value (sent as parsed).
            self.body.with_fields(
                self.req
                    .counted
                    .iter()
                    .chain(set.iter().flatten())
                    .map(|(k, v)| (*k, v)),
            )
        } else {
            let mut body = translate::request(client, up, &self.body.to_map()?)?;
            for (k, v) in set.into_iter().flatten() {
                body.insert(k.into(), v);
            }
            serde_json::to_vec(&Value::Object(body))
        };
        bytes.map(Bytes::from).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the upstream body could not be written: {e}"),
            )
        })
    }

    /// Sends one hop, retrying what may succeed on a second try.
    async fn attempts(
        &self,
        provider: &Provider,
        up: Dialect,
        body: Bytes,
        provider_time: &mut Duration,
    ) -> HopEnd {
        let mut attempt = 0u32;
        loop {
            let t0 = Instant::now();
            let r = self
                .s
                .proxy
                .upstreams
                .send(
                    provider,
                    self.ep.speaking(up),
                    body.clone(),
                    self.req.stream,
                )
                .await;
            *provider_time += t0.elapsed();
            // The failure, and whether a retry may mend it.
            let (failure, may_retry) = match r {
                Ok(resp) if resp.status.is_success() => return HopEnd::Answer(resp),
                Ok(resp) if !retryable(resp.status) => return HopEnd::Refused(resp),
                Ok(resp) => (
                    ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "provider_error",
                        format!(
                            "provider `{}` answered {}",
                            provider.name,
                            resp.status.as_u16()
                        ),
                    ),
                    true,
                ),
                Err(UpError::Timeout(t)) => (
                    ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "provider_timeout",
                        format!("provider `{}` did not answer within {t:?}", provider.name),
                    ),
                    true,
                ),
                // The same request gets the same redirect.
                Err(UpError::Redirected(status, location)) => {
                    tracing::warn!(provider = %provider.name, location = location.as_deref().unwrap_or("none"), "the provider answered with a redirect, not followed: its base_url should be the address it names");
                    (
                        ApiError::new(
                            StatusCode::BAD_GATEWAY,
                            "provider_redirect",
                            format!(
                                "provider `{}` answered {}, a redirect, which Bursar does not follow: its base_url needs correcting",
                                provider.name,
                                status.as_u16()
                            ),
                        ),
                        false,
                    )
                }
                Err(UpError::TooLarge(status, limit)) if status.is_success() => {
                    return HopEnd::Unread(limit);
                }
                // An error answer too long to read: the same request would get it again.
                Err(e @ UpError::TooLarge(..)) => (
                    ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "provider_answer_too_large",
                        format!("provider `{}`: {e}", provider.name),
                    ),
                    false,
                ),
                Err(e @ UpError::Unreachable(_)) => (
                    ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "provider_unreachable",
                        format!("provider `{}`: {e}", provider.name),
                    ),
                    true,
                ),
            };
            metrics::counter!("bursar_provider_failures_total", "provider" => provider.name.clone())
                .increment(1);
            if !may_retry || attempt >= provider.max_retries {
                return HopEnd::Failed(failure);
            }
            let wait = self.s.proxy.routing.backoff(attempt, rand::random());
            tracing::info!(provider = %provider.name, attempt, ?wait, code = failure.code, "retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Runs the call; the answer (or the start of a stream) goes out through `reply`.
    async fn run(self, reply: oneshot::Sender<Result<Response, ApiError>>) {
        let book = self.s.engine.price_book().clone();
        let mut last_failure: Option<ApiError> = None;
        for (hop, hop_model) in self.chain.iter().enumerate() {
            let Ok(model) = book.resolve(hop_model) else {
                continue;
            };
            let metered = Metered::Model {
                model: hop_model.clone(),
                prompt: Prompt::Tokens(self.prompt_tokens(model)),
                max_tokens: self.req.max_tokens,
            };
            let req = AuthorizeRequest {
                metered,
                tags: self.tags.clone(),
                idempotency_key: None,
                fingerprint: None,
                ttl: None,
            };
            let permit = match self.s.authorize(&self.caller, req).await {
                Ok(permit) => permit,
                Err(denial) => {
                    metrics::counter!("bursar_decisions_total", "outcome" => "deny", "code" => denial.code)
                        .increment(1);
                    let _ = reply.send(Err(denial));
                    return;
                }
            };
            fixed_metric!(
                counter!("bursar_decisions_total", "outcome" => "permit", "code" => "ok")
            )
            .increment(1);
            let routed = permit.model.clone().unwrap_or_default();
            let Ok(routed_model) = book.resolve(&routed) else {
                self.void_unbilled(&permit, "routed model vanished").await;
                continue;
            };
            let provider = match self.s.proxy.routing.provider_for(routed_model) {
                Ok(p) => p,
                Err(e) => {
                    self.void_unbilled(&permit, "no provider").await;
                    last_failure = Some(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no_provider",
                        e.to_string(),
                    ));
                    continue;
                }
            };
            if !speaks(provider.kind, self.ep) {
                self.void_unbilled(&permit, "wrong dialect").await;
                let _ = reply.send(Err(wrong_dialect(&routed, provider, self.ep)));
                return;
            }
            let up = provider_dialect(provider.kind, self.dialect());
            if !self.s.proxy.upstreams.allow(provider) {
                self.void_unbilled(&permit, "circuit open").await;
                last_failure = Some(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "provider_circuit_open",
                    format!(
                        "provider `{}` is failing; its circuit is open",
                        provider.name
                    ),
                ));
                continue;
            }
            let body = match self.upstream_body(hop, &permit, routed_model, up) {
                Ok(b) => b,
                Err(e) => {
                    self.void_unbilled(&permit, "untranslatable request").await;
                    let _ = reply.send(Err(e));
                    return;
                }
            };
            let mut provider_time = Duration::ZERO;
            match self.attempts(provider, up, body, &mut provider_time).await {
                HopEnd::Answer(resp) => {
                    self.s.proxy.upstreams.record(provider, true);
                    if hop > 0 {
                        metrics::counter!("bursar_fallbacks_total").increment(1);
                    }
                    match resp.body {
                        UpBody::Full(bytes) => {
                            self.finish_whole(
                                &permit,
                                routed_model,
                                up,
                                bytes,
                                provider_time,
                                reply,
                            )
                            .await;
                        }
                        UpBody::Stream(stream) => {
                            Box::pin(self.pump(
                                permit,
                                routed_model,
                                provider,
                                stream,
                                provider_time,
                                reply,
                            ))
                            .await;
                        }
                    }
                    return;
                }
                HopEnd::Refused(resp) => {
                    self.s.proxy.upstreams.record(provider, true);
                    self.void_unbilled(&permit, "provider refused the request")
                        .await;
                    let bytes = match resp.body {
                        UpBody::Full(b) => {
                            translate::error_body(up, self.dialect(), resp.status, &b)
                        }
                        UpBody::Stream(_) => Bytes::new(),
                    };
                    let mut r = (resp.status, bytes).into_response();
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    let _ = reply.send(Ok(r));
                    return;
                }
                HopEnd::Unread(limit) => {
                    self.s.proxy.upstreams.record(provider, false);
                    self.settle_unread(
                        &permit,
                        routed_model,
                        provider,
                        limit,
                        provider_time,
                        reply,
                    )
                    .await;
                    return;
                }
                HopEnd::Failed(e) => {
                    self.s.proxy.upstreams.record(provider, false);
                    self.void_unbilled(&permit, "provider failed").await;
                    last_failure = Some(e);
                }
            }
        }
        let _ = reply.send(Err(last_failure.unwrap_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_provider",
                "no model of the chain could be routed",
            )
        })));
    }

    fn counted_usage(
        &self,
        permit: &Permit,
        model: &Model,
        seen: &Seen,
        counted: u64,
    ) -> TokenUsage {
        let input = seen.usage.map_or(permit.prompt_tokens, |u| u.input_tokens);
        let output = if counted > 0 || seen.text.is_empty() {
            counted
        } else {
            tokens::count_text(model.tokenizer, &seen.text)
        };
        TokenUsage {
            input_tokens: input,
            cached_input_tokens: seen.usage.map_or(0, |u| u.cached_input_tokens),
            output_tokens: output,
        }
    }

    /// An answer too long to read: the provider billed it, so the call is settled at its
    /// hold's worst case (the prompt and every output token the hold pays for), flagged
    /// as estimated, and the client told. The next hop is not tried: it would spend again.
    async fn settle_unread(
        &self,
        permit: &Permit,
        model: &Model,
        provider: &Provider,
        limit: u64,
        provider_time: Duration,
        reply: oneshot::Sender<Result<Response, ApiError>>,
    ) {
        tracing::warn!(provider = %provider.name, limit, "an answer longer than max_answer_bytes was not read; settled at its hold");
        let worst = u64::from(permit.max_tokens.unwrap_or(0));
        let usage = self.counted_usage(permit, model, &Seen::default(), worst);
        let result = match self.settle(permit, usage, None, true, provider_time).await {
            Ok((settlement, ticket)) => match ticket.wait().await {
                Ok(()) => Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "provider_answer_too_large",
                    format!(
                        "provider `{}` answered with more than {limit} bytes (its max_answer_bytes), which Bursar did not read; the call was settled at ${}, its hold's worst case",
                        provider.name, settlement.cost
                    ),
                )),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e),
        };
        self.overhead(provider_time);
        let _ = reply.send(result);
    }

    fn overhead(&self, provider_time: Duration) {
        fixed_metric!(histogram!("bursar_proxy_overhead_seconds")).record(
            self.started
                .elapsed()
                .saturating_sub(provider_time)
                .as_secs_f64(),
        );
    }

    /// A whole answer: read its usage, settle, answer with Bursar's headers.
    ///
    /// The hold is durable before the provider is called, so when an expired hold is
    /// charged (the default policy) the answer need not wait for the settle entry to be
    /// durable: a crash in between charges the hold by policy, never nothing. Under the
    /// `release` policy the answer waits.
    async fn finish_whole(
        &self,
        permit: &Permit,
        model: &Model,
        up: Dialect,
        mut bytes: Bytes,
        provider_time: Duration,
        reply: oneshot::Sender<Result<Response, ApiError>>,
    ) {
        // An answer in the client's own dialect goes back as it came: only its usage and
        // model are read. One that lacks a usage, or is translated, is read whole.
        let head = (up == self.dialect())
            .then(|| wire::read_answer_head(up, &bytes))
            .flatten();
        let (seen, valid) = match head {
            Some(seen) => (seen, true),
            None => {
                let mut seen = Seen::default();
                let parsed = serde_json::from_slice::<Value>(&bytes).ok();
                if let Some(v) = &parsed {
                    wire::read_answer(up, v, &mut seen);
                }
                // The usage was read in the provider's dialect; the client gets its own.
                if let Some(v) = parsed.as_ref().filter(|_| up != self.dialect()) {
                    bytes = Bytes::from(translate::answer(up, self.dialect(), v).to_string());
                }
                (seen, parsed.is_some())
            }
        };
        let (usage, estimated) = match (seen.usage, valid) {
            (Some(u), _) => (u, false),
            (None, true) => (self.counted_usage(permit, model, &seen, 0), true),
            // A malformed answer is settled on its whole text counted as output.
            (None, false) => {
                let text = String::from_utf8_lossy(&bytes);
                let mut u = self.counted_usage(permit, model, &seen, 0);
                u.output_tokens = tokens::count_text(model.tokenizer, &text)
                    .min(u64::from(permit.max_tokens.unwrap_or(u32::MAX)));
                (u, true)
            }
        };
        let (settlement, ticket) = match self
            .settle(permit, usage, seen.model.clone(), estimated, provider_time)
            .await
        {
            Ok(x) => x,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let answer_first = self.s.engine.config().expiry_policy == ExpiryPolicy::ChargeHold;
        let mut ticket = Some(ticket);
        if !answer_first {
            if let Some(t) = ticket.take() {
                if let Err(e) = t.wait().await {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
            }
        }
        let result = if !valid {
            Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "provider_malformed_answer",
                format!(
                    "the provider's answer was not valid JSON; it was settled at ${} from counted tokens",
                    settlement.cost
                ),
            ))
        } else {
            let mut resp = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                bytes.clone(),
            )
                .into_response();
            add_headers(resp.headers_mut(), permit, Some(&settlement));
            if let Some((key, expires_at)) = self.cache {
                if !estimated {
                    let model = settlement
                        .model_used
                        .clone()
                        .or_else(|| permit.model.clone())
                        .unwrap_or_default();
                    let answer = Cached {
                        body: bytes,
                        model,
                        usage,
                        expires_at,
                    };
                    // Kept for every instance first, so a call that follows this one
                    // anywhere finds it.
                    if let Some(redis) = &self.s.limiter {
                        let ttl = (expires_at - self.s.clock.now())
                            .to_std()
                            .unwrap_or_default();
                        if let Err(e) = Box::pin(redis.cache_put(&key, &answer.encode(), ttl)).await
                        {
                            tracing::warn!(error = %e, "an answer was not kept in Redis; this instance keeps it");
                        }
                    }
                    self.s.proxy.cache.insert(key, Arc::new(answer));
                }
                resp.headers_mut()
                    .insert(names::CACHE.clone(), HeaderValue::from_static("miss"));
            }
            Ok(resp)
        };
        self.overhead(provider_time);
        let _ = reply.send(result);
        if let Some(t) = ticket {
            if let Err(e) = t.wait().await {
                tracing::error!(error = %e, "a settle entry was not stored; its hold will expire and be charged");
            }
        }
    }

    /// Passes a stream through event by event, counting what it generates, and settles
    /// when it ends, is cut, fails, or its client goes away.
    async fn pump(
        &self,
        permit: Permit,
        model: &Model,
        provider: &Provider,
        mut stream: upstream::ByteStream,
        provider_time: Duration,
        reply: oneshot::Sender<Result<Response, ApiError>>,
    ) {
        let dialect = self.dialect();
        let up = provider_dialect(provider.kind, dialect);
        let mut translator = StreamTranslator::new(up, dialect, self.req.client_wants_usage);
        let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER_EVENTS);
        let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        }));
        let mut resp = (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response();
        add_headers(resp.headers_mut(), &permit, None);
        if reply.send(Ok(resp)).is_err() {
            tracing::info!("client left before the stream started");
        }
        self.overhead(provider_time);

        let cap = u64::from(permit.max_tokens.unwrap_or(u32::MAX));
        let t0 = Instant::now();
        let mut splitter = wire::SseSplitter::default();
        let mut seen = Seen::default();
        let mut counted = 0u64;
        let mut client_gone = false;
        // Why the stream ended early, if it did.
        let mut cut: Option<(&'static str, String)> = None;
        'read: loop {
            let chunk = match tokio::time::timeout(provider.timeout, stream.next()).await {
                Err(_) => {
                    cut = Some((
                        "provider_timeout",
                        format!(
                            "provider `{}` stopped sending for {:?}",
                            provider.name, provider.timeout
                        ),
                    ));
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    cut = Some((
                        "provider_stream_broken",
                        format!("provider `{}`: {e}", provider.name),
                    ));
                    break;
                }
                Ok(Some(Ok(c))) => c,
            };
            let Ok(events) = splitter.push(&chunk) else {
                cut = Some((
                    "provider_malformed_answer",
                    "an event of the stream was too large".into(),
                ));
                break;
            };
            for ev in events {
                // What goes to the client for this event: the event itself, or its
                // translation into the client's dialect.
                let mut out = Vec::new();
                let mut forward = true;
                if let Some(data) = wire::event_data(&ev) {
                    if data.trim() == "[DONE]" {
                        seen.finished = true;
                        if let Some(t) = &mut translator {
                            out = t.push(Data::Done);
                        }
                    } else if let Ok(v) = serde_json::from_str::<Value>(&data) {
                        for t in wire::read_event(up, &v, &mut seen) {
                            counted += tokens::count_text(model.tokenizer, t);
                        }
                        if let Some(t) = &mut translator {
                            out = t.push(Data::Json(&v));
                        } else {
                            // The usage chunk Bursar asked for is not passed to a client
                            // that did not ask for it.
                            let usage_only = up == Dialect::OpenAi
                                && v.get("choices")
                                    .and_then(Value::as_array)
                                    .is_some_and(Vec::is_empty)
                                && v.get("usage").is_some_and(|u| !u.is_null());
                            if usage_only && !self.req.client_wants_usage {
                                forward = false;
                            }
                        }
                    }
                }
                if translator.is_none() && forward {
                    out.push(ev);
                }
                if counted > cap {
                    cut = Some((
                        "stream_exceeded_hold",
                        format!("the stream passed the {cap} output tokens its hold pays for; it was cut"),
                    ));
                    break 'read;
                }
                for ev in out {
                    if !client_gone && tx.send(ev).await.is_err() {
                        client_gone = true;
                        metrics::counter!("bursar_client_disconnects_total").increment(1);
                        if provider.on_disconnect == DisconnectPolicy::Cancel {
                            break 'read;
                        }
                    }
                }
            }
        }
        drop(stream);
        let complete =
            cut.is_none() && !(client_gone && provider.on_disconnect == DisconnectPolicy::Cancel);
        let (usage, estimated) = match seen.usage {
            Some(u) if complete && (u.output_tokens > 0 || counted == 0) => (u, false),
            _ => (self.counted_usage(&permit, model, &seen, counted), true),
        };
        let provider_time = provider_time + t0.elapsed();
        let settled = match self
            .settle(&permit, usage, seen.model.clone(), estimated, provider_time)
            .await
        {
            Ok((st, ticket)) => ticket.wait().await.map(|()| st).map_err(ApiError::from),
            Err(e) => Err(e),
        };
        match settled {
            Ok(st) => tracing::debug!(cost = %st.cost, estimated, "stream settled"),
            Err(e) => {
                tracing::error!(code = e.code, error = %e.message, "settling a stream failed; the hold will expire and be charged")
            }
        }
        if let Some((code, message)) = cut {
            tracing::warn!(code, %message, "stream ended early");
            if !client_gone {
                let ev = match dialect {
                    Dialect::OpenAi => format!(
                        "data: {}\n\n",
                        json!({"error": {"message": message, "type": "api_error", "code": code}})
                    ),
                    Dialect::Anthropic => format!(
                        "event: error\ndata: {}\n\n",
                        json!({"type": "error", "error": {"type": "api_error", "message": message, "code": code}})
                    ),
                };
                let _ = tx.send(Bytes::from(ev)).await;
            }
        }
    }
}

/// The response cache holds at most this many bytes of answers.
pub const CACHE_MAX_BYTES: u64 = 64 << 20;

/// A cached answer: what it cost to make, so a hit can record the cost saved.
pub struct Cached {
    body: Bytes,
    model: Arc<str>,
    usage: TokenUsage,
    expires_at: chrono::DateTime<chrono::Utc>,
}

/// How a cached answer is kept in Redis: a JSON line of what it cost, then the body.
#[derive(serde::Serialize, serde::Deserialize)]
struct CachedHead {
    model: Arc<str>,
    usage: TokenUsage,
    expires_at_ms: i64,
}

impl Cached {
    fn encode(&self) -> Vec<u8> {
        let head = CachedHead {
            model: self.model.clone(),
            usage: self.usage,
            expires_at_ms: self.expires_at.timestamp_millis(),
        };
        let mut out = serde_json::to_vec(&head).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Cached> {
        let split = bytes.iter().position(|&b| b == b'\n')?;
        let head: CachedHead = serde_json::from_slice(&bytes[..split]).ok()?;
        Some(Cached {
            body: Bytes::copy_from_slice(&bytes[split + 1..]),
            model: head.model,
            usage: head.usage,
            expires_at: chrono::DateTime::from_timestamp_millis(head.expires_at_ms)?,
        })
    }
}

/// The answer kept under `key`: this instance's, or, with Redis, one any instance kept
/// (then kept here too). Redis away is a miss.
async fn cached(s: &Services, key: &[u8; 32]) -> Option<Arc<Cached>> {
    if let Some(hit) = s.proxy.cache.get(key) {
        return Some(hit);
    }
    let redis = s.limiter.as_ref()?;
    match Box::pin(redis.cache_get(key)).await {
        Ok(Some(bytes)) => {
            let hit = Arc::new(Cached::decode(&bytes)?);
            s.proxy.cache.insert(*key, hit.clone());
            Some(hit)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "the shared response cache is unreachable: a miss");
            None
        }
    }
}

/// The tokenizers the models `routing` serves count with, each encoding once (none
/// without a provider: the authorization API alone counts a text prompt only when one
/// is sent, and loads its tokenizer then).
pub fn tokenizers_served(
    routing: &bursar_core::providers::Routing,
    book: &PriceBook,
) -> Vec<TokenizerKind> {
    let mut kinds: Vec<TokenizerKind> = Vec::new();
    for m in book.models() {
        let kind = tokens::encoding_of(m.tokenizer);
        if !kinds.contains(&kind) && routing.provider_for(m).is_ok() {
            kinds.push(kind);
        }
    }
    kinds
}

/// What the proxy needs beyond the engine: routes, upstream clients and the cache.
pub struct Proxy {
    pub routing: bursar_core::providers::Routing,
    pub upstreams: upstream::Upstreams,
    /// Exact-match cache of non-streamed answers, for tenants that opt in.
    pub cache: moka::sync::Cache<[u8; 32], Arc<Cached>>,
}

impl Proxy {
    pub fn new(routing: bursar_core::providers::Routing) -> Self {
        let upstreams = upstream::Upstreams::new(&routing);
        let cache = moka::sync::Cache::builder()
            .max_capacity(CACHE_MAX_BYTES)
            .weigher(|_, v: &Arc<Cached>| u32::try_from(v.body.len()).unwrap_or(u32::MAX))
            .build();
        Proxy {
            routing,
            upstreams,
            cache,
        }
    }
}

/// The cache key: the tenant, the endpoint, Bursar's tag headers and the body, exactly.
fn cache_key(tenant: &str, ep: Endpoint, headers: &HeaderMap, raw: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut tags: Vec<(&str, &[u8])> = headers
        .iter()
        .filter(|(n, _)| n.as_str().starts_with("x-bursar-"))
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    tags.sort_unstable();
    let mut h = Sha256::new();
    for part in [tenant.as_bytes(), ep.path().as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for (n, v) in tags {
        h.update((n.len() as u64).to_le_bytes());
        h.update(n.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v);
    }
    h.update(raw);
    h.finalize().into()
}

/// Answers a request from the cache: $0, recorded in the ledger with the cost saved.
async fn answer_from_cache(
    s: &Services,
    caller: &Caller,
    hit: &Cached,
) -> Result<Response, ApiError> {
    let (id, saved, ticket) =
        s.engine
            .record_cache_hit(caller, &hit.model, hit.usage, s.clock.now(), &s.ledger)?;
    ticket.wait().await?;
    metrics::counter!("bursar_cache_hits_total").increment(1);
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        hit.body.clone(),
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert(names::CACHE.clone(), HeaderValue::from_static("hit"));
    let mut v = HeaderValues::new();
    h.insert(names::AUTHORIZATION_ID.clone(), v.id(id));
    h.insert(names::MODEL.clone(), v.text(hit.model.as_bytes()));
    h.insert(names::COST.clone(), v.money(Money::ZERO));
    h.insert(names::CHARGE.clone(), v.money(Money::ZERO));
    h.insert(names::COST_SAVED.clone(), v.money(saved));
    Ok(resp)
}

async fn start(
    s: Arc<Services>,
    headers: HeaderMap,
    body: Body,
    ep: Endpoint,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let raw = read_body(&s, body).await?;
    let caller = crate::extract::identify(&s, &headers)?;
    let tenant = caller
        .key
        .tenant
        .as_deref()
        .map(str::to_string)
        .ok_or_else(|| {
            ApiError::from(bursar_core::engine::Denial {
                code: bursar_core::engine::DenyCode::AdminKeyCannotSpend,
                message: "a platform admin key cannot spend; use a tenant key".into(),
                retry_after: None,
                leases: Vec::new(),
            })
        })?;
    let body = wire::RequestBody::parse(raw)?;
    let req = match ep {
        Endpoint::Embeddings => wire::parse_embeddings(&body)?,
        _ => wire::parse_chat(ep.dialect(), &body)?,
    };
    let mut tags = tags_from(&headers, req.end_user.clone())?;
    if ep == Endpoint::Embeddings && tags.task.is_none() {
        // Embeddings run under the plan's `embed` task when it has one.
        let dir = s.engine.directory();
        let has_embed = dir
            .tenants
            .get(&tenant)
            .and_then(|t| dir.plans.get(&t.plan))
            .is_some_and(|p| p.tasks.contains_key("embed"));
        if has_embed {
            tags.task = Some("embed".into());
        }
    }
    // The key's own cache, or its tenant's.
    let cache_ttl = (!req.stream)
        .then(|| {
            caller.key.cache_ttl_secs.map(u64::from).or_else(|| {
                s.engine
                    .directory()
                    .tenants
                    .get(&tenant)
                    .and_then(|t| t.cache_ttl_secs)
            })
        })
        .flatten();
    let cache = match cache_ttl {
        None => None,
        Some(ttl) => {
            let key = cache_key(&tenant, ep, &headers, body.bytes());
            let now = s.clock.now();
            if let Some(hit) = cached(&s, &key).await {
                if hit.expires_at > now {
                    return Box::pin(answer_from_cache(&s, &caller, &hit)).await;
                }
                s.proxy.cache.invalidate(&key);
            }
            let ttl = chrono::Duration::try_seconds(i64::try_from(ttl).unwrap_or(i64::MAX))
                .unwrap_or(chrono::Duration::MAX);
            Some((
                key,
                now.checked_add_signed(ttl)
                    .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC),
            ))
        }
    };
    let client_model = s.proxy.routing.unalias(&req.model).to_string();
    let book = s.engine.price_book();
    let model = book
        .resolve(&client_model)
        .map_err(bursar_core::engine::Denial::from)?;
    // A model whose provider does not speak this endpoint is refused before any hold.
    if let Ok(p) = s.proxy.routing.provider_for(model) {
        if !speaks(p.kind, ep) {
            return Err(wrong_dialect(&model.id, p, ep));
        }
    }
    let chain = s.proxy.routing.chain(&model.id);
    // A request that cannot be said in the dialect of a provider of its chain is
    // refused now, before any hold (each hop translates it again for itself).
    let needs_translation = ep != Endpoint::Embeddings
        && chain.iter().any(|m| {
            book.resolve(m)
                .ok()
                .and_then(|m| s.proxy.routing.provider_for(m).ok())
                .is_some_and(|p| provider_dialect(p.kind, ep.dialect()) != ep.dialect())
        });
    if needs_translation {
        let other = match ep.dialect() {
            Dialect::OpenAi => Dialect::Anthropic,
            Dialect::Anthropic => Dialect::OpenAi,
        };
        translate::request(ep.dialect(), other, &body.to_map()?)?;
    }
    let call = Call {
        s: s.clone(),
        caller,
        tenant,
        ep,
        body,
        client_model,
        chain,
        req,
        tags,
        started,
        cache,
    };
    let (tx, rx) = oneshot::channel();
    Detachable::new(call.run(tx))
        .until(rx)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the call ended without an answer",
            ))
        })
}

/// A call run on the task of the request that waits for it, which goes on in a task
/// of its own when that task drops it (the client went away) or stops waiting for it
/// (the answer is out, a stream goes on): a call once started ends, settled or voided,
/// whoever waits. Running it on the request's task saves a task and a hand-over
/// between two tasks on every call; it is boxed so what is left of it can be moved to
/// a task of its own.
struct Detachable {
    call: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Detachable {
    fn new(call: impl Future<Output = ()> + Send + 'static) -> Self {
        Detachable {
            call: Some(Box::pin(call)),
        }
    }

    /// Runs the call until `answer` is ready. What is left of the call then goes on in
    /// a task of its own.
    async fn until<T>(mut self, answer: impl Future<Output = T>) -> T {
        let mut answer = std::pin::pin!(answer);
        std::future::poll_fn(|cx| {
            // Taken out while it runs. A call that panics is dropped (its hold expires by
            // policy, as a call's own task did when it panicked) and its answer's sender
            // with it, so the client gets a 500, not a cut connection.
            if let Some(mut call) = self.call.take() {
                let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    call.as_mut().poll(cx)
                }));
                match polled {
                    Ok(std::task::Poll::Pending) => self.call = Some(call),
                    Ok(std::task::Poll::Ready(())) => {}
                    Err(_) => tracing::error!("a proxied call panicked; its hold will expire"),
                }
            }
            answer.as_mut().poll(cx)
        })
        .await
    }
}

impl Drop for Detachable {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(call)),
            // Only when the runtime itself is going away: the hold expires by policy.
            Err(e) => {
                tracing::error!(error = %e, "a call was dropped outside the runtime; its hold will expire")
            }
        }
    }
}

async fn endpoint(s: Arc<Services>, headers: HeaderMap, body: Body, ep: Endpoint) -> Response {
    match start(s, headers, body, ep).await {
        Ok(r) => r,
        Err(error) => ProxyError {
            dialect: ep.dialect(),
            error,
        }
        .into_response(),
    }
}

/// OpenAI-compatible chat completions, streamed or not (OpenAI's request and answer
/// shapes; tags in `x-bursar-*` headers).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "proxy", request_body = Object,
    responses((status = 200, description = "the provider's answer (JSON, or text/event-stream when `stream`), with x-bursar-* and x-ratelimit-* headers"),
        (status = 402, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 429, body = crate::error::ErrorBody), (status = 502, body = crate::error::ErrorBody)))]
pub async fn chat_completions(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    endpoint(s, headers, body, Endpoint::Chat).await
}

/// Anthropic-compatible messages, streamed or not; errors in Anthropic's shape.
#[utoipa::path(post, path = "/v1/messages", tag = "proxy", request_body = Object,
    responses((status = 200, description = "the provider's answer (JSON, or text/event-stream when `stream`)"),
        (status = 402, description = "budget exceeded (Anthropic error shape, Bursar code inside)")))]
pub async fn messages(State(s): State<Arc<Services>>, headers: HeaderMap, body: Body) -> Response {
    endpoint(s, headers, body, Endpoint::Messages).await
}

/// OpenAI-compatible embeddings.
#[utoipa::path(post, path = "/v1/embeddings", tag = "proxy", request_body = Object,
    responses((status = 200, description = "the provider's answer"), (status = 402, body = crate::error::ErrorBody)))]
pub async fn embeddings(
    State(s): State<Arc<Services>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    endpoint(s, headers, body, Endpoint::Embeddings).await
}

/// The models this key's plan may call, in OpenAI's list shape.
#[utoipa::path(get, path = "/v1/models", tag = "proxy", responses((status = 200, description = "OpenAI's model list")))]
pub async fn models(State(s): State<Arc<Services>>, headers: HeaderMap) -> Response {
    let caller = match crate::extract::identify(&s, &headers) {
        Ok(c) => c,
        Err(e) => return ProxyError::new(Dialect::OpenAi, e).into_response(),
    };
    let dir = s.engine.directory();
    let classes: std::collections::BTreeSet<String> = caller
        .key
        .tenant
        .as_deref()
        .and_then(|t| dir.tenants.get(t))
        .and_then(|t| dir.plans.get(&t.plan))
        .map(|p| {
            p.tasks
                .values()
                .flat_map(|t| t.classes.iter().cloned())
                .collect()
        })
        .unwrap_or_default();
    let data: Vec<Value> = s
        .engine
        .price_book()
        .models()
        .iter()
        .filter(|m| classes.contains(&m.class))
        .map(|m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": m.provider}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    fn standing(
        dimension: &'static str,
        limit: u32,
        remaining: u64,
        reset_ms: u64,
    ) -> bursar_core::engine::RateStanding {
        bursar_core::engine::RateStanding {
            dimension: dimension.into(),
            per: "key".into(),
            limit_per_minute: limit,
            remaining,
            reset_ms,
        }
    }

    fn budget(remaining: Money) -> bursar_core::engine::BudgetView {
        bursar_core::engine::BudgetView {
            budget_id: "b".into(),
            scope: "tenant".into(),
            value: "acme".into(),
            window: "daily".into(),
            period_start: 0,
            limit: Money::from_usd(10),
            spent: Money::ZERO,
            held: Money::ZERO,
            remaining,
            level: bursar_core::budget::Level::Normal,
        }
    }

    #[test]
    fn an_answer_carries_each_header_once_with_the_tightest_limit_of_each_dimension() {
        let id = uuid::Uuid::now_v7();
        let permit = Permit {
            authorization_id: id,
            model: Some("gpt-4o-mini".into()),
            api: None,
            price_version: "v".into(),
            held: Money::from_nanos(1_500_000),
            prompt_tokens: 10,
            max_tokens: Some(64),
            quantity: 0,
            expires_at: chrono::DateTime::<chrono::Utc>::MIN_UTC,
            downgraded_from: None,
            shadow_denial: None,
            budgets: vec![
                budget(Money::from_nanos(9_000_000)),
                budget(Money::from_nanos(4_000_000)),
            ],
            rate_limits: vec![
                standing("requests", 100, 90, 600),
                standing("tokens", 50_000, 40_000, 1_200),
                standing("requests", 5, 3, 12_000),
                standing("requests", 20, 19, 3_000),
            ],
            replayed: false,
        };
        let settlement = Settlement {
            authorization_id: id,
            outcome: bursar_core::engine::Outcome::Settled,
            cost: Money::from_nanos(500_000),
            charge: Money::from_nanos(750_000),
            released: permit.held,
            overage: Money::ZERO,
            model_used: None,
            price_version: "v".into(),
            drift: false,
            replayed: false,
        };
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        add_headers(&mut h, &permit, Some(&settlement));
        let get = |n: &str| {
            let all: Vec<_> = h.get_all(n).iter().collect();
            assert_eq!(all.len(), 1, "{n}: {all:?}");
            all[0].to_str().unwrap().to_string()
        };
        let id_text = id.to_string();
        let expected = [
            ("x-bursar-authorization-id", id_text.as_str()),
            ("x-bursar-model", "gpt-4o-mini"),
            ("x-bursar-held", "0.0015"),
            ("x-bursar-cost", "0.0005"),
            ("x-bursar-charge", "0.00075"),
            // The lowest remaining budget, with what the settle released beyond the cost.
            ("x-bursar-remaining", "0.005"),
            ("x-ratelimit-limit-requests", "5"),
            ("x-ratelimit-remaining-requests", "3"),
            ("x-ratelimit-reset-requests", "12000ms"),
            ("x-ratelimit-limit-tokens", "50000"),
            ("x-ratelimit-remaining-tokens", "40000"),
            ("x-ratelimit-reset-tokens", "1200ms"),
            ("content-type", "application/json"),
        ];
        for (name, value) in expected {
            assert_eq!(get(name), value, "{name}");
        }
        assert_eq!(h.len(), 13);

        // Before the settle there is no cost nor charge; a model name no header may
        // carry is `-`; with no rate limit there is no x-ratelimit-*.
        let permit = Permit {
            model: Some("bad\nname".into()),
            rate_limits: Vec::new(),
            budgets: Vec::new(),
            ..permit
        };
        let mut h = HeaderMap::new();
        add_headers(&mut h, &permit, None);
        let names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(
            names,
            [
                "x-bursar-authorization-id",
                "x-bursar-model",
                "x-bursar-held"
            ],
            "{h:?}"
        );
        assert_eq!(h["x-bursar-model"], "-");
    }

    #[tokio::test]
    async fn a_call_runs_on_the_task_that_waits_for_it() {
        let request = tokio::spawn(async {
            let (answer, answered) = oneshot::channel();
            let call = async move {
                tokio::task::yield_now().await;
                let _ = answer.send(tokio::task::try_id());
            };
            let ran_on = Detachable::new(call).until(answered).await;
            (tokio::task::id(), ran_on)
        });
        let (request, ran_on) = request.await.expect("the request's task ends");
        assert_eq!(ran_on, Ok(Some(request)));
        assert_eq!(
            alive(),
            0,
            "a call that ends with its answer leaves no task"
        );
    }

    #[tokio::test]
    async fn what_is_left_of_a_call_after_its_answer_goes_on_in_a_task() {
        let (answer, answered) = oneshot::channel();
        let (go, gone) = oneshot::channel::<()>();
        let (done, finished) = oneshot::channel();
        let call = async move {
            let _ = answer.send(7);
            // A stream: its events follow the answer.
            let _ = gone.await;
            let _ = done.send(());
        };
        assert_eq!(Detachable::new(call).until(answered).await, Ok(7));
        assert_eq!(alive(), 1);
        let _ = go.send(());
        let ended = tokio::time::timeout(Duration::from_secs(5), finished).await;
        assert_eq!(ended.ok(), Some(Ok(())), "the rest of the call ran");
    }

    #[tokio::test]
    async fn a_call_that_panics_ends_without_an_answer_not_with_its_request() {
        let (answer, answered) = oneshot::channel::<u32>();
        let call = async move {
            tokio::task::yield_now().await;
            if answer.is_closed() {
                return;
            }
            panic!("a bug in the call");
        };
        let r = Detachable::new(call).until(answered).await;
        assert!(r.is_err(), "the answer's sender went with the call");
        assert_eq!(alive(), 0, "nothing of the call was moved to a task");
    }

    #[tokio::test]
    async fn a_call_its_request_drops_goes_on_in_a_task_of_its_own() {
        let (answer, answered) = oneshot::channel::<u32>();
        let (go, gone) = oneshot::channel::<()>();
        let (done, finished) = oneshot::channel();
        let call = async move {
            // Waiting for the provider when the client goes.
            let _ = gone.await;
            let _ = done.send(());
            drop(answer);
        };
        let waiting = Detachable::new(call).until(answered);
        let cut = tokio::time::timeout(Duration::from_millis(20), waiting).await;
        assert!(cut.is_err(), "the client went before the answer");
        let _ = go.send(());
        let ended = tokio::time::timeout(Duration::from_secs(5), finished).await;
        assert_eq!(ended.ok(), Some(Ok(())), "the call went on to its end");
    }
}
