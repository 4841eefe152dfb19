//! What the durable ledger append adds to a decision: authorize (4 scopes) and wait
//! until the hold entry is durable, with 1, 8 and 64 concurrent callers: under `process`
//! durability, its journal record written (the commit follows, batched); under `power`,
//! its commit to SQLite (WAL, synchronous = FULL, batched). Prints p50/p99/p99.9 of the whole acknowledged
//! decision and the throughput, and the on-disk size per entry.

// A benchmark's job is to print its figures.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bursar_core::config::Config;
use bursar_core::engine::{AuthorizeRequest, BudgetSet, Engine, Metered, Prompt, Usage};
use bursar_core::ledger::Tags;
use bursar_core::pricebook::{PriceBook, TokenUsage};
use bursar_store::sqlite;
use chrono::Utc;

const SECRET: &str = "bsr_bench_member_00000000000000000";

/// The configuration of the HTTP load benchmark: one tenant, four budgets every call
/// touches, a rate limit that is checked but never reached.
const CONFIG: &str = include_str!("../../../bench/bench.toml");

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

fn run(durability: sqlite::Durability, callers: usize, per_caller: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = sqlite::ledger_path(dir.path());
    let opened = sqlite::open(
        &path,
        durability,
        bursar_core::engine::DEFAULT_IDEMPOTENCY_WINDOW,
        bursar_store::Recovery {
            on_entry: |_| {},
            on_catalog: |_| {},
            on_counters: |_| {},
        },
    )
    .unwrap();
    let book = Arc::new(PriceBook::builtin().unwrap());
    let config = Config::parse(CONFIG, &book, Utc::now()).unwrap();
    let engine = Arc::new(Engine::new(config.engine.clone(), book));
    engine.set_directory(config.directory.clone());
    for k in config.keys {
        engine.upsert_key(k);
    }
    engine.set_budgets(BudgetSet::from_budgets(config.budgets));
    let ledger = opened.handle;
    let wall = Instant::now();
    let handles: Vec<_> = (0..callers)
        .map(|_| {
            let (engine, ledger) = (engine.clone(), ledger.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(per_caller);
                for _ in 0..per_caller {
                    let t = Instant::now();
                    let now = Utc::now();
                    let caller = engine.identify(SECRET, now).unwrap();
                    let (p, ticket) = engine.authorize(&caller, request(), now, &ledger).unwrap();
                    ticket.wait_blocking().unwrap();
                    lat.push(t.elapsed());
                    let usage = Usage {
                        tokens: TokenUsage {
                            input_tokens: 1200,
                            cached_input_tokens: 0,
                            output_tokens: 200,
                        },
                        ..Usage::default()
                    };
                    let (_, ticket) = engine
                        .settle("acme", p.authorization_id, usage, Utc::now(), &ledger)
                        .unwrap();
                    ticket.wait_blocking().unwrap();
                }
                lat
            })
        })
        .collect();
    let mut samples: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let elapsed = wall.elapsed();
    samples.sort_unstable();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    let entries = (callers * per_caller * 2) as u64;
    // Acknowledged is durable (journaled or committed); the writer may still be
    // committing: the time until everything is in SQLite is reported too.
    drop(ledger);
    let _ = opened.writer.join();
    let landed = wall.elapsed();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM;")
        .unwrap();
    let bytes = std::fs::metadata(&path).unwrap().len();
    println!(
        "{durability:?} durability, {callers:>3} concurrent callers: durable authorize p50 {:?}  p99 {:?}  p99.9 {:?}  | {:.0} authorize+settle pairs/s ({:.0}/s until all committed) | {} entries, {:.0} bytes/entry on disk (with indexes, counters, dictionary)",
        p(0.50),
        p(0.99),
        p(0.999),
        (callers * per_caller) as f64 / elapsed.as_secs_f64(),
        (callers * per_caller) as f64 / landed.as_secs_f64(),
        entries,
        bytes as f64 / entries as f64,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it once, small.
    let quick = !std::env::args().any(|a| a == "--bench");
    let per = if quick { 20 } else { 4000 };
    for durability in [sqlite::Durability::Process, sqlite::Durability::Power] {
        for callers in [1, 8, 64] {
            run(
                durability,
                callers,
                if callers == 1 { per } else { per / 4 },
            );
        }
    }
}
