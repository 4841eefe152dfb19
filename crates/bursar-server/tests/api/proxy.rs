//! Proxy mode end to end: real HTTP in, the simulated provider (in process, and over
//! real HTTP behind a switchable upstream) out, the real ledger underneath.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bursar_core::ledger::{flags, EntryKind};
use bursar_core::pricebook::{PriceBook, TokenUsage, TokenizerKind};
use bursar_core::providers::SimSettings;
use bursar_core::tokens::{self, ChatMessage};
use bursar_core::Money;
use bursar_server::proxy::wire::Dialect;
use bursar_server::sim::{self, Simulator};
use futures::StreamExt;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{spawn_app_at, spawn_app_with, start_time, Place, TestApp, ADMIN};
use crate::store_test;

const MEMBER: &str = "bsr_test_proxy_member_00000000000";

const CONFIG: &str = r#"
[engine]
hold_ttl_secs = 60

[[plans]]
id = "pro"
default_task = "chat"
[plans.tasks.chat]
classes = ["small", "standard"]
default_class = "small"
max_tokens = 1000
[plans.tasks.embed]
classes = ["embedding"]
default_class = "embedding"
max_tokens = 1
[plans.tasks.cheap]
classes = ["small"]
default_class = "small"
max_tokens = 100
[plans.rate_limits.limited]
requests_per_minute = 2

[[tenants]]
id = "p"
plan = "pro"
[[tenants]]
id = "c"
plan = "pro"
cache_ttl_secs = 60

[[users]]
tenant = "p"
id = "u"
role = "member"
[[users]]
tenant = "p"
id = "l"
role = "limited"

[[keys]]
name = "platform"
kind = "platform_admin"
secret = "bsr_test_platform_admin_000000000"
[[keys]]
name = "p member"
tenant = "p"
user = "u"
kind = "member"
secret = "bsr_test_proxy_member_00000000000"
[[keys]]
name = "c member"
tenant = "c"
kind = "member"
secret = "bsr_test_proxy_cached_00000000000"
[[keys]]
name = "p limited"
tenant = "p"
user = "l"
kind = "member"
secret = "bsr_test_proxy_limited_0000000000"
[[keys]]
name = "p cached"
tenant = "p"
kind = "member"
secret = "bsr_test_proxy_p_cached_000000000"
cache_ttl_secs = 60
[[keys]]
name = "p admin"
tenant = "p"
kind = "tenant_admin"
secret = "bsr_test_proxy_p_admin_0000000000"

[[providers]]
name = "flaky"
kind = "openai"
base_url = "UPSTREAM"
serves = ["perplexity"]
models = ["gpt-3.5-turbo"]
max_retries = 1
circuit_failures = 2
circuit_open_ms = 300
max_answer_bytes = 65536

[[providers]]
name = "slow"
kind = "simulated"
models = ["gpt-4.1-nano"]
[providers.simulate]
completion_tokens = 200
chunk_tokens = 1
chunk_delay_ms = 10

[[providers]]
name = "drifter"
kind = "simulated"
models = ["gpt-4.1-mini"]
[providers.simulate]
report_model = "openai/gpt-4.1-2025-04-14"

[[providers]]
name = "runaway"
kind = "simulated"
models = ["gpt-5-nano"]
[providers.simulate]
completion_tokens = 300
ignore_max_tokens = true
omit_usage = true

[[providers]]
name = "lagging"
kind = "simulated"
models = ["gpt-5-mini"]
[providers.simulate]
completion_tokens = 20
latency_ms = 300

[[providers]]
name = "hang"
kind = "simulated"
models = ["grok-3-mini"]
timeout_ms = 100
max_retries = 0
[providers.simulate]
latency_ms = 60000

[[providers]]
name = "sim"
kind = "simulated"
serves = ["*"]
[providers.simulate]
completion_tokens = 20
chunk_tokens = 2

[routing]
aliases = { fast = "gpt-4o-mini" }
fallbacks = { sonar = ["gpt-4o-mini"] }
backoff_base_ms = 2
backoff_max_ms = 10
"#;

/// An OpenAI-compatible upstream over real HTTP that the test switches between
/// answering (as the simulator), failing with 500, refusing with 400, redirecting and
/// answering more than its provider's `max_answer_bytes`.
struct Upstream {
    mode: AtomicU8,
    hits: AtomicUsize,
    /// Calls that reached the address its redirects name.
    elsewhere: AtomicUsize,
    sim: Simulator,
    /// The last request body it was sent.
    last: parking_lot::Mutex<Value>,
    /// The same, as sent.
    last_raw: parking_lot::Mutex<Bytes>,
}

const OK: u8 = 0;
const FAIL: u8 = 1;
const REFUSE: u8 = 2;
const MALFORMED: u8 = 3;
/// 307 (the body would go again) to `ELSEWHERE` on the same server.
const REDIRECT: u8 = 4;
const ELSEWHERE: &str = "/elsewhere/v1/chat/completions";
/// A 200 of 100 KB, over the `flaky` provider's `max_answer_bytes` (64 KiB), with its
/// `Content-Length`; the same in chunks without one; the same as a 500.
const HUGE: u8 = 5;
const HUGE_CHUNKED: u8 = 6;
const HUGE_FAILURE: u8 = 7;

fn huge_answer(mode: u8) -> Response {
    let body = json!({
        "id": "chatcmpl-huge", "object": "chat.completion", "model": "gpt-3.5-turbo",
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "a".repeat(100_000)}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 50, "total_tokens": 60},
    })
    .to_string();
    match mode {
        HUGE => (StatusCode::OK, body).into_response(),
        HUGE_FAILURE => (StatusCode::INTERNAL_SERVER_ERROR, body).into_response(),
        _ => {
            let chunks: Vec<Result<Bytes, std::convert::Infallible>> = body
                .as_bytes()
                .chunks(16_384)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Response::new(axum::body::Body::from_stream(futures::stream::iter(chunks)))
        }
    }
}

