//! A proxied chat completion in process: Bursar's router, the embedded store (a real
//! SQLite file and the intent journal, `process` durability) and the built-in simulated
//! provider answering in process (0 ms latency, 64 output tokens). No sockets, so what
//! is measured is Bursar's own work and the simulator's, not the kernel's.
//!
//! Criterion measures the mean of a whole call, through Bursar and (for comparison) to
//! the simulator's router alone, for the short request of `bench/chat.lua` and for a
//! 4 KB conversation. A second pass sends calls one after another (200,000 short, 50,000
//! long) and collects every value Bursar records in `bursar_proxy_overhead_seconds`
//! (request time minus provider time: the figure the SPEC's target is stated in) through
//! a recorder installed for the bench, then prints its p50/p99/p99.9.

// A benchmark's job is to print its figures.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use bursar_core::config::Config;
use bursar_core::pricebook::PriceBook;
use criterion::Criterion;
use parking_lot::Mutex;
use tower::ServiceExt;

/// The allocator of the `bursar` binary, so the figures are those of the server.
#[cfg(not(feature = "bench-system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "bsr_bench_member_00000000000000000";
/// The HTTP load benchmark's configuration (four budgets every call touches, a rate
/// limit checked but never reached), with the simulated provider serving every model.
const CONFIG: &str = include_str!("../../../bench/bench.toml");
const PROVIDER: &str = r#"
[[providers]]
name = "simulated"
kind = "simulated"
serves = ["*"]
"#;
/// The request of `bench/chat.lua`.
const BODY: &str = r#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Write one line about budgets."}]}"#;

/// A request of the size applications send: a 2 KB system prompt, six turns, and a new
/// question of 250 bytes (about 4 KB of text). Call `i` asks its own question, as the
/// next turn of a conversation does: the rest was seen by the calls before it.
fn long_body(i: u64) -> String {
    let system =
        "You are the support assistant of an online shop. Answer in the customer's language, \
        quote order numbers exactly, never promise refunds above 100 EUR without a human, \
        and keep answers under 120 words. "
            .repeat(10);
    let turn = "My order 1048-2231 arrived with a cracked screen; the box looked fine. \
        Can I get a replacement before Friday, or should I return it first? ";
    let messages: Vec<serde_json::Value> = std::iter::once(serde_json::json!({"role": "system", "content": system}))
        .chain((0..6).flat_map(|i| {
            [
                serde_json::json!({"role": "user", "content": format!("{turn} (message {i})")}),
                serde_json::json!({"role": "assistant", "content": "I am sorry to hear that. Let me check order 1048-2231 for you: a replacement can ship today."}),
            ]
        }))
        .chain(std::iter::once(serde_json::json!({"role": "user", "content": format!(
            "Thanks. Question {i}: could you send the invoice for order 1048-2231 again, with the \
            replacement listed on it, to the billing address rather than the delivery one? \
            Our accounts team needs it before the end of the month, and the first copy was lost."
        )})))
        .collect();
    serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 64, "messages": messages}).to_string()
}

/// Keeps every value recorded in one histogram.
struct Collect {
    name: &'static str,
    values: Arc<Mutex<Vec<f64>>>,
}

struct Push(Arc<Mutex<Vec<f64>>>);

impl metrics::HistogramFn for Push {
    fn record(&self, value: f64) {
        self.0.lock().push(value);
    }
}

impl metrics::Recorder for Collect {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if key.name() == self.name {
            metrics::Histogram::from_arc(Arc::new(Push(self.values.clone())))
        } else {
            metrics::Histogram::noop()
        }
    }
}

