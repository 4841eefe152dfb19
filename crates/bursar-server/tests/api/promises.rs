//! The promises over HTTP: no overspend, exactly once, nothing lost, provable numbers,
//! shadow mode.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bursar_core::budget::BucketKey;
use bursar_core::ledger::{flags, EntryKind, Replay};
use bursar_core::Money;
use futures::future::join_all;
use serde_json::json;

use crate::helpers::*;
use crate::store_test;

fn ask(prompt_tokens: u64, max_tokens: u32) -> serde_json::Value {
    json!({"model": "gpt-4o-mini", "prompt_tokens": prompt_tokens, "max_tokens": max_tokens})
}

/// Replays the stored ledger in order; after every entry, no bucket of a budget in
/// `limits` may hold + spend more than its limit.
async fn assert_never_over(
    app: &TestApp,
    limits: &HashMap<String, Money>,
) -> HashMap<BucketKey, bursar_core::budget::Counter> {
    let entries = app.entries().await;
    let mut replay = Replay::default();
    for (i, e) in entries.iter().enumerate() {
        replay.apply(i as u64 + 1, e);
        for b in e.buckets() {
            if let Some(limit) = limits.get(&*b.budget) {
                let used = replay.counters[b].used();
                assert!(
                    used <= *limit,
                    "after entry {}: {b} at {used} > {limit}",
                    i + 1
                );
            }
        }
    }
    assert!(replay.problems.is_empty(), "{:?}", replay.problems);
    replay.counters
}

