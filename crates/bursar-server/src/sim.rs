//! The simulated provider: an OpenAI- and Anthropic-compatible LLM that needs no key and
//! no network. It answers in process for the `simulated` provider kind (the demo), and
//! as its own HTTP server under `bursar simulate`, so benchmarks can call it directly and
//! through Bursar (or through another gateway) in one run.
//!
//! It is deterministic: its text is made of words that are one `o200k_base` token each,
//! so a counted answer has exactly the tokens it reports, and failures come at fixed
//! places in the sequence of requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use bursar_core::pricebook::TokenizerKind;
use bursar_core::providers::SimSettings;
use bursar_core::tokens;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};

use crate::proxy::wire::{self, Dialect};

/// Words of one token each in `o200k_base` (and `cl100k_base`).
const WORDS: [&str; 10] = [
    " the", " cost", " of", " this", " call", " is", " held", " and", " then", " settled",
];
/// Dimensions of a simulated embedding.
const EMBEDDING_DIMS: usize = 8;

/// What the simulator answers to one request.
#[derive(Debug, Clone)]
pub enum SimAnswer {
    /// A whole answer (or an error) with its status.
    Full { status: StatusCode, body: Bytes },
    /// A stream of server-sent events, `delay` apart.
    Stream { events: Vec<Bytes>, delay: Duration },
}

pub struct Simulator {
    pub settings: SimSettings,
    seq: AtomicU64,
}

fn text_of(n: u32) -> String {
    let mut s = String::from("Yes");
    for i in 0..n.saturating_sub(2) {
        s.push_str(WORDS[i as usize % WORDS.len()]);
    }
    if n >= 2 {
        s.push('.');
    }
    s
}