struct Setup {
    rt: tokio::runtime::Runtime,
    app: Router,
    sim: Router,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    // One worker, as on a machine whose other core runs the writer and the load.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let book = Arc::new(PriceBook::builtin().unwrap());
    let mut config =
        Config::parse(&format!("{CONFIG}\n{PROVIDER}"), &book, chrono::Utc::now()).unwrap();
    config.server.data_dir = Some(dir.path().display().to_string());
    let location = bursar_store::Location::data_dir(dir.path());
    let sim = bursar_server::sim::router(bursar_core::providers::SimSettings::default());
    let services = rt.block_on(async {
        let (services, _writer) = bursar_server::build(
            config,
            book,
            &location,
            true,
            Arc::new(bursar_server::SystemClock),
        )
        .await
        .unwrap();
        services
    });
    let app = bursar_server::router(services);
    let s = Setup {
        rt,
        app,
        sim,
        _dir: dir,
    };
    // The first call loads the tokenizer.
    call(&s, &s.app);
    call(&s, &s.sim);
    s
}

fn call(s: &Setup, router: &Router) {
    send(s, router, BODY.to_string());
}

fn send(s: &Setup, router: &Router, body: String) {
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {SECRET}"))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    // On the runtime's worker, as a connection's task runs it in the server (the call
    // runs on that task).
    let router = router.clone();
    let body =
        s.rt.block_on(s.rt.spawn(async move {
            let resp = router.oneshot(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap()
        }))
        .unwrap();
    std::hint::black_box(body);
}

fn bench(c: &mut Criterion, s: &Setup) {
    c.bench_function("chat completion to the simulated provider alone", |b| {
        b.iter(|| call(s, &s.sim))
    });
    c.bench_function(
        "chat completion through Bursar (4 budgets, rate limit, journal)",
        |b| b.iter(|| call(s, &s.app)),
    );
    let mut i = 0;
    c.bench_function(
        "long chat (4 KB prompt) to the simulated provider alone",
        |b| {
            b.iter(|| {
                i += 1;
                send(s, &s.sim, long_body(i))
            })
        },
    );
    c.bench_function("long chat (4 KB prompt) through Bursar", |b| {
        b.iter(|| {
            i += 1;
            send(s, &s.app, long_body(i))
        })
    });
}

fn percentiles(
    s: &Setup,
    values: &Mutex<Vec<f64>>,
    what: &str,
    body: impl Fn(u64) -> String,
    n: usize,
) {
    values.lock().clear();
    let hits = bursar_core::tokens::counted_from_cache();
    let wall = Instant::now();
    for i in 0..n {
        send(s, &s.app, body(i as u64));
    }
    let wall = wall.elapsed();
    let hits = bursar_core::tokens::counted_from_cache() - hits;
    let mut v = std::mem::take(&mut *values.lock());
    assert_eq!(v.len(), n, "every call records its overhead once");
    v.sort_by(f64::total_cmp);
    let at = |q: f64| Duration::from_secs_f64(v[((v.len() as f64 * q) as usize).min(v.len() - 1)]);
    println!(
        "bursar_proxy_overhead_seconds, {what}, {n} calls in process: p50 {:.1?}, p99 {:.1?}, p99.9 {:.1?}, max {:.1?}; {:.0} calls/s on one worker; {hits} texts counted from the cache",
        at(0.50),
        at(0.99),
        at(0.999),
        at(1.0),
        n as f64 / wall.as_secs_f64()
    );
}

fn main() {
    let values = Arc::new(Mutex::new(Vec::new()));
    metrics::set_global_recorder(Collect {
        name: "bursar_proxy_overhead_seconds",
        values: values.clone(),
    })
    .expect("the bench's recorder is the first");
    // `BURSAR_BENCH_CALLS=SHORT,LONG` sends that many calls of each instead (under
    // callgrind, say, where 200,000 would take hours).
    let calls: Vec<usize> = std::env::var("BURSAR_BENCH_CALLS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let (short, long) = match calls[..] {
        [short, long] => (short, long),
        _ => (200_000, 50_000),
    };
    let s = setup();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &s);
    c.final_summary();
    if short > 0 {
        percentiles(&s, &values, "short chat", |_| BODY.to_string(), short);
    }
    if long > 0 {
        percentiles(
            &s,
            &values,
            "long chat (4 KB prompt)",
            |i| long_body(1 << 32 | i),
            long,
        );
    }
}