async fn upstream_chat(State(u): State<Arc<Upstream>>, body: Bytes) -> Response {
    u.hits.fetch_add(1, Ordering::SeqCst);
    *u.last.lock() = serde_json::from_slice(&body).unwrap_or(Value::Null);
    *u.last_raw.lock() = body.clone();
    match u.mode.load(Ordering::SeqCst) {
        FAIL => (StatusCode::INTERNAL_SERVER_ERROR, "{\"error\":{\"message\":\"down\"}}").into_response(),
        REFUSE => (
            StatusCode::BAD_REQUEST,
            "{\"error\":{\"message\":\"bad temperature\",\"type\":\"invalid_request_error\",\"code\":\"invalid_value\"}}",
        )
            .into_response(),
        MALFORMED => (StatusCode::OK, "{\"choices\": [{\"message\": {\"content\": \"cut off").into_response(),
        HUGE | HUGE_CHUNKED | HUGE_FAILURE => huge_answer(u.mode.load(Ordering::SeqCst)),
        REDIRECT => (
            StatusCode::TEMPORARY_REDIRECT,
            [(axum::http::header::LOCATION, ELSEWHERE)],
        )
            .into_response(),
        _ => {
            let Ok(Value::Object(map)) = serde_json::from_slice(&body) else {
                return StatusCode::BAD_REQUEST.into_response();
            };
            sim::into_response(u.sim.chat(Dialect::OpenAi, &map))
        }
    }
}

/// Where the upstream's redirects point: answers as the simulator, and counts.
async fn upstream_elsewhere(State(u): State<Arc<Upstream>>, body: Bytes) -> Response {
    u.elsewhere.fetch_add(1, Ordering::SeqCst);
    let Ok(Value::Object(map)) = serde_json::from_slice(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    sim::into_response(u.sim.chat(Dialect::OpenAi, &map))
}

async fn spawn_proxy() -> (TestApp, Arc<Upstream>) {
    spawn_proxy_at(Place::sqlite()).await
}

async fn spawn_proxy_at(place: Place) -> (TestApp, Arc<Upstream>) {
    let (up, url) = spawn_upstream().await;
    let app = spawn_app_at(&CONFIG.replace("UPSTREAM", &url), place).await;
    (app, up)
}

/// The upstream, and its base URL.
async fn spawn_upstream() -> (Arc<Upstream>, String) {
    let up = Arc::new(Upstream {
        mode: AtomicU8::new(OK),
        hits: AtomicUsize::new(0),
        elsewhere: AtomicUsize::new(0),
        sim: Simulator::new(SimSettings {
            completion_tokens: 20,
            ..SimSettings::default()
        }),
        last: parking_lot::Mutex::new(Value::Null),
        last_raw: parking_lot::Mutex::new(Bytes::new()),
    });
    let router = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(upstream_chat))
        .route(ELSEWHERE, axum::routing::post(upstream_elsewhere))
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (up, url)
}