fn sse(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

fn sse_named(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

impl Simulator {
    pub fn new(settings: SimSettings) -> Self {
        Simulator {
            settings,
            seq: AtomicU64::new(0),
        }
    }

    fn next(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn fails(&self, seq: u64) -> bool {
        seq % 100 < u64::from(self.settings.error_rate_percent)
    }

    fn error(&self, dialect: Dialect, status: StatusCode, message: &str) -> SimAnswer {
        let body = match dialect {
            Dialect::OpenAi => {
                json!({"error": {"message": message, "type": "server_error", "code": "simulated_error", "param": null}})
            }
            Dialect::Anthropic => {
                json!({"type": "error", "error": {"type": "api_error", "message": message}})
            }
        };
        SimAnswer::Full {
            status,
            body: Bytes::from(body.to_string()),
        }
    }

    fn reported_model(&self, asked: &str) -> String {
        self.settings
            .report_model
            .clone()
            .unwrap_or_else(|| asked.to_string())
    }

    /// Answers a chat request (`/v1/chat/completions` or `/v1/messages`).
    pub fn chat(&self, dialect: Dialect, body: &Map<String, Value>) -> SimAnswer {
        let seq = self.next();
        let req = match wire::parse_chat(dialect, body) {
            Ok(r) => r,
            Err(e) => return self.error(dialect, StatusCode::BAD_REQUEST, &e.message),
        };
        if self.fails(seq) {
            let status = StatusCode::from_u16(self.settings.error_status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return self.error(dialect, status, "simulated provider failure");
        }
        let prompt = tokens::count_messages(TokenizerKind::O200kBase, &req.messages)
            + req.extra_prompt_tokens;
        let cap = req.max_tokens.unwrap_or(u32::MAX);
        let n = if self.settings.ignore_max_tokens {
            self.settings.completion_tokens
        } else {
            self.settings.completion_tokens.min(cap)
        };
        let stopped_by_cap = n < self.settings.completion_tokens || n == cap;
        let model = self.reported_model(&req.model);
        let text = text_of(n);
        let created = 1_700_000_000 + seq;
        match (dialect, req.stream) {
            (Dialect::OpenAi, false) => {
                let mut v = json!({
                    "id": format!("chatcmpl-sim-{seq}"), "object": "chat.completion",
                    "created": created, "model": model, "system_fingerprint": null,
                    "choices": [{"index": 0, "logprobs": null,
                        "finish_reason": if stopped_by_cap { "length" } else { "stop" },
                        "message": {"role": "assistant", "content": text, "refusal": null}}],
                });
                if !self.settings.omit_usage {
                    v["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": n,
                        "total_tokens": prompt + u64::from(n),
                        "prompt_tokens_details": {"cached_tokens": 0}});
                }
                SimAnswer::Full {
                    status: StatusCode::OK,
                    body: Bytes::from(v.to_string()),
                }
            }
            (Dialect::OpenAi, true) => {
                let id = format!("chatcmpl-sim-{seq}");
                let chunk = |delta: Value, finish: Value| {
                    sse(
                        &json!({"id": id, "object": "chat.completion.chunk", "created": created,
                        "model": model, "system_fingerprint": null,
                        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]}),
                    )
                };
                let mut events = vec![chunk(
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                )];
                for piece in pieces(&text, self.settings.chunk_tokens) {
                    events.push(chunk(json!({"content": piece}), Value::Null));
                }
                events.push(chunk(
                    json!({}),
                    json!(if stopped_by_cap { "length" } else { "stop" }),
                ));
                if req.client_wants_usage && !self.settings.omit_usage {
                    events.push(sse(&json!({"id": id, "object": "chat.completion.chunk",
                        "created": created, "model": model, "choices": [],
                        "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                            "total_tokens": prompt + u64::from(n),
                            "prompt_tokens_details": {"cached_tokens": 0}}})));
                }
                events.push(Bytes::from_static(b"data: [DONE]\n\n"));
                SimAnswer::Stream {
                    events,
                    delay: Duration::from_millis(self.settings.chunk_delay_ms),
                }
            }
            (Dialect::Anthropic, false) => {
                let v = json!({
                    "id": format!("msg_sim_{seq}"), "type": "message", "role": "assistant",
                    "model": model, "content": [{"type": "text", "text": text}],
                    "stop_reason": if stopped_by_cap { "max_tokens" } else { "end_turn" },
                    "stop_sequence": null,
                    "usage": {"input_tokens": prompt, "output_tokens": n},
                });
                SimAnswer::Full {
                    status: StatusCode::OK,
                    body: Bytes::from(v.to_string()),
                }
            }
            (Dialect::Anthropic, true) => {
                let mut events = vec![
                    sse_named(
                        "message_start",
                        &json!({"type": "message_start", "message": {
                        "id": format!("msg_sim_{seq}"), "type": "message", "role": "assistant",
                        "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": prompt, "output_tokens": 1}}}),
                    ),
                    sse_named(
                        "content_block_start",
                        &json!({"type": "content_block_start",
                        "index": 0, "content_block": {"type": "text", "text": ""}}),
                    ),
                ];
                for piece in pieces(&text, self.settings.chunk_tokens) {
                    events.push(sse_named(
                        "content_block_delta",
                        &json!({"type": "content_block_delta",
                        "index": 0, "delta": {"type": "text_delta", "text": piece}}),
                    ));
                }
                events.push(sse_named(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                ));
                events.push(sse_named("message_delta", &json!({"type": "message_delta",
                    "delta": {"stop_reason": if stopped_by_cap { "max_tokens" } else { "end_turn" }, "stop_sequence": null},
                    "usage": {"output_tokens": n}})));
                events.push(sse_named("message_stop", &json!({"type": "message_stop"})));
                SimAnswer::Stream {
                    events,
                    delay: Duration::from_millis(self.settings.chunk_delay_ms),
                }
            }
        }
    }

    /// Answers `/v1/embeddings` (float or base64 encoding, as asked).
    pub fn embeddings(&self, body: &Map<String, Value>) -> SimAnswer {
        let seq = self.next();
        let (model, texts, given) = match wire::parse_embeddings(body) {
            Ok(r) => (r.model, r.texts, r.extra_prompt_tokens),
            Err(e) => return self.error(Dialect::OpenAi, StatusCode::BAD_REQUEST, &e.message),
        };
        if self.fails(seq) {
            let status = StatusCode::from_u16(self.settings.error_status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return self.error(Dialect::OpenAi, status, "simulated provider failure");
        }
        let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
        let prompt: u64 = given
            + texts
                .iter()
                .map(|t| tokens::count_text(TokenizerKind::O200kBase, t))
                .sum::<u64>();
        let count = texts.len().max(usize::from(given > 0));
        let data: Vec<Value> = (0..count)
            .map(|i| {
                let v: Vec<f32> = (0..EMBEDDING_DIMS)
                    .map(|d| ((i * EMBEDDING_DIMS + d) % 7) as f32 / 7.0)
                    .collect();
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        let mut v = json!({"object": "list", "data": data, "model": self.reported_model(&model)});
        if !self.settings.omit_usage {
            v["usage"] = json!({"prompt_tokens": prompt, "total_tokens": prompt});
        }
        SimAnswer::Full {
            status: StatusCode::OK,
            body: Bytes::from(v.to_string()),
        }
    }
}

/// Splits a text at word starts into pieces of `per` words.
fn pieces(text: &str, per: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut words = 0;
    for (i, ch) in text.char_indices() {
        if ch == ' ' && i > 0 {
            words += 1;
            if words % per.max(1) == 0 {
                out.push(std::mem::take(&mut cur));
            }
        }
        cur.push(ch);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A simulated stream's events, `delay` apart.
pub fn event_stream(
    events: Vec<Bytes>,
    delay: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, String>> + Send + 'static {
    futures_util::stream::iter(events.into_iter().enumerate()).then(move |(i, ev)| async move {
        if i > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(ev)
    })
}

/// A simulated answer as an HTTP response (for `bursar simulate`).
pub fn into_response(answer: SimAnswer) -> Response {
    match answer {
        SimAnswer::Full { status, body } => {
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        SimAnswer::Stream { events, delay } => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(event_stream(events, delay)),
        )
            .into_response(),
    }
}

fn parse_body(raw: &[u8]) -> Result<Map<String, Value>, Box<Response>> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Box::new((
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/json")],
            json!({"error": {"message": "the body must be a JSON object", "type": "invalid_request_error", "code": "invalid_json", "param": null}}).to_string(),
        )
            .into_response())),
    }
}

async fn sim_chat(State(sim): State<Arc<Simulator>>, raw: Bytes) -> Response {
    serve_one(&sim, raw, |s, b| s.chat(Dialect::OpenAi, b)).await
}

async fn sim_messages(State(sim): State<Arc<Simulator>>, raw: Bytes) -> Response {
    serve_one(&sim, raw, |s, b| s.chat(Dialect::Anthropic, b)).await
}

async fn sim_embeddings(State(sim): State<Arc<Simulator>>, raw: Bytes) -> Response {
    serve_one(&sim, raw, Simulator::embeddings).await
}

async fn serve_one(
    sim: &Simulator,
    raw: Bytes,
    answer: impl Fn(&Simulator, &Map<String, Value>) -> SimAnswer,
) -> Response {
    let body = match parse_body(&raw) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let latency = Duration::from_millis(sim.settings.latency_ms);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    into_response(answer(sim, &body))
}

async fn sim_models() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({"object": "list", "data": [{"id": "simulated", "object": "model", "created": 0, "owned_by": "bursar-simulator"}]}).to_string(),
    )
        .into_response()
}

