//! Several `bursar` processes on one PostgreSQL database share one budget strictly
//! (promise 1 across instances): the lease protocol of ARCHITECTURE.md, "Several
//! instances", with real processes, real HTTP and a real database.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::process::Command;

use bursar_core::budget::{BucketKey, Counter};
use bursar_core::ledger::{EntryKind, Replay};
use bursar_core::Money;
use bursar_store::Location;

mod common;

use common::{start_on, BIN};

const MEMBER: &str = "bsr_multi_member_key_000000000000";

/// One call holds 1,000 prompt tokens at $0.15/M and 100 output tokens at $0.60/M:
/// $0.00021. The budget fits exactly 250 of them.
const FITS: usize = 250;
const CALLS: usize = 2_000;
const CONFIG: &str = r#"
[engine]
hold_ttl_secs = 600
# A call is never shaped below what it asked: it fits whole or is denied, so the
# budget fits exactly 250.
min_output_tokens = 100

[[plans]]
id = "pro"
default_task = "chat"
[plans.tasks.chat]
classes = ["small"]
default_class = "small"
max_tokens = 1000

[[tenants]]
id = "acme"
plan = "pro"

[[keys]]
name = "member"
tenant = "acme"
kind = "member"
secret = "bsr_multi_member_key_000000000000"

[[budgets]]
id = "shared"
tenant = "acme"
scope = "tenant"
window = "lifetime"
limit = "0.0525"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_one_database_permit_exactly_what_the_budget_fits() {
    let Ok(admin) = std::env::var("BURSAR_TEST_POSTGRES_URL") else {
        eprintln!(
            "SKIPPED: set BURSAR_TEST_POSTGRES_URL (e.g. postgres://postgres@127.0.0.1:5432/postgres) to run it; .ci/run does"
        );
        return;
    };
    let url = bursar_store::postgres::scratch_database(&admin)
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("bursar.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let store: Vec<OsString> = vec!["--database-url".into(), url.clone().into()];
    let migrated = Command::new(BIN)
        .args(["migrate", "--config"])
        .arg(&config)
        .args(&store)
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let servers: Vec<_> = (0..3).map(|_| start_on(&store, &config)).collect();

    // 2,000 authorizations at once, spread over the three; each permitted call is
    // settled at its full worst case, on the instance that permitted it.
    let http = reqwest::Client::new();
    let tasks: Vec<_> = (0..CALLS)
        .map(|i| {
            let base = servers[i % servers.len()].base.clone();
            let http = http.clone();
            tokio::spawn(async move {
                let r = http
                    .post(format!("{base}/v1/authorizations"))
                    .bearer_auth(MEMBER)
                    .json(&serde_json::json!({"model": "gpt-4o-mini", "prompt_tokens": 1000, "max_tokens": 100}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap();
                if status != 200 {
                    assert_eq!(status, 402, "{body}");
                    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
                    return false;
                }
                assert_eq!(body["max_tokens"], 100, "never shaped: {body}");
                let id = body["authorization_id"].as_str().unwrap();
                let s = http
                    .post(format!("{base}/v1/authorizations/{id}/settle"))
                    .bearer_auth(MEMBER)
                    .json(&serde_json::json!({"usage": {"input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": 100}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(s.status().as_u16(), 200);
                true
            })
        })
        .collect();
    let mut permitted = 0;
    for t in tasks {
        if t.await.unwrap() {
            permitted += 1;
        }
    }
    assert_eq!(permitted, FITS, "exactly what the budget fits is permitted");

    // The ledger, replayed in order, never has the budget over its limit; it verifies.
    let report = bursar_store::read_entries(&Location::Postgres(url.clone()))
        .await
        .unwrap();
    assert!(
        report.chain_problems.is_empty(),
        "{:?}",
        report.chain_problems
    );
    let limit = Money::parse("0.0525").unwrap();
    let mut replay = Replay::default();
    for (i, e) in report.entries.iter().enumerate() {
        replay.apply(i as u64 + 1, e);
        for b in e.buckets() {
            let used = replay.counters[b].used();
            assert!(
                used <= limit,
                "after entry {}: {b} at {used} > {limit}",
                i + 1
            );
        }
    }
    let counters: HashMap<BucketKey, Counter> = replay.counters;
    let bucket = counters
        .iter()
        .find(|(b, _)| &*b.budget == "shared")
        .map(|(_, c)| *c)
        .unwrap();
    assert_eq!(bucket.spent, limit, "all of it spent, none of it over");
    assert_eq!(bucket.held, Money::ZERO);
    assert_eq!(
        report
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Settle)
            .count(),
        FITS
    );
    let verified = Command::new(BIN)
        .args(["ledger", "verify", "--config"])
        .arg(&config)
        .args(&store)
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    drop(servers);
}