fn chat(model: &str, max_tokens: u32) -> Value {
    json!({"model": model, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Say something about budgets."}]})
}

/// What a call of `chat(...)` holds on gpt-4o-mini: the prompt counted with its
/// tokenizer and `max_tokens` of output, at the price in effect.
fn hold_of(max_tokens: u64) -> Money {
    let book = PriceBook::builtin().unwrap();
    let m = book.resolve("gpt-4o-mini").unwrap();
    let prompt = tokens::count_messages(
        TokenizerKind::O200kBase,
        &[ChatMessage {
            role: "user".into(),
            content: "Say something about budgets.".into(),
            name: None,
        }],
    );
    m.price_at(start_time()).unwrap().cost(&TokenUsage {
        input_tokens: prompt,
        cached_input_tokens: 0,
        output_tokens: max_tokens,
    })
}

/// Posts a body with a Bearer key and returns the raw response (for streams
/// and headers).
async fn post_raw(app: &TestApp, path: &str, key: &str, body: &Value) -> reqwest::Response {
    app.http
        .post(format!("{}{path}", app.base))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn auth_id_of_first_hold(app: &TestApp) -> Uuid {
    let entries = app.entries().await;
    entries
        .iter()
        .find(|e| e.kind == EntryKind::Hold)
        .unwrap()
        .authorization
}

fn auth_id(r: &reqwest::header::HeaderMap) -> Uuid {
    r.get("x-bursar-authorization-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok())
        .unwrap()
}

/// Waits until an authorization has left the held state (streams settle after their
/// last event), and returns its entries.
async fn finished_entries(app: &TestApp, id: Uuid) -> Vec<(i64, EntryKind, Money, Money)> {
    for _ in 0..500 {
        let e = app.services.reader.entries_of(id).await.unwrap();
        if e.iter().any(|e| e.1 != EntryKind::Hold) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("authorization {id} never finished");
}

/// The settle entry of an authorization, once it is stored: a whole answer is sent
/// before its settle entry is durable (the hold already is).
async fn settle_row(app: &TestApp, id: Uuid) -> bursar_store::SettleRow {
    for _ in 0..500 {
        if let Some(row) = app.services.reader.settle_entry_of(id).await.unwrap() {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("authorization {id} was never settled");
}

async fn add_budget(app: &TestApp, id: &str, limit: Money) {
    let r = app
        .post(
            "/v1/admin/tenants/p/budgets",
            ADMIN,
            json!({"id": id, "scope": "tenant", "window": "lifetime", "limit": limit.to_string(),
                   "emergency_action": "alert_only"}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

#[tokio::test]
async fn a_non_streamed_chat_is_settled_at_the_providers_usage() {
    let (app, _) = spawn_proxy().await;
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("fast", 100))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["usage"]["completion_tokens"], 20);
    assert_eq!(
        r.body["model"], "gpt-4o-mini",
        "the alias is resolved before the call"
    );
    let expected = hold_of(20);
    let h = |n: &str| r.headers.get(n).unwrap().to_str().unwrap().to_string();
    assert_eq!(h("x-bursar-cost"), expected.to_string());
    assert_eq!(h("x-bursar-held"), hold_of(100).to_string());
    assert_eq!(h("x-bursar-model"), "gpt-4o-mini");
    assert!(Money::parse(&h("x-bursar-charge")).unwrap() >= expected);
    assert!(
        r.headers.get("x-bursar-remaining").is_none(),
        "no budget applies to this key"
    );
    let id = auth_id(&r.headers);
    let row = settle_row(&app, id).await;
    assert_eq!(row.cost, expected);
    assert_eq!(row.usage.output_tokens, 20);
    assert_eq!(row.flags & flags::ESTIMATED, 0);
    assert_eq!(app.services.engine.open_holds(), 0);
}

/// A system prompt sent again is counted from the cache of texts counted before, to the
/// same count; `/metrics` shows the cache's hits and the overhead on fine buckets.
#[tokio::test]
async fn a_system_prompt_sent_again_is_held_the_same_and_counted_from_the_cache() {
    let (app, _) = spawn_proxy().await;
    let system = format!(
        "You answer for the finance team of shop {}; quote every amount exactly. ",
        Uuid::now_v7()
    )
    .repeat(3);
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 10, "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": "Say something about budgets."}]});
    let before = tokens::counted_from_cache();
    let first = app.post("/v1/chat/completions", MEMBER, body.clone()).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let second = app.post("/v1/chat/completions", MEMBER, body).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert!(tokens::counted_from_cache() > before);
    let held = |r: &crate::helpers::Resp| r.headers["x-bursar-held"].to_str().unwrap().to_string();
    assert_eq!(held(&first), held(&second));
    // The hold is the prompt as counted afresh (the tokenizer's own count, with OpenAI's
    // framing) and 10 tokens of output.
    let book = PriceBook::builtin().unwrap();
    let m = book.resolve("gpt-4o-mini").unwrap();
    let fresh = tokens::count_text(TokenizerKind::O200kBase, &system)
        + tokens::count_text(TokenizerKind::O200kBase, "system")
        + tokens::count_text(TokenizerKind::O200kBase, "user")
        + tokens::count_text(TokenizerKind::O200kBase, "Say something about budgets.")
        + 2 * 3
        + 3;
    let expected = m.price_at(start_time()).unwrap().cost(&TokenUsage {
        input_tokens: fresh,
        cached_input_tokens: 0,
        output_tokens: 10,
    });
    assert_eq!(held(&first), expected.to_string());
    let metrics = app.get("/metrics", "").await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains("bursar_token_counts_from_cache_total"),
        "{text}"
    );
    let buckets = text
        .lines()
        .filter(|l| l.starts_with("bursar_proxy_overhead_seconds_bucket"))
        .count();
    assert!(buckets > 30, "{buckets} buckets");
}

#[tokio::test]
async fn a_stream_is_passed_through_and_settled_without_leaking_the_usage_chunk() {
    let (app, _) = spawn_proxy().await;
    let mut body = chat("gpt-4o-mini", 100);
    body["stream"] = json!(true);
    let resp = post_raw(&app, "/v1/chat/completions", MEMBER, &body).await;
    assert_eq!(resp.status(), 200);
    let id = auth_id(resp.headers());
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    assert!(
        !text.contains("\"usage\""),
        "the client did not ask for usage"
    );
    let content: String = events
        .iter()
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(tokens::count_text(TokenizerKind::O200kBase, &content), 20);
    finished_entries(&app, id).await;
    let row = settle_row(&app, id).await;
    assert_eq!(row.usage.output_tokens, 20);
    assert_eq!(row.cost, hold_of(20));
    assert_eq!(
        row.flags & flags::ESTIMATED,
        0,
        "the provider's own usage was used"
    );
}

#[tokio::test]
async fn anthropic_messages_and_embeddings_are_metered_too() {
    let (app, _) = spawn_proxy().await;
    let r = app
        .http
        .post(format!("{}/v1/messages", app.base))
        .header("x-api-key", MEMBER)
        .header("anthropic-version", "2023-06-01")
        .json(
            &json!({"model": "claude-3-5-haiku-20241022", "max_tokens": 50,
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = auth_id(r.headers());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["usage"]["output_tokens"], 20);
    let row = settle_row(&app, id).await;
    assert_eq!(row.usage.output_tokens, 20);
    assert!(row.cost > Money::ZERO);

    // Errors on /v1/messages are in Anthropic's shape, with Bursar's code inside.
    let r = app
        .http
        .post(format!("{}/v1/messages", app.base))
        .header("x-api-key", MEMBER)
        .json(&json!({"model": "claude-3-opus", "max_tokens": 50,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "permission_error");
    assert_eq!(v["error"]["code"], "model_class_not_allowed");

    let r = app
        .post(
            "/v1/embeddings",
            MEMBER,
            json!({"model": "text-embedding-3-small", "input": ["one two three", "four"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["data"].as_array().unwrap().len(), 2);
    let row = settle_row(&app, auth_id(&r.headers)).await;
    assert_eq!(row.usage.input_tokens, 4);

    let r = app.get("/v1/models", MEMBER).await;
    let ids: Vec<&str> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(ids.contains(&"gpt-4o-mini") && ids.contains(&"text-embedding-3-small"));
    assert!(
        !ids.contains(&"claude-3-opus"),
        "premium is not in this plan"
    );
}

#[tokio::test]
async fn bad_requests_are_refused_before_any_money_is_held() {
    let (app, _) = spawn_proxy().await;
    let cases = [
        (json!({"model": "gpt-4o-mini"}), 400, "invalid_request"),
        (
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user"}], "max_tokens": -1}),
            400,
            "invalid_request",
        ),
        (
            json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
            422,
            "unknown_model",
        ),
    ];
    for (body, status, code) in cases {
        let r = app.post("/v1/chat/completions", MEMBER, body).await;
        assert_eq!(r.status, status, "{:?}", r.body);
        assert_eq!(r.code(), code);
    }
    // Text that is no JSON object; a field given twice (which copy a provider reads is
    // open, so neither is sent); a number past f64, which JSON's grammar allows (a cap
    // Bursar cannot read is no cap).
    let raw_cases: [(&[u8], &str, &str); 3] = [
        (b"{not json", "invalid_json", "malformed JSON"),
        (
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"messages":[]}"#,
            "invalid_request",
            "`messages` is given twice",
        ),
        (
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"max_tokens":1e400}"#,
            "invalid_json",
            "`max_tokens`",
        ),
    ];
    for (raw, code, says) in raw_cases {
        let r = app
            .raw_post("/v1/chat/completions", MEMBER, raw.to_vec())
            .await;
        assert_eq!((r.status, r.code()), (400, code), "{:?}", r.body);
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{message}");
    }
    let big = vec![b' '; 2 << 20];
    let r = app.raw_post("/v1/chat/completions", MEMBER, big).await;
    assert_eq!((r.status, r.code()), (413, "body_too_large"));
    let r = app
        .post(
            "/v1/chat/completions",
            "bsr_wrong_key_00000000000000000",
            chat("fast", 10),
        )
        .await;
    assert_eq!((r.status, r.code()), (401, "invalid_api_key"));
    assert_eq!(app.services.engine.open_holds(), 0);
    let entries = app.entries().await;
    assert!(entries.is_empty(), "nothing was held: {entries:?}");
}

store_test!(five_hundred_concurrent_streams_on_a_budget_for_one_hundred);
async fn five_hundred_concurrent_streams_on_a_budget_for_one_hundred(place: Place) {
    let (app, _) = spawn_proxy_at(place).await;
    let hold = hold_of(20);
    add_budget(&app, "fits-100", Money::from_nanos(hold.nanos() * 100)).await;
    let app = Arc::new(app);
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let mut body = chat("gpt-4o-mini", 20);
            body["stream"] = json!(true);
            let r = post_raw(&app, "/v1/chat/completions", MEMBER, &body).await;
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, text)
        }));
    }
    let mut served = 0;
    for t in tasks {
        let (status, text) = t.await.unwrap();
        match status {
            200 => {
                assert!(text.ends_with("data: [DONE]\n\n"));
                served += 1;
            }
            402 => assert!(text.contains("budget_exceeded")),
            other => panic!("unexpected {other}: {text}"),
        }
    }
    assert_eq!(
        served, 100,
        "exactly the calls the budget pays for are served"
    );
    for _ in 0..500 {
        if app.services.engine.open_holds() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.services.engine.open_holds(), 0);
    // Streams settle after their last event: wait for the 100 settle entries.
    let mut entries = Vec::new();
    for _ in 0..500 {
        entries = app.entries().await;
        if entries.len() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        entries.len(),
        200,
        "100 holds and 100 settles, nothing else"
    );
    let spent: i64 = entries.iter().map(|e| e.cost_delta.nanos()).sum();
    assert!(spent <= hold.nanos() * 100);
    assert_eq!(spent, hold.nanos() * 100);
    let v = app.verify().await;
    assert!(v.ok(), "{:?}", v.problems);
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_charged_for_what_was_generated() {
    let (app, _) = spawn_proxy().await;
    let resp = post_raw(
        &app,
        "/v1/chat/completions",
        MEMBER,
        &json!({"model": "gpt-4.1-nano", "max_tokens": 500, "stream": true,
                      "messages": [{"role": "user", "content": "Tell me a long story."}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let id = auth_id(resp.headers());
    let held: Money = Money::parse(
        resp.headers()
            .get("x-bursar-held")
            .unwrap()
            .to_str()
            .unwrap(),
    )
    .unwrap();
    let mut stream = resp.bytes_stream();
    let mut got = 0;
    while got < 200 {
        got += stream.next().await.unwrap().unwrap().len();
    }
    drop(stream);
    let entries = finished_entries(&app, id).await;
    let settle = entries.iter().find(|e| e.1 == EntryKind::Settle).unwrap();
    let row = settle_row(&app, id).await;
    assert!(
        row.usage.output_tokens > 0 && row.usage.output_tokens < 200,
        "{row:?}"
    );
    assert!(
        settle.3 > Money::ZERO && settle.3 < held,
        "partial cost {} of {held}",
        settle.3
    );
    assert_ne!(row.flags & flags::ESTIMATED, 0, "counted, not reported");
    assert_eq!(app.services.engine.open_holds(), 0);
}

#[tokio::test]
async fn a_stream_that_outruns_its_hold_is_cut_and_settled_at_what_was_generated() {
    let (app, _) = spawn_proxy().await;
    let r = post_raw(
        &app,
        "/v1/chat/completions",
        MEMBER,
        &json!({"model": "gpt-5-nano", "max_tokens": 50, "stream": true,
                      "messages": [{"role": "user", "content": "go"}]}),
    )
    .await;
    let id = auth_id(r.headers());
    let text = r.text().await.unwrap();
    assert!(text.contains("stream_exceeded_hold"), "{text}");
    finished_entries(&app, id).await;
    let row = settle_row(&app, id).await;
    // Cut within the chunk that crossed the cap (4 tokens a chunk): what the provider
    // generated is charged, and the part past the hold is an overage, never hidden.
    assert!((50..=54).contains(&row.usage.output_tokens), "{row:?}");
    assert_ne!(row.flags & flags::ESTIMATED, 0);
    assert_eq!(
        row.flags & flags::OVERAGE != 0,
        row.usage.output_tokens > 50,
        "{row:?}"
    );
}

#[tokio::test]
async fn fallback_on_failures_then_the_circuit_opens_and_closes() {
    let (app, up) = spawn_proxy().await;
    up.mode.store(FAIL, Ordering::SeqCst);
    // sonar fails on its provider (after one retry) and falls back to gpt-4o-mini.
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("sonar", 50))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.headers["x-bursar-model"], "gpt-4o-mini");
    assert_eq!(up.hits.load(Ordering::SeqCst), 2, "one try and one retry");
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("sonar", 50))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits.load(Ordering::SeqCst), 4);
    assert!(app.services.proxy.upstreams.circuit_open("flaky"));
    // Open: the provider is not called at all.
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("sonar", 50))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits.load(Ordering::SeqCst), 4);
    // The failed hops were voided at $0: nothing is held, nothing charged for them.
    let entries = app.entries().await;
    let voids: Vec<_> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Void)
        .collect();
    assert_eq!(voids.len(), 3);
    assert!(voids.iter().all(|v| v.cost_delta == Money::ZERO));
    // The provider recovers; after the open time one probe goes through and closes it.
    up.mode.store(OK, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("sonar", 50))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-bursar-model"], "sonar");
    assert_eq!(up.hits.load(Ordering::SeqCst), 5);
    assert!(!app.services.proxy.upstreams.circuit_open("flaky"));
    assert_eq!(app.services.engine.open_holds(), 0);
}

#[tokio::test]
async fn a_request_the_provider_refuses_is_not_retried_and_costs_nothing() {
    let (app, up) = spawn_proxy().await;
    up.mode.store(REFUSE, Ordering::SeqCst);
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("sonar", 50))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.body["error"]["code"], "invalid_value",
        "the provider's own error"
    );
    assert_eq!(up.hits.load(Ordering::SeqCst), 1, "a 400 is never retried");
    assert_one_call_voided_at_zero(&app).await;
    assert!(!app.services.proxy.upstreams.circuit_open("flaky"));
}

