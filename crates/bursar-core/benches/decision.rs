//! The in-process governance decision: key → plan → rate limit → reserve on 4 scopes.
//!
//! Criterion measures the mean; a second pass times one million single decisions on one
//! thread and prints p50/p99/p99.9 and the rate, which is what the targets are stated in.
//! The sink only enqueues (as the durable store's does), so this is the engine's own cost.

// A benchmark's job is to print its figures.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bursar_core::config::Config;
use bursar_core::engine::{
    AuthorizeRequest, BudgetSet, Engine, LedgerSink, Metered, Prompt, Usage,
};
use bursar_core::ledger::{AlertEvent, Entry, Tags};
use bursar_core::pricebook::{PriceBook, TokenUsage};
use chrono::Utc;
use criterion::{criterion_group, Criterion};

/// The allocator of the `bursar` binary, so the figures are those of the server.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stands for the store's channel: takes the entries, keeps none.
struct NullSink;

impl LedgerSink for NullSink {
    type Ticket = ();
    fn append(&self, entries: Vec<Entry>, _alerts: Vec<AlertEvent>) {
        std::hint::black_box(entries);
    }
}

const SECRET: &str = "bsr_bench_member_00000000000000000";

/// The configuration of the HTTP load benchmark: one tenant, four budgets every call
/// touches, a rate limit that is checked but never reached.
const CONFIG: &str = include_str!("../../../bench/bench.toml");

fn engine() -> Engine {
    let book = Arc::new(PriceBook::builtin().unwrap());
    let config = Config::parse(CONFIG, &book, Utc::now()).unwrap();
    let engine = Engine::new(config.engine.clone(), book);
    engine.set_directory(config.directory.clone());
    for k in config.keys {
        engine.upsert_key(k);
    }
    engine.set_budgets(BudgetSet::from_budgets(config.budgets));
    // 100k other keys, so the key lookup is not a lookup in a map of one.
    for i in 0..100_000u32 {
        let mut k = engine
            .identify(SECRET, Utc::now())
            .unwrap()
            .key
            .as_ref()
            .clone();
        k.id = uuid::Uuid::now_v7();
        k.hash = bursar_core::catalog::KeyHash::of(&format!("bsr_other_{i:032}"));
        engine.upsert_key(k);
    }
    engine
}

fn request() -> AuthorizeRequest {
    AuthorizeRequest {
        metered: Metered::Model {
            model: "gpt-4o-mini".into(),
            prompt: Prompt::Tokens(1200),
            max_tokens: Some(300),
        },
        tags: Tags {
            campaign: Some("launch".into()),
            ..Tags::default()
        },
        idempotency_key: None,
        fingerprint: None,
        ttl: None,
    }
}

/// One decision: identify the key, then authorize (rate limit + reserve on 4 scopes).
fn decide(engine: &Engine) -> uuid::Uuid {
    let now = Utc::now();
    let caller = engine.identify(SECRET, now).unwrap();
    let (permit, ()) = engine
        .authorize(&caller, request(), now, &NullSink)
        .unwrap();
    assert_eq!(permit.budgets.len(), 4);
    permit.authorization_id
}

fn settle(engine: &Engine, id: uuid::Uuid) {
    let usage = Usage {
        tokens: TokenUsage {
            input_tokens: 1200,
            cached_input_tokens: 0,
            output_tokens: 200,
        },
        ..Usage::default()
    };
    engine
        .settle("acme", id, usage, Utc::now(), &NullSink)
        .unwrap();
}

fn bench(c: &mut Criterion) {
    let engine = engine();
    c.bench_function(
        "decision: key → plan → rate limit → reserve on 4 scopes",
        |b| {
            b.iter_custom(|iters| {
                let mut ids = Vec::with_capacity(iters as usize);
                let start = Instant::now();
                for _ in 0..iters {
                    ids.push(decide(&engine));
                }
                let t = start.elapsed();
                // Settling is not part of the decision; it keeps memory flat between samples.
                for id in ids {
                    settle(&engine, id);
                }
                t
            })
        },
    );
    c.bench_function("settle (release the rest of the hold, 4 scopes)", |b| {
        b.iter_custom(|iters| {
            let ids: Vec<_> = (0..iters).map(|_| decide(&engine)).collect();
            let start = Instant::now();
            for id in ids {
                settle(&engine, id);
            }
            start.elapsed()
        })
    });
}

fn percentiles() {
    let engine = engine();
    const N: usize = 1_000_000;
    const CHUNK: usize = 10_000;
    let mut samples: Vec<Duration> = Vec::with_capacity(N);
    let wall = Instant::now();
    let mut busy = Duration::ZERO;
    for _ in 0..N / CHUNK {
        let mut ids = Vec::with_capacity(CHUNK);
        for _ in 0..CHUNK {
            let t = Instant::now();
            ids.push(decide(&engine));
            let d = t.elapsed();
            busy += d;
            samples.push(d);
        }
        for id in ids {
            settle(&engine, id);
        }
        // What the server's sweeper does every second: trim the outcome cache.
        engine.expire_due(Utc::now(), &NullSink);
    }
    samples.sort_unstable();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    println!(
        "decision percentiles over {N} single decisions on one thread: p50 {:?}  p99 {:?}  p99.9 {:?}  max {:?}  → {:.0} decisions/s (time in decisions only; {:.1} s wall with settles)",
        p(0.50),
        p(0.99),
        p(0.999),
        samples[samples.len() - 1],
        N as f64 / busy.as_secs_f64(),
        wall.elapsed().as_secs_f64()
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    percentiles();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