store_test!(exactly_n_of_1000_concurrent_authorizations_fit);
async fn exactly_n_of_1000_concurrent_authorizations_fit(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    // Each call holds 1,000 prompt tokens at $0.15/M + 100 output at $0.60/M = $0.00021.
    let n = 250;
    let limit = Money::from_nanos(Money::parse("0.00021").unwrap().nanos() * n);
    let r = app
        .post(
            "/v1/admin/tenants/b/budgets",
            B_ADMIN,
            json!({"id": "tight", "scope": "tenant", "window": "lifetime", "limit": limit.to_string()}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let calls = (0..1000).map(|_| app.authorize(B_MEMBER, ask(1000, 100)));
    let results = join_all(calls).await;
    let permitted: Vec<_> = results.iter().filter(|r| r.status == 200).collect();
    let denied = results.iter().filter(|r| r.status == 402).count();
    assert_eq!(permitted.len() as i64, n);
    assert_eq!(denied, 1000 - n as usize, "every other answer is a 402");
    assert!(results
        .iter()
        .filter(|r| r.status == 402)
        .all(|r| r.code() == "budget_exceeded" && r.body["error"]["type"] == "insufficient_quota"));

    // Settle the permits concurrently (each below its hold), and check the whole history.
    let settles = permitted.iter().enumerate().map(|(i, p)| {
        let id = p.body["authorization_id"].as_str().unwrap().to_string();
        let app = &app;
        async move {
            app.settle(
                B_MEMBER,
                &id,
                json!({"usage": {"input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": i % 100}}),
            )
            .await
        }
    });
    assert!(join_all(settles).await.iter().all(|r| r.status == 200));
    let limits = HashMap::from([("b.tight".to_string(), limit)]);
    let counters = assert_never_over(&app, &limits).await;
    assert_eq!(counters, app.services.engine.counters());
    let v = app.verify().await;
    assert!(v.ok(), "{:?}", v.problems);
    // Released money is available again: one more call fits now.
    assert_eq!(app.authorize(B_MEMBER, ask(1000, 100)).await.status, 200);
}

store_test!(the_same_idempotency_key_returns_the_first_result_even_concurrently);
async fn the_same_idempotency_key_returns_the_first_result_even_concurrently(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let body = ask(500, 50);
    let calls = (0..50).map(|_| {
        app.send(
            reqwest::Method::POST,
            "/v1/authorizations",
            A_MEMBER,
            Some(&body),
            Some("order-17"),
        )
    });
    let results = join_all(calls).await;
    assert!(
        results.iter().all(|r| r.status == 200),
        "{:?}",
        results[0].body
    );
    let ids: HashSet<&str> = results
        .iter()
        .map(|r| r.body["authorization_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "one authorization for one key");
    assert_eq!(
        results
            .iter()
            .filter(|r| r.body["replayed"] == false)
            .count(),
        1
    );
    // The same key with another body is a conflict.
    let other = app
        .send(
            reqwest::Method::POST,
            "/v1/authorizations",
            A_MEMBER,
            Some(&ask(501, 50)),
            Some("order-17"),
        )
        .await;
    assert_eq!(
        (other.status, other.code()),
        (409, "idempotency_key_reused")
    );

    // Settle twice (also concurrently): charged once.
    let id = ids.into_iter().next().unwrap().to_string();
    let usage =
        json!({"usage": {"input_tokens": 500, "cached_input_tokens": 100, "output_tokens": 20}});
    let settles = join_all((0..10).map(|_| app.settle(A_MEMBER, &id, usage.clone()))).await;
    assert!(settles.iter().all(|r| r.status == 200));
    let costs: HashSet<&str> = settles
        .iter()
        .map(|r| r.body["cost"].as_str().unwrap())
        .collect();
    assert_eq!(costs.len(), 1);
    let entries = app.entries().await;
    let holds = entries.iter().filter(|e| e.kind == EntryKind::Hold).count();
    let settled = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Settle)
        .count();
    assert_eq!((holds, settled), (1, 1));
    let total: Money = entries.iter().map(|e| e.cost_delta).sum();
    assert_eq!(total.to_string(), *costs.iter().next().unwrap());
}

store_test!(an_expired_hold_is_charged_and_a_late_settle_reconciled);
async fn an_expired_hold_is_charged_and_a_late_settle_reconciled(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let p = app.authorize(A_MEMBER, ask(1000, 100)).await;
    let id = p.body["authorization_id"].as_str().unwrap().to_string();
    assert_eq!(app.services.sweep().await.unwrap(), 0);
    app.clock.advance(Duration::from_secs(61));
    assert_eq!(app.services.sweep().await.unwrap(), 1);
    assert_eq!(app.services.engine.open_holds(), 0);
    let view = app.get(&format!("/v1/authorizations/{id}"), A_MEMBER).await;
    assert_eq!(view.body["state"], "expired");
    assert_eq!(
        view.body["entries"][1]["cost_delta"], p.body["held"],
        "charged the hold"
    );
    let late = app
        .settle(
            A_MEMBER,
            &id,
            json!({"usage": {"input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": 10}}),
        )
        .await;
    assert_eq!((late.status, late.code()), (409, "authorization_expired"));
    let entries = app.entries().await;
    let adj: Vec<_> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Adjustment)
        .collect();
    assert_eq!(adj.len(), 1);
    assert!(adj[0].flags & flags::RECONCILED != 0);
    let spent: Money = entries.iter().map(|e| e.cost_delta).sum();
    assert_eq!(
        spent,
        Money::parse("0.000156").unwrap(),
        "the true cost in the end"
    );
    assert!(app.verify().await.ok());
}

store_test!(a_late_settle_of_a_hold_expired_elsewhere_is_reconciled_once);
async fn a_late_settle_of_a_hold_expired_elsewhere_is_reconciled_once(place: Place) {
    let first = spawn_app_at(CONFIG, place).await;
    // On PostgreSQL, a second instance, started before the hold expires: it lists the
    // hold as open, then learns only from the ledger that the first expired it.
    let second = match first.place.location.clone() {
        location @ bursar_store::Location::Postgres(_) => {
            Some(spawn_app_at(CONFIG, Place::at(location)).await)
        }
        bursar_store::Location::Sqlite(_) => None,
    };
    let p = first.authorize(A_MEMBER, ask(1000, 100)).await;
    let id = p.body["authorization_id"].as_str().unwrap().to_string();
    first.clock.advance(Duration::from_secs(61));
    assert_eq!(first.services.sweep().await.unwrap(), 1);
    // The late report reaches an engine without the hold's outcome: the second instance
    // on PostgreSQL; on the embedded store, the same one restarted after its replay no
    // longer reaches the hold (eleven minutes and one call later).
    let (other, _first) = match second {
        Some(second) => (second, Some(first)),
        None => {
            first.clock.advance(Duration::from_secs(11 * 60));
            settled(&first, None).await;
            let app = restart(first, CONFIG).await;
            app.clock.advance(Duration::from_secs(12 * 60 + 2));
            (app, None)
        }
    };
    let usage =
        json!({"usage": {"input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": 10}});
    let late = other.settle(A_MEMBER, &id, usage.clone()).await;
    assert_eq!(
        (late.status, late.code()),
        (409, "authorization_expired"),
        "{:?}",
        late.body
    );
    assert!(
        late.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("adjustment"),
        "{:?}",
        late.body
    );
    // Once: a second late report finds the adjustment and records nothing.
    let again = other.settle(A_MEMBER, &id, usage).await;
    assert_eq!((again.status, again.code()), (409, "authorization_expired"));
    let entries: Vec<_> = other
        .entries()
        .await
        .into_iter()
        .filter(|e| e.authorization.to_string() == id)
        .collect();
    let kinds: Vec<_> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EntryKind::Hold, EntryKind::Expire, EntryKind::Adjustment]
    );
    assert!(entries[2].flags & flags::RECONCILED != 0);
    let spent: Money = entries.iter().map(|e| e.cost_delta).sum();
    assert_eq!(
        spent,
        Money::parse("0.000156").unwrap(),
        "the true cost in the end"
    );
    assert!(other.verify().await.ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_settle_is_reconciled_once_whichever_instances_it_reaches() {
    let Some(place) = Place::postgres().await else {
        return;
    };
    let first = spawn_app_at(CONFIG, place).await;
    let second = spawn_app_at(CONFIG, Place::at(first.place.location.clone())).await;
    let p = first.authorize(A_MEMBER, ask(1000, 100)).await;
    let id = p.body["authorization_id"].as_str().unwrap().to_string();
    first.clock.advance(Duration::from_secs(61));
    assert_eq!(first.services.sweep().await.unwrap(), 1);
    let usage =
        json!({"usage": {"input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": 10}});
    // The second instance takes it up from the ledger and reconciles it; the first,
    // which expired it and still remembers it, must not reconcile it again.
    for app in [&second, &first, &second] {
        let late = app.settle(A_MEMBER, &id, usage.clone()).await;
        assert_eq!(
            (late.status, late.code()),
            (409, "authorization_expired"),
            "{:?}",
            late.body
        );
    }
    let adjustments = first
        .entries()
        .await
        .iter()
        .filter(|e| e.authorization.to_string() == id && e.kind == EntryKind::Adjustment)
        .count();
    assert_eq!(adjustments, 1);
    assert!(first.verify().await.ok());
}

store_test!(verify_fails_naming_the_entry_edited_by_hand);
async fn verify_fails_naming_the_entry_edited_by_hand(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    for _ in 0..5 {
        let p = app.authorize(A_MEMBER, ask(100, 10)).await;
        let id = p.body["authorization_id"].as_str().unwrap().to_string();
        app.settle(
            A_MEMBER,
            &id,
            json!({"usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 10}}),
        )
        .await;
    }
    let v = app.verify().await;
    assert!(v.ok(), "{:?}", v.problems);
    assert_eq!(v.entries, 10);
    let tamper = "UPDATE ledger SET cost = cost - 1 WHERE seq = 4";
    match &app.place.location {
        bursar_store::Location::Sqlite(path) => {
            rusqlite::Connection::open(path)
                .unwrap()
                .execute(tamper, [])
                .unwrap();
        }
        bursar_store::Location::Postgres(url) => {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query(tamper).execute(&mut c).await.unwrap();
        }
    }
    let v = app.verify().await;
    assert!(!v.ok());
    assert!(v.problems[0].starts_with("entry 4 "), "{:?}", v.problems);
    // The rebuilt counters no longer match the stored ones either.
    assert!(
        v.problems.iter().any(|p| p.starts_with("counter ")),
        "{:?}",
        v.problems
    );
}

store_test!(shadow_mode_permits_and_records_would_be_denials);
async fn shadow_mode_permits_and_records_would_be_denials(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    // The shadow tenant's cap is $0.0001; this call's worst case is $0.00021.
    let r = app.authorize(SHADOW_MEMBER, ask(1000, 100)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["shadow_denial"], "budget_exceeded");
    let r = app
        .authorize(SHADOW_MEMBER, json!({"model": "o3", "prompt_tokens": 10}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["shadow_denial"], "model_class_not_allowed");
    let entries = app.entries().await;
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().all(|e| e.flags & flags::SHADOW_DENIED != 0));
    // The same calls in enforce mode are denied.
    let r = app
        .send(
            reqwest::Method::PATCH,
            "/v1/admin/tenants/s",
            ADMIN,
            Some(&json!({"mode": "enforce"})),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        app.authorize(SHADOW_MEMBER, ask(1000, 100)).await.status,
        402
    );
}

store_test!(usage_above_the_hold_is_settled_as_an_overage_and_alerted);
async fn usage_above_the_hold_is_settled_as_an_overage_and_alerted(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let p = app.authorize(A_MEMBER, ask(10, 10)).await;
    let id = p.body["authorization_id"].as_str().unwrap().to_string();
    let s = app
        .settle(A_MEMBER, &id, json!({"usage": {"input_tokens": 20000, "cached_input_tokens": 0, "output_tokens": 5000}}))
        .await;
    assert_eq!(s.status, 200);
    assert_ne!(s.body["overage"], "0");
    let alerts = app.get("/v1/admin/tenants/a/alerts", A_ADMIN).await;
    assert!(
        alerts
            .body
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["reason"] == "overage"),
        "{:?}",
        alerts.body
    );
}

store_test!(denials_carry_their_status_and_code);
async fn denials_carry_their_status_and_code(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    // 403: a model class the plan lacks.
    let r = app
        .authorize(A_MEMBER, json!({"model": "o3", "prompt_tokens": 10}))
        .await;
    assert_eq!((r.status, r.code()), (403, "model_class_not_allowed"));
    // 403: a feature the plan lacks.
    let r = app
        .authorize(
            A_MEMBER,
            json!({"model": "gpt-4o-mini", "prompt_tokens": 10, "tags": {"feature": "video"}}),
        )
        .await;
    assert_eq!((r.status, r.code()), (403, "feature_not_in_plan"));
    // 429 with Retry-After: a key whose role allows 3 requests a minute.
    let key = app
        .post(
            "/v1/admin/tenants/a/keys",
            A_ADMIN,
            json!({"name": "slow", "role": "limited"}),
        )
        .await;
    assert_eq!(key.status, 201);
    let secret = key.body["secret"].as_str().unwrap().to_string();
    for _ in 0..3 {
        assert_eq!(app.authorize(&secret, ask(10, 10)).await.status, 200);
    }
    let r = app.authorize(&secret, ask(10, 10)).await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"));
    assert_eq!(r.headers["retry-after"], "20");
    // 402 once the budget is spent.
    let r = app
        .post(
            "/v1/admin/tenants/a/budgets",
            A_ADMIN,
            json!({"id": "ann-day", "scope": "user", "value": "ann", "window": "daily", "limit": "0.0001"}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(app.authorize(A_MEMBER, ask(1000, 100)).await.status, 402);
    // 401: unknown and revoked keys.
    let r = app
        .authorize("bsr_nope_000000000000000000000000", ask(1, 1))
        .await;
    assert_eq!((r.status, r.code()), (401, "invalid_api_key"));
    let id = key.body["key"]["id"].as_str().unwrap();
    let rv = app
        .post(
            &format!("/v1/admin/tenants/a/keys/{id}/revoke"),
            A_ADMIN,
            json!({}),
        )
        .await;
    assert_eq!(rv.status, 200);
    let r = app.authorize(&secret, ask(1, 1)).await;
    assert_eq!((r.status, r.code()), (401, "api_key_revoked"));
}

store_test!(restart_recovers_holds_counters_and_idempotency);
async fn restart_recovers_holds_counters_and_idempotency(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let first = app
        .send(
            reqwest::Method::POST,
            "/v1/authorizations",
            A_MEMBER,
            Some(&ask(300, 30)),
            Some("k-restart"),
        )
        .await;
    let id = first.body["authorization_id"].as_str().unwrap().to_string();
    let other = app.authorize(A_MEMBER, ask(100, 10)).await;
    let other_id = other.body["authorization_id"].as_str().unwrap().to_string();
    app.settle(
        A_MEMBER,
        &other_id,
        json!({"usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 5}}),
    )
    .await;
    let counters = app.services.engine.counters();
    let again = restart(app, CONFIG).await;
    assert_eq!(again.services.engine.counters(), counters);
    assert_eq!(again.services.engine.open_holds(), 1);
    let replay = again
        .send(
            reqwest::Method::POST,
            "/v1/authorizations",
            A_MEMBER,
            Some(&ask(300, 30)),
            Some("k-restart"),
        )
        .await;
    assert_eq!(replay.body["authorization_id"], id.as_str());
    assert_eq!(replay.body["replayed"], true);
    let s = again
        .settle(
            A_MEMBER,
            &id,
            json!({"usage": {"input_tokens": 300, "cached_input_tokens": 0, "output_tokens": 30}}),
        )
        .await;
    assert_eq!(s.status, 200, "{:?}", s.body);
    let dup = again
        .settle(
            A_MEMBER,
            &other_id,
            json!({"usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 5}}),
        )
        .await;
    assert_eq!(dup.status, 200);
    assert_eq!(dup.body["replayed"], true);
}

store_test!(metered_apis_are_held_and_settled_per_call);
async fn metered_apis_are_held_and_settled_per_call(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let p = app
        .authorize(A_MEMBER, json!({"api": "web_search", "quantity": 4}))
        .await;
    assert_eq!(p.status, 200, "{:?}", p.body);
    assert_eq!(p.body["held"], "0.02");
    let id = p.body["authorization_id"].as_str().unwrap();
    let s = app.settle(A_MEMBER, id, json!({"quantity": 3})).await;
    assert_eq!(s.body["cost"], "0.015");
    // Rate card: cost + 50 %.
    assert_eq!(s.body["charge"], "0.0225");
}

store_test!(an_idempotent_retry_after_the_engine_forgot_its_outcome_is_answered_from_the_ledger);
/// Promise 2 once memory moved on: the outcome of an idempotent authorize leaves memory
/// (after `FINISHED_RETENTION`) before its Idempotency-Key does (after a day); a retry
/// then gets its first answer from the ledger, not a 409.
async fn an_idempotent_retry_after_the_engine_forgot_its_outcome_is_answered_from_the_ledger(
    place: Place,
) {
    let app = spawn_app_at(CONFIG, place).await;
    let authorize = |body: serde_json::Value| {
        let app = &app;
        async move {
            app.send(
                reqwest::Method::POST,
                "/v1/authorizations",
                A_MEMBER,
                Some(&body),
                Some("k-forgotten"),
            )
            .await
        }
    };
    let first = authorize(ask(300, 30)).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let id = first.body["authorization_id"].as_str().unwrap().to_string();
    let s = app
        .settle(
            A_MEMBER,
            &id,
            json!({"usage": {"input_tokens": 300, "cached_input_tokens": 0, "output_tokens": 30}}),
        )
        .await;
    assert_eq!(s.status, 200);
    app.clock.advance(Duration::from_secs(3600));
    app.services.sweep().await.unwrap();
    assert!(
        !app.services
            .engine
            .knows_idempotency_key("a", "k-forgotten"),
        "the outcome is no longer in memory"
    );
    let again = authorize(ask(300, 30)).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body["authorization_id"], id.as_str());
    assert_eq!(again.body["replayed"], true);
    assert_eq!(again.body["held"], first.body["held"]);
    let reused = authorize(ask(301, 30)).await;
    assert_eq!(
        (reused.status, reused.code()),
        (409, "idempotency_key_reused")
    );
    let holds = app.count_entries(EntryKind::Hold).await;
    assert_eq!(holds, 1, "one hold, however often the key is sent");
}

store_test!(a_settle_retried_after_the_engine_forgot_it_is_answered_from_the_ledger);
async fn a_settle_retried_after_the_engine_forgot_it_is_answered_from_the_ledger(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let p = app.authorize(A_MEMBER, ask(1000, 100)).await;
    let id = p.body["authorization_id"].as_str().unwrap().to_string();
    let usage =
        json!({"usage": {"input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": 70}});
    let first = app.settle(A_MEMBER, &id, usage.clone()).await;
    assert_eq!(first.status, 200);
    // Two hours later the engine no longer keeps the outcome in memory.
    app.clock.advance(Duration::from_secs(7200));
    app.services.sweep().await.unwrap();
    let again = app.settle(A_MEMBER, &id, usage).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body["replayed"], true);
    assert_eq!(again.body["cost"], first.body["cost"]);
    assert_eq!(again.body["charge"], first.body["charge"]);
    let other = app
        .settle(
            A_MEMBER,
            &id,
            json!({"usage": {"input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": 71}}),
        )
        .await;
    assert_eq!(
        (other.status, other.code()),
        (409, "authorization_already_settled")
    );
    let entries = app.entries().await;
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.kind == EntryKind::Settle)
            .count(),
        1
    );
}

/// Holds a call and voids it: the hold alone moves the budget's level.
async fn hold_and_void(app: &TestApp) {
    let p = app.authorize(A_MEMBER, ask(1000, 100)).await;
    let id = p.body["authorization_id"].as_str().unwrap();
    app.post(
        &format!("/v1/authorizations/{id}/void"),
        A_MEMBER,
        json!({}),
    )
    .await;
}

store_test!(a_threshold_alerts_once_per_period_across_restarts);
async fn a_threshold_alerts_once_per_period_across_restarts(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let probe = app.authorize(A_MEMBER, ask(1000, 100)).await;
    let held = Money::parse(probe.body["held"].as_str().unwrap()).unwrap();
    let id = probe.body["authorization_id"].as_str().unwrap().to_string();
    app.post(
        &format!("/v1/authorizations/{id}/void"),
        A_MEMBER,
        json!({}),
    )
    .await;
    // A budget where one such hold is 83 %: past warn (80 %), short of emergency (90 %).
    let limit = Money::from_nanos(held.nanos() * 6 / 5);
    let r = app
        .post(
            "/v1/admin/tenants/a/budgets",
            A_ADMIN,
            json!({"id": "tight", "scope": "tenant", "window": "lifetime", "limit": limit.to_string()}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    async fn warn_alerts(app: &TestApp) -> usize {
        app.caught_up().await;
        let rows = app.services.reader.alerts(Some("a"), 100).await.unwrap();
        rows.iter()
            .filter(|a| a.bucket.starts_with("a.tight|") && a.level == "warn")
            .count()
    }
    hold_and_void(&app).await;
    assert_eq!(warn_alerts(&app).await, 1);
    hold_and_void(&app).await;
    assert_eq!(warn_alerts(&app).await, 1, "the level did not rise again");
    let again = restart(app, CONFIG).await;
    hold_and_void(&again).await;
    assert_eq!(
        warn_alerts(&again).await,
        1,
        "a restart does not raise it twice"
    );
}

store_test!(a_retry_after_the_engine_forgot_its_key_gets_the_hold_from_the_ledger);
async fn a_retry_after_the_engine_forgot_its_key_gets_the_hold_from_the_ledger(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let first = app
        .send(
            reqwest::Method::POST,
            "/v1/authorizations",
            A_MEMBER,
            Some(&ask(300, 30)),
            Some("k-long-ago"),
        )
        .await;
    assert_eq!(first.status, 200);
    let id = first.body["authorization_id"].as_str().unwrap().to_string();
    app.settle(
        A_MEMBER,
        &id,
        json!({"usage": {"input_tokens": 300, "cached_input_tokens": 0, "output_tokens": 10}}),
    )
    .await;
    // A day later the engine's memory of the key is gone.
    app.clock.advance(Duration::from_secs(25 * 3600));
    app.services.sweep().await.unwrap();
    assert!(!app.services.engine.knows_idempotency_key("a", "k-long-ago"));
    let retry = app
        .send(
            reqwest::Method::POST,
            "/v1/authorizations",
            A_MEMBER,
            Some(&ask(300, 30)),
            Some("k-long-ago"),
        )
        .await;
    assert_eq!(retry.status, 200, "{:?}", retry.body);
    assert_eq!(retry.body["authorization_id"], id.as_str());
    assert_eq!(retry.body["replayed"], true);
    assert_eq!(retry.body["held"], first.body["held"]);
    let reuse = app
        .send(
            reqwest::Method::POST,
            "/v1/authorizations",
            A_MEMBER,
            Some(&ask(301, 30)),
            Some("k-long-ago"),
        )
        .await;
    assert_eq!(
        (reuse.status, reuse.code()),
        (409, "idempotency_key_reused")
    );
    let entries = app.entries().await;
    assert_eq!(
        entries.len(),
        2,
        "one hold and its settle; the retry held nothing"
    );
}

store_test!(a_key_is_honoured_for_its_idempotency_window_and_is_free_after_it);
async fn a_key_is_honoured_for_its_idempotency_window_and_is_free_after_it(place: Place) {
    let config = CONFIG.replace(
        "hold_ttl_secs = 60",
        "hold_ttl_secs = 60\nidempotency_window_secs = 172800",
    );
    let app = spawn_app_at(&config, place).await;
    // The same request as `settled` makes.
    let authorize = |key: &'static str| {
        let app = &app;
        async move {
            app.send(
                reqwest::Method::POST,
                "/v1/authorizations",
                A_MEMBER,
                Some(&ask(100, 10)),
                Some(key),
            )
            .await
        }
    };
    let id = settled(&app, Some("k-window")).await;
    // The embedded store keeps the window's keys in memory (once its writer has them),
    // and says how many (`bursar_idempotency_keys_remembered` on /metrics).
    app.entries().await;
    let embedded = matches!(app.place.location, bursar_store::Location::Sqlite(_));
    assert_eq!(
        app.services.reader.idempotency_keys_remembered(),
        embedded.then_some(1)
    );
    // A day on, within the two-day window: the engine has forgotten the key, the ledger
    // answers the first permit.
    app.clock.advance(Duration::from_secs(25 * 3600));
    app.services.sweep().await.unwrap();
    assert!(!app.services.engine.knows_idempotency_key("a", "k-window"));
    let within = authorize("k-window").await;
    assert_eq!(within.status, 200, "{:?}", within.body);
    assert_eq!(within.body["authorization_id"], id.as_str());
    assert_eq!(within.body["replayed"], true);
    // Past the window the key is free: the call is decided anew, with a hold of its own.
    app.clock.advance(Duration::from_secs(24 * 3600));
    app.services.sweep().await.unwrap();
    let after = authorize("k-window").await;
    assert_eq!(after.status, 200, "{:?}", after.body);
    let second = after.body["authorization_id"].as_str().unwrap().to_string();
    assert_ne!(second, id, "a new authorization");
    assert_eq!(after.body["replayed"], false);
    // And that new hold is the key's answer from then on.
    let retry = authorize("k-window").await;
    assert_eq!(retry.body["authorization_id"], second.as_str());
    assert_eq!(retry.body["replayed"], true);
    let holds = app
        .entries()
        .await
        .iter()
        .filter(|e| e.kind == EntryKind::Hold)
        .count();
    assert_eq!(holds, 2, "the first hold and the one past the window");
}

/// The replay start the embedded writer stored, if any (`None` on PostgreSQL, which
/// finds it at start from `open_holds` and the entries' times).
fn stored_replay_start(app: &TestApp) -> Option<i64> {
    let bursar_store::Location::Sqlite(path) = &app.place.location else {
        return None;
    };
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT v FROM meta WHERE k = 'replay_from_seq'", [], |r| {
        r.get::<_, String>(0)
    })
    .ok()
    .map(|v| v.parse().unwrap())
}

async fn ledger_state(app: &TestApp) -> String {
    let r = app.get("/readyz", A_MEMBER).await;
    r.body["ledger"].as_str().unwrap_or_default().to_string()
}

/// Settles an authorization id no one was given.
async fn settle_unknown(app: &TestApp) -> Resp {
    app.settle(
        A_MEMBER,
        &uuid::Uuid::now_v7().to_string(),
        json!({"usage": {"input_tokens": 1, "cached_input_tokens": 0, "output_tokens": 1}}),
    )
    .await
}

/// Authorizes and settles one call (with an idempotency key, if given).
async fn settled(app: &TestApp, key: Option<&str>) -> String {
    let p = app
        .send(
            reqwest::Method::POST,
            "/v1/authorizations",
            A_MEMBER,
            Some(&ask(100, 10)),
            key,
        )
        .await;
    assert_eq!(p.status, 200, "{:?}", p.body);
    let id = p.body["authorization_id"].as_str().unwrap().to_string();
    let s = app
        .settle(
            A_MEMBER,
            &id,
            json!({"usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 7}}),
        )
        .await;
    assert_eq!(s.status, 200, "{:?}", s.body);
    id
}

// A start replays only the ledger's tail (every open hold and the recent past) on top
// of the stored counters, answers what older entries made exactly as before, and
// checks the whole ledger in the background.
store_test!(a_start_replays_the_ledgers_tail_and_checks_the_rest_in_the_background);
async fn a_start_replays_the_ledgers_tail_and_checks_the_rest_in_the_background(place: Place) {
    let embedded = matches!(place.location, bursar_store::Location::Sqlite(_));
    let app = spawn_app_at(CONFIG, place).await;
    // Old and finished: entries 1–10; the first with an idempotency key.
    let old = settled(&app, Some("old-call")).await;
    for _ in 0..4 {
        settled(&app, None).await;
    }
    // Old and still open (a long hold): entry 11.
    app.clock.advance(Duration::from_secs(5));
    let mut long = ask(100, 10);
    long["ttl_seconds"] = json!(3600);
    let open = app.authorize(A_MEMBER, long).await;
    assert_eq!(open.status, 200, "{:?}", open.body);
    let open_id = open.body["authorization_id"].as_str().unwrap().to_string();
    // Eleven minutes on, the recent past: entries 12 and after.
    app.clock.advance(Duration::from_secs(11 * 60));
    let recent = settled(&app, None).await;
    for _ in 0..3 {
        settled(&app, None).await;
    }
    let counters = app.services.engine.counters();
    let app = restart(app, CONFIG).await;
    app.clock.advance(Duration::from_secs(11 * 60 + 5));
    if embedded {
        assert_eq!(
            stored_replay_start(&app),
            Some(11),
            "the tail begins at the oldest open hold"
        );
    }
    // The counters are those before the restart (read from the store, not rebuilt).
    assert_eq!(
        bursar_core::engine::sorted(&app.services.engine.counters()),
        bursar_core::engine::sorted(&counters)
    );
    assert_eq!(app.services.engine.open_holds(), 1);
    for _ in 0..100 {
        if ledger_state(&app).await == "verified" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ledger_state(&app).await, "verified");
    // Older entries answer as before: an idempotent retry of the first call (from the
    // ledger), a retried settle of a recent one (replayed), and the open hold settles.
    let again = app
        .send(
            reqwest::Method::POST,
            "/v1/authorizations",
            A_MEMBER,
            Some(&ask(100, 10)),
            Some("old-call"),
        )
        .await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body["authorization_id"], old.as_str());
    let retried = app
        .settle(
            A_MEMBER,
            &recent,
            json!({"usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 7}}),
        )
        .await;
    assert_eq!(retried.status, 200, "{:?}", retried.body);
    let s = app
        .settle(
            A_MEMBER,
            &open_id,
            json!({"usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 7}}),
        )
        .await;
    assert_eq!(s.status, 200, "{:?}", s.body);
    assert_eq!(app.services.engine.open_holds(), 0);
    let v = app.verify().await;
    assert!(v.ok(), "{:?}", v.problems);
    assert_eq!(v.entries, 20, "no entry was added by the retries");
    let rebuilt: HashMap<_, _> = {
        let mut r = Replay::default();
        for (i, e) in app.entries().await.iter().enumerate() {
            r.apply(i as u64 + 1, e);
        }
        r.counters.into_iter().collect()
    };
    assert_eq!(
        bursar_core::engine::sorted(&app.services.engine.counters()),
        bursar_core::engine::sorted(&rebuilt),
        "the engine's counters equal a rebuild from every entry"
    );

    // An entry edited before the tail: the start succeeds (the tail verifies; a whole
    // replay would refuse to start), the background check finds it, and /readyz fails
    // naming the ledger.
    app.clock.advance(Duration::from_secs(1));
    let app = restart(app, CONFIG).await;
    if embedded {
        assert_eq!(stored_replay_start(&app), Some(11));
    }
    let tamper = "UPDATE ledger SET cost = cost - 1 WHERE seq = 3";
    match &app.place.location {
        bursar_store::Location::Sqlite(path) => {
            rusqlite::Connection::open(path)
                .unwrap()
                .execute(tamper, [])
                .unwrap();
        }
        bursar_store::Location::Postgres(url) => {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query(tamper).execute(&mut c).await.unwrap();
        }
    }
    let app = restart(app, CONFIG).await;
    for _ in 0..100 {
        if ledger_state(&app).await == "broken" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = app.get("/readyz", A_MEMBER).await;
    assert_eq!(
        (r.status, r.body["ledger"].as_str()),
        (503, Some("broken")),
        "{:?}",
        r.body
    );
}

/// Promise 2 while the embedded store's writer is stuck: the record of an Idempotency-Key whose hold was
/// acknowledged (journaled) but is not in the store yet is not forgotten by the sweep,
/// however old. A forgotten key is looked up in the store, where that hold is not yet,
/// and a retry would make a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_whose_hold_has_not_landed_is_not_forgotten() {
    let app = spawn_app_at(CONFIG, Place::sqlite()).await;
    let bursar_store::Location::Sqlite(db) = app.place.location.clone() else {
        unreachable!()
    };
    let ask = json!({"model": "gpt-4o-mini", "prompt_tokens": 100, "max_tokens": 10});
    let keyed = || {
        app.send(
            reqwest::Method::POST,
            "/v1/authorizations",
            A_MEMBER,
            Some(&ask),
            Some("k-stuck"),
        )
    };
    // Another connection holds the database's write lock: the writer cannot commit.
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let first = keyed().await;
    assert_eq!(
        first.status, 200,
        "acknowledged from the journal: {:?}",
        first.body
    );
    let id = first.body["authorization_id"].as_str().unwrap().to_string();
    // A day later, the hold still not in the store: the sweep forgets old keys, not this.
    app.clock.advance(Duration::from_secs(25 * 3600));
    let _ = app.services.sweep().await;
    assert!(
        app.services.engine.knows_idempotency_key("a", "k-stuck"),
        "forgotten before its hold reached the store"
    );
    // Nor is an authorization the store lacks "not found" while it lags: it may be on
    // its way there.
    let unknown = settle_unknown(&app).await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (503, "store_unavailable"),
        "{:?}",
        unknown.body
    );

    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    // Landed: now the sweep forgets it, and the store answers a retry.
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.services.engine.knows_idempotency_key("a", "k-stuck") {
        assert!(Instant::now() < deadline, "never forgotten once landed");
        let _ = app.services.sweep().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retry = keyed().await;
    assert_eq!(retry.status, 200, "{:?}", retry.body);
    assert_eq!(retry.body["authorization_id"], id.as_str());
    assert_eq!(retry.body["replayed"], true);
    let holds = app.count_entries(EntryKind::Hold).await;
    assert_eq!(holds, 1, "one hold for the key");
    let unknown = settle_unknown(&app).await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (404, "authorization_not_found"),
        "caught up, the store's answer stands: {:?}",
        unknown.body
    );
}

/// The test configuration with `from` (which must be in it) replaced by `to`, served on
/// `place`.
async fn spawn_edited(from: &str, to: &str, place: Place) -> TestApp {
    assert!(CONFIG.contains(from), "{from}");
    spawn_app_at(&CONFIG.replacen(from, to, 1), place).await
}

store_test!(a_plans_default_budgets_hold_each_of_its_tenants_and_follow_a_plan_change);
/// A plan's default budgets apply to every tenant on it, each tenant on a counter of its
/// own, from the moment the tenant is put on the plan, and no longer once it leaves it.
/// The permit shows each budget's standing.
async fn a_plans_default_budgets_hold_each_of_its_tenants_and_follow_a_plan_change(place: Place) {
    // The free plan gains a daily default budget that fits one call of $0.00021.
    let app = spawn_edited(
        "max_tokens = 100\n\n[[tenants]]",
        "max_tokens = 100\n[[plans.budgets]]\nscope = \"tenant\"\nwindow = \"daily\"\nlimit = \"0.00021\"\n\n[[tenants]]",
        place,
    )
    .await;
    let set_plan = |tenant: &'static str, plan: &'static str| {
        let app = &app;
        async move {
            let path = format!("/v1/admin/tenants/{tenant}");
            let body = json!({ "plan": plan });
            let r = app
                .send(reqwest::Method::PATCH, &path, ADMIN, Some(&body), None)
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
    };
    // On `pro`, no such budget: two calls fit.
    for _ in 0..2 {
        let p = app.authorize(B_MEMBER, ask(1000, 100)).await;
        assert_eq!(p.status, 200, "{:?}", p.body);
        assert!(!p.body["budgets"].to_string().contains("b.plan.0"));
    }
    set_plan("b", "free").await;
    set_plan("a", "free").await;
    for (member, tenant) in [(B_MEMBER, "b"), (A_MEMBER, "a")] {
        let p = app.authorize(member, ask(1000, 100)).await;
        assert_eq!(p.status, 200, "{tenant}: {:?}", p.body);
        let id = format!("{tenant}.plan.0");
        let budgets = p.body["budgets"].as_array().unwrap();
        let view = budgets.iter().find(|b| b["budget_id"] == id.as_str());
        let view = view.unwrap_or_else(|| panic!("{tenant}: {budgets:?}"));
        assert_eq!(view["scope"], "tenant");
        assert_eq!(view["limit"], "0.00021");
        assert_eq!(view["held"], "0.00021");
        assert_eq!(view["remaining"], "0");
        // The tenant's own counter is full; the other tenant's was its own.
        let d = app.authorize(member, ask(1000, 100)).await;
        assert_eq!((d.status, d.code()), (402, "budget_exceeded"), "{tenant}");
        assert!(d.body["error"]["message"].as_str().unwrap().contains(&id));
    }
    // Back on `pro`, the plan's budget no longer holds `b`.
    set_plan("b", "pro").await;
    assert_eq!(app.authorize(B_MEMBER, ask(1000, 100)).await.status, 200);
    assert_eq!(app.authorize(A_MEMBER, ask(1000, 100)).await.status, 402);
}

store_test!(authorize_counts_a_prompt_with_its_models_tokenizer_and_holds_that);
/// `messages` and `prompt` are counted with the model's own tokenizer (o200k for GPT-4o,
/// cl100k for GPT-4 Turbo, the documented estimate for Claude), and the hold is that
/// count and `max_tokens` at the model's price.
async fn authorize_counts_a_prompt_with_its_models_tokenizer_and_holds_that(place: Place) {
    use bursar_core::pricebook::{PriceBook, TokenUsage, TokenizerKind};
    use bursar_core::tokens::{self, ChatMessage};
    let app = spawn_app_at(CONFIG, place).await;
    let book = PriceBook::builtin().unwrap();
    // Text the encodings split differently, so a wrong tokenizer gives another count.
    let text = "Résumé des dépenses: 12 345,67 € — 予算の確認をお願いします。fn main() { println!(\"{}\", x); }";
    let messages = [
        ChatMessage {
            role: "system".into(),
            content: "You count money.".into(),
            name: None,
        },
        ChatMessage {
            role: "user".into(),
            content: text.into(),
            name: None,
        },
    ];
    let o200k = tokens::count_text(TokenizerKind::O200kBase, text);
    let cl100k = tokens::count_text(TokenizerKind::Cl100kBase, text);
    let estimate = tokens::count_text(TokenizerKind::Estimate, text);
    assert!(o200k != cl100k && cl100k != estimate && o200k != estimate);
    let wire: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    for (model, kind) in [
        ("gpt-4o-mini", TokenizerKind::O200kBase),
        ("gpt-4-turbo", TokenizerKind::Cl100kBase),
        ("claude-3-5-haiku", TokenizerKind::Estimate),
    ] {
        let m = book.resolve(model).unwrap();
        assert_eq!(m.tokenizer, kind, "{model}");
        for (body, expected) in [
            (
                json!({"model": model, "messages": wire, "max_tokens": 50}),
                tokens::count_messages(kind, &messages),
            ),
            (
                json!({"model": model, "prompt": text, "max_tokens": 50}),
                tokens::count_text(kind, text),
            ),
        ] {
            let p = app.authorize(A_MEMBER, body).await;
            assert_eq!(p.status, 200, "{model}: {:?}", p.body);
            assert_eq!(p.body["prompt_tokens"], expected, "{model}");
            let held = m.price_at(start_time()).unwrap().cost(&TokenUsage {
                input_tokens: expected,
                cached_input_tokens: 0,
                output_tokens: 50,
            });
            assert_eq!(p.body["held"], held.to_string(), "{model}");
        }
    }
}

store_test!(each_call_is_charged_by_the_rate_card_and_the_margin_is_reported);
/// A call's charge follows its tenant's rate card: the plan's markup, or the fixed rate
/// per 1,000 tokens of the agent it is tagged with; both cost and charge are recorded,
/// and the tenant's usage reports their sums and the margin.
async fn each_call_is_charged_by_the_rate_card_and_the_margin_is_reported(place: Place) {
    let app = spawn_edited(
        "markup_bps = 15000\n",
        "markup_bps = 15000\nagent_per_1k_tokens = { CONTENT = \"0.04\", SEO = \"0.03\" }\n",
        place,
    )
    .await;
    // (agent, input tokens, output tokens, cost, charge)
    let calls = [
        // $0.15/M in, $0.60/M out; charged at 150 %.
        (None, 1000, 100, "0.00021", "0.000315"),
        // 1,100 tokens at $0.04 per 1,000.
        (Some("CONTENT"), 1000, 100, "0.00021", "0.044"),
        // 2,000 tokens at $0.03 per 1,000.
        (Some("SEO"), 1500, 500, "0.000525", "0.06"),
        // An agent without a rate of its own: the markup.
        (Some("EMAIL"), 1000, 100, "0.00021", "0.000315"),
    ];
    let (mut cost, mut charge) = (Money::ZERO, Money::ZERO);
    for (agent, input, output, c, ch) in calls {
        let mut body = ask(input, output as u32);
        if let Some(a) = agent {
            body["tags"] = json!({ "agent": a });
        }
        let p = app.authorize(A_MEMBER, body).await;
        assert_eq!(p.status, 200, "{:?}", p.body);
        let id = p.body["authorization_id"].as_str().unwrap();
        let usage = json!({"usage": {"input_tokens": input, "cached_input_tokens": 0, "output_tokens": output}});
        let s = app.settle(A_MEMBER, id, usage).await;
        assert_eq!(s.status, 200, "{:?}", s.body);
        assert_eq!(
            (s.body["cost"].as_str(), s.body["charge"].as_str()),
            (Some(c), Some(ch)),
            "{agent:?}"
        );
        cost += Money::parse(c).unwrap();
        charge += Money::parse(ch).unwrap();
    }
    let u = app.get("/v1/admin/tenants/a/usage", A_ADMIN).await;
    assert_eq!(u.status, 200, "{:?}", u.body);
    assert_eq!(u.body["cost"], cost.to_string());
    assert_eq!(u.body["charge"], charge.to_string());
    assert_eq!(u.body["margin"], (charge - cost).to_string());
    assert_eq!(u.body["margin"], "0.103475");
}