/// The ledger holds one call: its hold, then its void at $0.
async fn assert_one_call_voided_at_zero(app: &TestApp) {
    let entries = app.entries().await;
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[1].kind, EntryKind::Void);
    assert_eq!(entries[1].cost_delta, Money::ZERO);
}

#[tokio::test]
async fn a_provider_redirect_is_not_followed_and_costs_nothing() {
    let (app, up) = spawn_proxy().await;
    up.mode.store(REDIRECT, Ordering::SeqCst);
    // gpt-3.5-turbo has no fallback: the redirect is the call's answer.
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("gpt-3.5-turbo", 50))
        .await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "provider_redirect", "{:?}", r.body);
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        1,
        "a redirect is not retried"
    );
    assert_eq!(
        up.elsewhere.load(Ordering::SeqCst),
        0,
        "nor followed: the call never reaches an address nobody configured"
    );
    assert_one_call_voided_at_zero(&app).await;
    assert_eq!(app.services.engine.open_holds(), 0);
    // With a fallback, the redirecting provider's hop fails and the next model answers.
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("sonar", 50))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.headers["x-bursar-model"], "gpt-4o-mini");
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);
    assert_eq!(up.elsewhere.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_answer_over_max_answer_bytes_is_not_read_and_a_billed_one_is_settled_at_its_hold() {
    let price = PriceBook::builtin()
        .unwrap()
        .resolve("gpt-3.5-turbo")
        .unwrap()
        .price_at(start_time())
        .unwrap()
        .clone();
    // (mode, billed): a 2xx was billed by the provider, a 500 was not. A gateway each, so
    // no circuit is opened by the one before.
    for (mode, billed) in [(HUGE, true), (HUGE_CHUNKED, true), (HUGE_FAILURE, false)] {
        let (app, up) = spawn_proxy().await;
        up.mode.store(mode, Ordering::SeqCst);
        // gpt-3.5-turbo has no fallback; sonar's would spend again.
        let r = app
            .post("/v1/chat/completions", MEMBER, chat("gpt-3.5-turbo", 50))
            .await;
        assert_eq!(
            (r.status, r.code()),
            (502, "provider_answer_too_large"),
            "mode {mode}: {:?}",
            r.body["error"]
        );
        assert_eq!(
            up.hits.load(Ordering::SeqCst),
            1,
            "mode {mode}: not retried (the provider would answer the same)"
        );
        let entries = app.entries().await;
        let kinds: Vec<EntryKind> = entries.iter().map(|e| e.kind).collect();
        if billed {
            assert_eq!(
                kinds,
                vec![EntryKind::Hold, EntryKind::Settle],
                "mode {mode}"
            );
            // The hold's worst case: the prompt and every output token it pays for.
            let settle = &entries[1];
            assert_eq!(settle.usage.output_tokens, 50, "mode {mode}");
            assert!(settle.usage.input_tokens > 0, "mode {mode}");
            assert_eq!(settle.cost_delta, price.cost(&settle.usage), "mode {mode}");
            assert!(settle.cost_delta > Money::ZERO);
            assert_ne!(settle.flags & flags::ESTIMATED, 0, "mode {mode}");
        } else {
            assert_one_call_voided_at_zero(&app).await;
        }
        assert_eq!(app.services.engine.open_holds(), 0, "mode {mode}");
    }
}

#[tokio::test]
async fn drift_is_recorded_and_priced_as_the_model_used() {
    let (app, _) = spawn_proxy().await;
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("gpt-4.1-mini", 50))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let row = settle_row(&app, auth_id(&r.headers)).await;
    assert_ne!(row.flags & flags::DRIFT, 0);
    assert_eq!(row.model_used.as_deref(), Some("gpt-4.1"));
    let book = PriceBook::builtin().unwrap();
    let expected = book
        .resolve("gpt-4.1")
        .unwrap()
        .price_at(start_time())
        .unwrap()
        .cost(&row.usage);
    assert_eq!(row.cost, expected);
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_and_ratelimit_headers() {
    let (app, _) = spawn_proxy().await;
    let key = "bsr_test_proxy_limited_0000000000";
    let r = app
        .post("/v1/chat/completions", key, chat("fast", 10))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-ratelimit-limit-requests"], "2");
    assert_eq!(r.headers["x-ratelimit-remaining-requests"], "1");
    // The next request is allowed again in 30 s (two a minute), as OpenAI writes it.
    let reset = r.headers["x-ratelimit-reset-requests"].to_str().unwrap();
    let ms: u64 = reset.strip_suffix("ms").unwrap().parse().unwrap();
    assert!((1..=30_000).contains(&ms), "{reset}");
    app.post("/v1/chat/completions", key, chat("fast", 10))
        .await;
    let r = app
        .post("/v1/chat/completions", key, chat("fast", 10))
        .await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"));
    assert!(r.headers.get("retry-after").is_some());
}

#[tokio::test]
async fn a_provider_that_hangs_is_cut_at_its_timeout_and_the_hold_released() {
    let (app, _) = spawn_proxy().await;
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("grok-3-mini", 50))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (504, "provider_timeout"),
        "{:?}",
        r.body
    );
    let entries = app.entries().await;
    let kinds: Vec<EntryKind> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, vec![EntryKind::Hold, EntryKind::Void]);
    assert_eq!(entries[1].cost_delta, Money::ZERO, "nothing was generated");
    assert_eq!(app.services.engine.open_holds(), 0);
}