/// The simulated provider as an HTTP server (any key is accepted).
pub fn router(settings: SimSettings) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(sim_chat))
        .route("/v1/messages", post(sim_messages))
        .route("/v1/embeddings", post(sim_embeddings))
        .route("/v1/models", get(sim_models))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(Simulator::new(settings)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn the_text_has_exactly_the_tokens_it_reports() {
        for n in [1u32, 2, 3, 10, 64, 257] {
            let t = text_of(n);
            assert_eq!(
                tokens::count_text(TokenizerKind::O200kBase, &t),
                u64::from(n),
                "{t}"
            );
            assert_eq!(
                tokens::count_text(TokenizerKind::Cl100kBase, &t),
                u64::from(n),
                "{t}"
            );
            assert_eq!(pieces(&t, 3).concat(), t);
        }
    }

    #[test]
    fn answers_respect_max_tokens_and_fail_at_the_configured_rate() {
        let sim = Simulator::new(SimSettings {
            completion_tokens: 50,
            error_rate_percent: 25,
            ..SimSettings::default()
        });
        let req = body(json!({"model": "gpt-4o-mini", "max_tokens": 7,
            "messages": [{"role": "user", "content": "hello"}]}));
        let mut failures = 0;
        for _ in 0..100 {
            match sim.chat(Dialect::OpenAi, &req) {
                SimAnswer::Full { status, body } if status.is_success() => {
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(v["usage"]["completion_tokens"], 7);
                    assert_eq!(v["choices"][0]["finish_reason"], "length");
                }
                SimAnswer::Full { status, .. } => {
                    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
                    failures += 1;
                }
                SimAnswer::Stream { .. } => panic!("not asked to stream"),
            }
        }
        assert_eq!(failures, 25);
    }

    #[test]
    fn streams_carry_usage_only_when_asked() {
        let sim = Simulator::new(SimSettings::default());
        let mut req = body(json!({"model": "gpt-4o-mini", "stream": true,
            "messages": [{"role": "user", "content": "hello"}]}));
        let count_usage = |a: SimAnswer| match a {
            SimAnswer::Stream { events, .. } => events
                .iter()
                .filter(|e| std::str::from_utf8(e).unwrap().contains("\"usage\""))
                .count(),
            SimAnswer::Full { .. } => usize::MAX,
        };
        assert_eq!(count_usage(sim.chat(Dialect::OpenAi, &req)), 0);
        req.insert("stream_options".into(), json!({"include_usage": true}));
        assert_eq!(count_usage(sim.chat(Dialect::OpenAi, &req)), 1);
    }
}