#[tokio::test]
async fn a_malformed_answer_is_settled_from_counted_tokens_never_at_zero() {
    let (app, up) = spawn_proxy().await;
    up.mode.store(MALFORMED, Ordering::SeqCst);
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("sonar", 50))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (502, "provider_malformed_answer"),
        "{:?}",
        r.body
    );
    let id = auth_id_of_first_hold(&app).await;
    let row = settle_row(&app, id).await;
    assert!(row.cost > Money::ZERO);
    assert_ne!(row.flags & flags::ESTIMATED, 0);
    assert_eq!(app.services.engine.open_holds(), 0);
}

#[tokio::test]
async fn an_answer_without_usage_is_settled_from_counted_tokens_and_overage_shown() {
    let (app, _) = spawn_proxy().await;
    // This provider leaves usage out and ignores max_tokens (300 tokens for 50 asked).
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("gpt-5-nano", 50))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let row = settle_row(&app, auth_id(&r.headers)).await;
    assert_eq!(row.usage.output_tokens, 300);
    assert_ne!(row.flags & flags::ESTIMATED, 0);
    assert_ne!(row.flags & flags::OVERAGE, 0);
}

#[tokio::test]
async fn a_client_that_leaves_before_a_whole_answer_is_still_settled() {
    let (app, _) = spawn_proxy().await;
    let r = app
        .http
        .post(format!("{}/v1/chat/completions", app.base))
        .bearer_auth(MEMBER)
        .timeout(Duration::from_millis(150))
        .json(&chat("gpt-5-mini", 50))
        .send()
        .await;
    assert!(
        r.is_err(),
        "the client gave up before the provider answered"
    );
    for _ in 0..300 {
        let entries = app.entries().await;
        if let Some(settle) = entries.iter().find(|e| e.kind == EntryKind::Settle) {
            assert_eq!(settle.usage.output_tokens, 20, "the provider's own usage");
            assert_eq!(settle.flags & flags::ESTIMATED, 0);
            assert!(settle.cost_delta > Money::ZERO);
            assert_eq!(app.services.engine.open_holds(), 0);
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the call was never settled");
}

/// An Anthropic-compatible upstream over real HTTP that checks the key and version
/// headers Bursar must send.
async fn anthropic_upstream(headers: axum::http::HeaderMap, body: Bytes) -> Response {
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let version = headers
        .get("anthropic-version")
        .and_then(|v| v.to_str().ok());
    if key != Some("sk-ant-test-key")
        || version != Some("2023-06-01")
        || headers.contains_key("authorization")
    {
        return (StatusCode::UNAUTHORIZED, "{\"type\":\"error\",\"error\":{\"type\":\"authentication_error\",\"message\":\"bad key\"}}").into_response();
    }
    let Ok(Value::Object(map)) = serde_json::from_slice(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let sim = Simulator::new(SimSettings {
        completion_tokens: 12,
        ..SimSettings::default()
    });
    sim::into_response(sim.chat(Dialect::Anthropic, &map))
}

#[tokio::test]
async fn an_anthropic_provider_gets_its_key_from_the_environment_and_streams_through() {
    let router = axum::Router::new().route("/v1/messages", axum::routing::post(anthropic_upstream));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    // Only this test reads this variable.
    std::env::set_var("BURSAR_TEST_ANTHROPIC_KEY", "sk-ant-test-key");
    let config = CONFIG.replace("UPSTREAM", "http://127.0.0.1:9").replace(
        "[[providers]]\nname = \"sim\"",
        &format!("[[providers]]\nname = \"anthropic\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\napi_key_env = \"BURSAR_TEST_ANTHROPIC_KEY\"\nserves = [\"anthropic\"]\n\n[[providers]]\nname = \"sim\""),
    );
    let app = spawn_app_with(&config).await;
    let ask =
        |stream: bool| {
            app.http
            .post(format!("{}/v1/messages", app.base))
            .header("x-api-key", MEMBER)
            .json(&json!({"model": "claude-3-5-haiku-20241022", "max_tokens": 50, "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
        };
    let r = ask(false).await.unwrap();
    assert_eq!(r.status(), 200);
    let id = auth_id(r.headers());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["output_tokens"], 12);
    assert_eq!(settle_row(&app, id).await.usage.output_tokens, 12);

    let r = ask(true).await.unwrap();
    assert_eq!(r.status(), 200);
    let id = auth_id(r.headers());
    let text = r.text().await.unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
    finished_entries(&app, id).await;
    let row = settle_row(&app, id).await;
    assert_eq!(row.usage.output_tokens, 12);
    assert_eq!(row.flags & flags::ESTIMATED, 0, "usage from message_delta");

    // The OpenAI endpoint reaches the Anthropic provider through translation: the
    // upstream (which checks Anthropic's shape) gets a Messages request, the client an
    // OpenAI answer, and the ledger the provider's usage.
    let mut body = chat("claude-3-5-haiku", 40);
    body["messages"] = json!([{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "Say something about budgets."}]);
    let r = app.post("/v1/chat/completions", MEMBER, body.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["object"], "chat.completion");
    assert_eq!(r.body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r.body["choices"][0]["finish_reason"], "stop");
    assert_eq!(r.body["usage"]["completion_tokens"], 12);
    let content = r.body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(tokens::count_text(TokenizerKind::O200kBase, content), 12);
    let row = settle_row(&app, auth_id(&r.headers)).await;
    assert_eq!(row.usage.output_tokens, 12);
    assert_eq!(
        row.usage.input_tokens,
        r.body["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(row.flags & flags::ESTIMATED, 0);

    // Streamed, with the usage chunk the client asked for, and `[DONE]` at the end.
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = post_raw(&app, "/v1/chat/completions", MEMBER, &body).await;
    assert_eq!(resp.status(), 200);
    let id = auth_id(resp.headers());
    let text = resp.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("event:"), "no Anthropic event names: {text}");
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(tokens::count_text(TokenizerKind::O200kBase, &streamed), 12);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    finished_entries(&app, id).await;
    let row = settle_row(&app, id).await;
    assert_eq!(row.usage.output_tokens, 12);
    assert_eq!(row.flags & flags::ESTIMATED, 0);

    // What Anthropic cannot be told is refused before any hold, naming the field.
    let mut bad = chat("claude-3-5-haiku", 40);
    bad["logprobs"] = json!(true);
    let r = app.post("/v1/chat/completions", MEMBER, bad).await;
    assert_eq!(
        (r.status, r.code()),
        (400, "unsupported_parameter"),
        "{:?}",
        r.body
    );
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`logprobs`"));
    // Embeddings cannot go to an Anthropic provider: 400, nothing held.
    let r = app
        .post(
            "/v1/embeddings",
            MEMBER,
            json!({"model": "claude-3-5-haiku", "input": "x"}),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let entries = app.entries().await;
    assert_eq!(
        entries.len(),
        8,
        "four calls held and settled; the refused ones held nothing"
    );
}

#[tokio::test]
async fn the_body_goes_upstream_as_written_and_what_was_counted_as_counted() {
    let (app, up) = spawn_proxy().await;
    // Plain messages and the fields Bursar does not read go as the client wrote them:
    // escapes, spacing inside values, numbers no f64 holds.
    let raw = r#"{"model":"gpt-3.5-turbo", "temperature":0.50, "seed":18446744073709551616,
        "logit_bias":{"50256": -100}, "messages":[{"role":"user","content":"caf\u00e9?"}]}"#;
    let r = app
        .raw_post("/v1/chat/completions", MEMBER, raw.as_bytes().to_vec())
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sent = String::from_utf8(up.last_raw.lock().to_vec()).unwrap();
    for kept in [
        r#""temperature":0.50"#,
        r#""seed":18446744073709551616"#,
        r#""logit_bias":{"50256": -100}"#,
        r#""messages":[{"role":"user","content":"caf\u00e9?"}]"#,
        r#""model":"gpt-3.5-turbo""#,
    ] {
        assert!(sent.contains(kept), "{kept} not in {sent}");
    }
    // Messages read as values (a tool call here) go as they were read and counted: a
    // name given twice inside one reaches the provider once, the copy Bursar counted.
    let raw = r#"{"model":"gpt-3.5-turbo","messages":[
        {"role":"user","content":"hi"},
        {"role":"assistant","content":"a long text the provider might read instead","content":"ok",
         "tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
        {"role":"tool","tool_call_id":"c1","content":"done"}]}"#;
    let r = app
        .raw_post("/v1/chat/completions", MEMBER, raw.as_bytes().to_vec())
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sent = String::from_utf8(up.last_raw.lock().to_vec()).unwrap();
    assert!(!sent.contains("a long text"), "{sent}");
    let sent: Value = serde_json::from_str(&sent).unwrap();
    assert_eq!(sent["messages"][1]["content"], "ok");
    assert_eq!(sent["messages"][2]["tool_call_id"], "c1");
}

#[tokio::test]
async fn anthropic_clients_reach_openai_models_through_translation() {
    let (app, up) = spawn_proxy().await;
    let ask = |body: Value| {
        app.http
            .post(format!("{}/v1/messages", app.base))
            .header("x-api-key", MEMBER)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    let body = json!({"model": "gpt-3.5-turbo", "max_tokens": 50, "system": "be brief",
                      "stop_sequences": ["END"],
                      "messages": [{"role": "user", "content": "Say something about budgets."}]});
    let r = ask(body.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    let id = auth_id(r.headers());
    let v: Value = r.json().await.unwrap();
    // The OpenAI-compatible upstream got OpenAI's shape.
    let sent = up.last.lock().clone();
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "be brief"})
    );
    assert_eq!(sent["stop"], json!(["END"]));
    assert_eq!(sent["max_completion_tokens"], 50);
    assert!(sent.get("system").is_none() && sent.get("max_tokens").is_none());
    // The client got Anthropic's.
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["output_tokens"], 20);
    let row = settle_row(&app, id).await;
    assert_eq!(row.usage.output_tokens, 20);
    assert_eq!(
        row.usage.input_tokens,
        v["usage"]["input_tokens"].as_u64().unwrap()
    );

    // Streamed: Bursar asks the upstream for its usage chunk and turns the chunks into
    // Anthropic's events, ending with the usage in `message_delta`.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = ask(streamed).await.unwrap();
    assert_eq!(r.status(), 200);
    let id = auth_id(r.headers());
    assert_eq!(
        up.last.lock()["stream_options"]["include_usage"],
        true,
        "asked for usage upstream"
    );
    let text = r.text().await.unwrap();
    let names: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("event: "))
        .filter_map(|e| e.split('\n').next())
        .collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(!text.contains("[DONE]"), "{text}");
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let said: String = events
        .iter()
        .filter_map(|e| e["delta"]["text"].as_str())
        .collect();
    assert_eq!(tokens::count_text(TokenizerKind::O200kBase, &said), 20);
    let delta = events
        .iter()
        .find(|e| e["type"] == "message_delta")
        .unwrap();
    assert_eq!(delta["usage"]["output_tokens"], 20);
    finished_entries(&app, id).await;
    let row = settle_row(&app, id).await;
    assert_eq!(row.usage.output_tokens, 20);
    assert_eq!(row.flags & flags::ESTIMATED, 0, "the upstream's own usage");

    // A refusal by the upstream reaches the client in Anthropic's shape, at $0.
    up.mode.store(REFUSE, Ordering::SeqCst);
    let r = ask(body).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["message"], "bad temperature");
    let entries = app.entries().await;
    assert_eq!(entries.last().unwrap().kind, EntryKind::Void);
    assert_eq!(entries.last().unwrap().cost_delta, Money::ZERO);
    assert_eq!(app.services.engine.open_holds(), 0);
}

#[tokio::test]
async fn oversized_headers_are_refused_with_431() {
    let (app, _) = spawn_proxy().await;
    let r = app
        .http
        .post(format!("{}/v1/chat/completions", app.base))
        .bearer_auth(MEMBER)
        .header("x-bursar-tag-huge", "x".repeat(600 << 10))
        .json(&chat("fast", 10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(app.services.engine.open_holds(), 0);
}

#[tokio::test]
async fn the_response_cache_answers_at_zero_and_records_the_cost_saved() {
    let (app, _) = spawn_proxy().await;
    let key = "bsr_test_proxy_cached_00000000000";
    let first = app
        .post("/v1/chat/completions", key, chat("fast", 100))
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.headers["x-bursar-cache"], "miss");
    let cost = first.headers["x-bursar-cost"].to_str().unwrap().to_string();
    settle_row(&app, auth_id(&first.headers)).await;

    let hit = app
        .post("/v1/chat/completions", key, chat("fast", 100))
        .await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.headers["x-bursar-cache"], "hit");
    assert_eq!(hit.body, first.body, "the same answer");
    assert_eq!(hit.headers["x-bursar-cost"], "0");
    assert_eq!(hit.headers["x-bursar-cost-saved"].to_str().unwrap(), cost);
    let entries = app.entries().await;
    let kinds: Vec<EntryKind> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![EntryKind::Hold, EntryKind::Settle, EntryKind::Adjustment]
    );
    let h = &entries[2];
    assert_ne!(h.flags & flags::CACHE_HIT, 0);
    assert_eq!((h.cost_delta, h.held_delta), (Money::ZERO, Money::ZERO));
    assert_eq!(
        h.usage, entries[1].usage,
        "the usage the answer had, for the cost saved"
    );

    // Another body, another tag, or a stream is not a hit; nor is the other tenant.
    let other = app
        .post("/v1/chat/completions", key, chat("fast", 99))
        .await;
    assert_eq!(other.headers["x-bursar-cache"], "miss");
    let r = app
        .http
        .post(format!("{}/v1/chat/completions", app.base))
        .bearer_auth(key)
        .header("x-bursar-campaign", "spring")
        .json(&chat("fast", 100))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-bursar-cache"], "miss");
    let p = app
        .post("/v1/chat/completions", MEMBER, chat("fast", 100))
        .await;
    assert!(
        p.headers.get("x-bursar-cache").is_none(),
        "tenant p has no cache"
    );

    // After the TTL the answer is asked for again.
    app.clock.advance(Duration::from_secs(61));
    let again = app
        .post("/v1/chat/completions", key, chat("fast", 100))
        .await;
    assert_eq!(again.headers["x-bursar-cache"], "miss");
    settle_row(&app, auth_id(&again.headers)).await;
    let v = app.verify().await;
    assert!(v.ok(), "{:?}", v.problems);
}

/// The cache is opt-in per key too: a key with its own TTL caches in a tenant without
/// one; the tenant's other keys neither read nor fill it.
#[tokio::test]
async fn a_key_can_opt_in_to_the_response_cache_on_its_own() {
    let (app, _) = spawn_proxy().await;
    let cached = "bsr_test_proxy_p_cached_000000000";
    let first = app
        .post("/v1/chat/completions", cached, chat("fast", 100))
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.headers["x-bursar-cache"], "miss");
    let hit = app
        .post("/v1/chat/completions", cached, chat("fast", 100))
        .await;
    assert_eq!(hit.headers["x-bursar-cache"], "hit");
    assert_eq!(hit.body, first.body);
    // Tenant p has no cache: its other keys call the provider.
    let other = app
        .post("/v1/chat/completions", MEMBER, chat("fast", 100))
        .await;
    assert_eq!(other.status, 200);
    assert!(other.headers.get("x-bursar-cache").is_none());

    // A key made through the admin API opts in the same way; a TTL out of range is
    // refused.
    let admin = "bsr_test_proxy_p_admin_0000000000";
    let bad = app
        .post(
            "/v1/admin/tenants/p/keys",
            admin,
            json!({"name": "bad", "cache_ttl_secs": 0}),
        )
        .await;
    assert_eq!((bad.status, bad.code()), (422, "invalid_request"));
    let made = app
        .post(
            "/v1/admin/tenants/p/keys",
            admin,
            json!({"name": "made", "cache_ttl_secs": 30}),
        )
        .await;
    assert_eq!(made.status, 201, "{:?}", made.body);
    assert_eq!(made.body["key"]["cache_ttl_secs"], 30);
    let secret = made.body["secret"].as_str().unwrap().to_string();
    let r = app
        .post("/v1/chat/completions", &secret, chat("fast", 42))
        .await;
    assert_eq!(r.headers["x-bursar-cache"], "miss");
    let r = app
        .post("/v1/chat/completions", &secret, chat("fast", 42))
        .await;
    assert_eq!(r.headers["x-bursar-cache"], "hit");
    // After the key's own TTL (30 s), not the tenant's: a miss again.
    app.clock.advance(Duration::from_secs(31));
    let r = app
        .post("/v1/chat/completions", &secret, chat("fast", 42))
        .await;
    assert_eq!(r.headers["x-bursar-cache"], "miss");
}

/// With Redis, instances share the response cache: an answer one instance got is a hit
/// on another, which records it in its own ledger at $0 with the cost saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_sharing_redis_share_the_response_cache() {
    let Some(redis) = crate::redis::test_redis_url() else {
        return;
    };
    let (_up, url) = spawn_upstream().await;
    let config = format!(
        "[server]\nredis_url = \"{redis}\"\nredis_prefix = \"cache-{}\"\n{}",
        uuid::Uuid::now_v7().simple(),
        CONFIG.replace("UPSTREAM", &url)
    );
    let first = spawn_app_at(&config, Place::sqlite()).await;
    let second = spawn_app_at(&config, Place::sqlite()).await;
    let key = "bsr_test_proxy_cached_00000000000";
    let miss = first
        .post("/v1/chat/completions", key, chat("fast", 100))
        .await;
    assert_eq!(miss.status, 200, "{:?}", miss.body);
    assert_eq!(miss.headers["x-bursar-cache"], "miss");

    let hit = second
        .post("/v1/chat/completions", key, chat("fast", 100))
        .await;
    assert_eq!(hit.status, 200, "{:?}", hit.body);
    assert_eq!(hit.headers["x-bursar-cache"], "hit");
    assert_eq!(hit.body, miss.body, "the same answer");
    assert_eq!(hit.headers["x-bursar-cost"], "0");
    assert_eq!(
        hit.headers["x-bursar-cost-saved"],
        miss.headers["x-bursar-cost"],
    );
    // No call on the second instance: no hold, only the hit.
    let entries = second.entries().await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].kind, EntryKind::Adjustment);
    assert_ne!(entries[0].flags & flags::CACHE_HIT, 0);
    // Another body is a miss on either.
    let other = second
        .post("/v1/chat/completions", key, chat("fast", 99))
        .await;
    assert_eq!(other.headers["x-bursar-cache"], "miss");
}

#[tokio::test]
async fn the_output_cap_bursar_sets_goes_in_the_field_the_provider_takes() {
    let (app, up) = spawn_proxy().await;
    let no_cap =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    // OpenAI's own models get max_completion_tokens (the plan's cap for the task).
    let r = app
        .post("/v1/chat/completions", MEMBER, no_cap("gpt-3.5-turbo"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sent = up.last.lock().clone();
    assert_eq!(sent["max_completion_tokens"], 1000);
    assert!(sent.get("max_tokens").is_none(), "{sent}");
    // Other providers get max_tokens.
    let r = app
        .post("/v1/chat/completions", MEMBER, no_cap("sonar"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sent = up.last.lock().clone();
    assert_eq!(sent["max_tokens"], 1000);
    assert!(sent.get("max_completion_tokens").is_none(), "{sent}");
    // A cap the client gave stays in its field, shaped.
    let r = app
        .post("/v1/chat/completions", MEMBER, chat("gpt-3.5-turbo", 5000))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(up.last.lock()["max_tokens"], 1000);
}
