//! What only the PostgreSQL store has to show: instances sharing one database, and a
//! lost connection that loses nothing acknowledged. (The promises run on both stores,
//! in `promises.rs`; several processes in `crates/bursar/tests/instances.rs`.)

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bursar_core::ledger::EntryKind;
use bursar_core::Money;
use bursar_store::Location;
use serde_json::json;
use sqlx::Connection;
use uuid::Uuid;

use crate::helpers::*;
#[path = "../../../bursar/tests/common/relay.rs"]
mod relay;
use relay::{through, Relay};

fn postgres_url(app: &TestApp) -> String {
    match &app.place.location {
        Location::Postgres(url) => url.clone(),
        Location::Sqlite(_) => unreachable!("a PostgreSQL test"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_budget_and_its_changes_and_finish_each_others_holds() {
    let Some(place) = Place::postgres().await else {
        return;
    };
    let first = spawn_app_at(CONFIG, place).await;
    let second = spawn_app_at(CONFIG, Place::at(first.place.location.clone())).await;
    assert!(first.services.shared.is_some() && second.services.shared.is_some());
    assert_ne!(
        first.services.shared.as_ref().unwrap().instance(),
        second.services.shared.as_ref().unwrap().instance()
    );
    // A budget both instances share: it fits exactly three of these calls.
    let hold = Money::parse("0.00021").unwrap();
    first
        .add_b_budget(
            json!({"id": "three", "scope": "tenant", "window": "lifetime", "limit": Money::from_nanos(hold.nanos() * 3).to_string()}),
        )
        .await;
    // The second instance follows the change at once (it is told, and reads the catalog).
    assert!(
        second.sees_budget("b.three").await,
        "the second instance enforces a budget made on the first"
    );
    let ask = json!({"model": "gpt-4o-mini", "prompt_tokens": 1000, "max_tokens": 100});
    let mut ids = Vec::new();
    for app in [&first, &second, &first] {
        let p = app.authorize(B_MEMBER, ask.clone()).await;
        assert_eq!(p.status, 200, "{:?}", p.body);
        assert_eq!(p.body["max_tokens"], 100);
        ids.push(p.body["authorization_id"].as_str().unwrap().to_string());
    }
    for app in [&second, &first] {
        let d = app.authorize(B_MEMBER, ask.clone()).await;
        assert_eq!(
            (d.status, d.code()),
            (402, "budget_exceeded"),
            "{:?}",
            d.body
        );
    }
    // A hold made on one instance is settled on the other, once.
    let usage =
        json!({"usage": {"input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": 10}});
    let s = second.settle(B_MEMBER, &ids[0], usage.clone()).await;
    assert_eq!(s.status, 200, "{:?}", s.body);
    let again = first.settle(B_MEMBER, &ids[0], usage.clone()).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body["replayed"], true, "{:?}", again.body);
    assert_eq!(again.body["cost"], s.body["cost"]);
    // The room the settle freed (90 output tokens' worth) is the second instance's to
    // use; the first instance's spare goes back when the sweeper runs.
    first.services.sweep().await.unwrap();
    second.services.sweep().await.unwrap();
    let small = json!({"model": "gpt-4o-mini", "prompt_tokens": 100, "max_tokens": 50});
    let p = first.authorize(B_MEMBER, small).await;
    assert_eq!(
        p.status, 200,
        "the freed room is usable from any instance: {:?}",
        p.body
    );
    let entries = first.entries().await;
    let settles = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Settle)
        .count();
    assert_eq!(settles, 1);
    assert!(first.verify().await.ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_database_connection_loses_nothing_acknowledged() {
    let Some(place) = Place::postgres().await else {
        return;
    };
    let app = Arc::new(spawn_app_at(CONFIG, place).await);
    let url = postgres_url(&app);
    let db = url.rsplit('/').next().unwrap().to_string();
    let admin = test_postgres_url().unwrap();

    // Eight clients authorize and settle in a loop while every connection of the
    // database is terminated, five times over.
    let clients = (0..8).map(|_| {
        let app = app.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut settled = Vec::new();
            for _ in 0..40 {
                let p = app
                    .authorize(
                        B_MEMBER,
                        json!({"model": "gpt-4o-mini", "prompt_tokens": 100, "max_tokens": 10}),
                    )
                    .await;
                if p.status != 200 {
                    assert_eq!((p.status, p.code()), (503, "store_unavailable"), "{:?}", p.body);
                    continue;
                }
                let id = p.body["authorization_id"].as_str().unwrap().to_string();
                held.push(Uuid::parse_str(&id).unwrap());
                let s = app
                    .settle(
                        B_MEMBER,
                        &id,
                        json!({"usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 10}}),
                    )
                    .await;
                if s.status == 200 {
                    settled.push(Uuid::parse_str(&id).unwrap());
                } else {
                    assert_eq!((s.status, s.code()), (503, "store_unavailable"), "{:?}", s.body);
                }
            }
            (held, settled)
        })
    });
    let clients: Vec<_> = clients.collect();
    let mut killer = sqlx::PgConnection::connect(&admin).await.unwrap();
    let mut killed = 0i64;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()) t",
        )
        .bind(&db)
        .fetch_one(&mut killer)
        .await
        .unwrap();
        killed += n;
    }
    assert!(killed > 0, "the test killed no connection");
    let mut held = HashSet::new();
    let mut settled = HashSet::new();
    for c in clients {
        let (h, s) = c.await.unwrap();
        held.extend(h);
        settled.extend(s);
    }
    assert!(!held.is_empty());

    // The writer reconnects by itself (its check between batches may have met a killed
    // connection a moment ago): the store is ready again and takes new work.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = app
            .http
            .get(format!("{}/readyz", app.base))
            .send()
            .await
            .unwrap();
        if ready.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store did not recover from the lost connections"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = app
        .authorize(
            B_MEMBER,
            json!({"model": "gpt-4o-mini", "prompt_tokens": 10, "max_tokens": 10}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Every acknowledged hold and settle is in the ledger, once; the ledger verifies.
    let entries = app.entries().await;
    let holds: Vec<Uuid> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Hold)
        .map(|e| e.authorization)
        .collect();
    let settles: Vec<Uuid> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Settle)
        .map(|e| e.authorization)
        .collect();
    assert_eq!(
        holds.len(),
        holds.iter().collect::<HashSet<_>>().len(),
        "a hold written twice"
    );
    assert_eq!(
        settles.len(),
        settles.iter().collect::<HashSet<_>>().len(),
        "a settle written twice"
    );
    let holds: HashSet<Uuid> = holds.into_iter().collect();
    let settles: HashSet<Uuid> = settles.into_iter().collect();
    assert!(held.is_subset(&holds), "an acknowledged hold is missing");
    assert!(
        settled.is_subset(&settles),
        "an acknowledged settle is missing"
    );
    let v = app.verify().await;
    assert!(v.ok(), "{:?}", v.problems);
}

async fn wait_ready(app: &TestApp, ready: bool) -> Resp {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = app.get("/readyz", "").await;
        if (r.status == 200) == ready {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readyz stayed {:?}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_away_fails_closed_or_open_as_configured_and_all_lands_when_it_returns() {
    let Some(place) = Place::postgres().await else {
        return;
    };
    let direct = match &place.location {
        Location::Postgres(url) => url.clone(),
        Location::Sqlite(_) => unreachable!(),
    };
    let relay = Relay::start(through(&direct, 0).1).await;
    let (relayed, _) = through(&direct, relay.port);
    // Tenant b fails open; a keeps the default, fail closed.
    let config = CONFIG.replace(
        "[[tenants]]\nid = \"b\"\nplan = \"pro\"\n",
        "[[tenants]]\nid = \"b\"\nplan = \"pro\"\nfailure_policy = \"fail_open\"\n",
    );
    let app = spawn_app_at(&config, Place::at(Location::Postgres(relayed))).await;
    let _keep = place;
    let ask = json!({"model": "gpt-4o-mini", "prompt_tokens": 100, "max_tokens": 10});
    let usage =
        json!({"usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 5}});
    let before = app.authorize(B_MEMBER, ask.clone()).await;
    assert_eq!(before.status, 200, "{:?}", before.body);
    let before = before.body["authorization_id"]
        .as_str()
        .unwrap()
        .to_string();

    relay.cut();
    // The writer checks the store every second: the outage shows without any work.
    let r = wait_ready(&app, false).await;
    assert_eq!(
        r.body,
        json!({"ready": false, "store": "unreachable", "redis": "none", "ledger": "verified", "spooled": 0})
    );
    // Fail closed: refused at once, nothing held.
    let t0 = std::time::Instant::now();
    let r = app.authorize(A_MEMBER, ask.clone()).await;
    assert_eq!(
        (r.status, r.code()),
        (503, "store_unavailable"),
        "{:?}",
        r.body
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "refused without waiting"
    );
    // Fail open: permitted on this instance's accounting, and settled, without the store.
    let mut opened = Vec::new();
    for _ in 0..3 {
        let p = app.authorize(B_MEMBER, ask.clone()).await;
        assert_eq!(p.status, 200, "{:?}", p.body);
        let id = p.body["authorization_id"].as_str().unwrap().to_string();
        opened.push(Uuid::parse_str(&id).unwrap());
    }
    // With an Idempotency-Key the ledger cannot be asked: the fail-open tenant is
    // decided on this instance's memory of its keys (a retry gets the first permit), the
    // fail-closed one is refused.
    let keyed = |member, key| {
        app.send(
            reqwest::Method::POST,
            "/v1/authorizations",
            member,
            Some(&ask),
            Some(key),
        )
    };
    let first = keyed(B_MEMBER, "order-17").await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let retry = keyed(B_MEMBER, "order-17").await;
    assert_eq!(retry.status, 200, "{:?}", retry.body);
    assert_eq!(
        retry.body["authorization_id"],
        first.body["authorization_id"]
    );
    let keyed_id = Uuid::parse_str(first.body["authorization_id"].as_str().unwrap()).unwrap();
    let r = keyed(A_MEMBER, "order-18").await;
    assert_eq!(
        (r.status, r.code()),
        (503, "store_unavailable"),
        "{:?}",
        r.body
    );
    let s = app
        .settle(B_MEMBER, &opened[0].to_string(), usage.clone())
        .await;
    assert_eq!(s.status, 200, "{:?}", s.body);
    // /readyz tells what this instance keeps for the store.
    let r = app.get("/readyz", "").await;
    assert!(r.body["spooled"].as_u64().unwrap() > 0, "{:?}", r.body);
    // The catalog is not changed while the store is away: refused, and nothing lands.
    let r = app
        .post(
            "/v1/admin/tenants/b/budgets",
            B_ADMIN,
            json!({"id": "in-the-outage", "scope": "tenant", "window": "lifetime", "limit": "5"}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (503, "store_unavailable"),
        "{:?}",
        r.body
    );
    // A hold made before the outage is finished only with a claim, so not now.
    let s = app.settle(B_MEMBER, &before, usage.clone()).await;
    assert_eq!(
        (s.status, s.code()),
        (503, "store_unavailable"),
        "{:?}",
        s.body
    );

    relay.mend();
    let r = wait_ready(&app, true).await;
    assert_eq!(r.body["spooled"], 0, "the spool landed");
    // Back: the fail-closed tenant is served, the old hold can be settled, and the holds
    // permitted failing open are settled on this instance without a claim.
    assert_eq!(app.authorize(A_MEMBER, ask.clone()).await.status, 200);
    let s = app.settle(B_MEMBER, &before, usage.clone()).await;
    assert_eq!(s.status, 200, "{:?}", s.body);
    let s = app
        .settle(B_MEMBER, &opened[1].to_string(), usage.clone())
        .await;
    assert_eq!(s.status, 200, "{:?}", s.body);
    let again = app
        .settle(B_MEMBER, &opened[0].to_string(), usage.clone())
        .await;
    assert_eq!(
        again.status, 200,
        "a retry gets the first settlement: {:?}",
        again.body
    );

    // What was permitted and settled during the outage is in the ledger, flagged, in
    // one valid chain with the rest; the refused call left nothing.
    let entries = app.entries().await;
    let of = |id: Uuid, kind: EntryKind| {
        entries
            .iter()
            .filter(|e| e.authorization == id && e.kind == kind)
            .collect::<Vec<_>>()
    };
    for id in opened.iter().chain([&keyed_id]) {
        let holds = of(*id, EntryKind::Hold);
        assert_eq!(holds.len(), 1);
        assert_ne!(holds[0].flags & bursar_core::ledger::flags::FAIL_OPEN, 0);
    }
    assert_eq!(of(opened[0], EntryKind::Settle).len(), 1);
    assert_eq!(of(opened[1], EntryKind::Settle).len(), 1);
    assert_eq!(
        of(Uuid::parse_str(&before).unwrap(), EntryKind::Settle).len(),
        1
    );
    let a_holds = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Hold && &*e.tenant == "a")
        .count();
    assert_eq!(a_holds, 1, "only the call after the outage");
    let keyed_holds = entries
        .iter()
        .filter(|e| {
            e.kind == EntryKind::Hold
                && e.detail.as_ref().and_then(|d| d.idempotency_key.as_deref()) == Some("order-17")
        })
        .count();
    assert_eq!(keyed_holds, 1, "the retry made no second hold");
    assert!(
        app.services.engine.budgets().get("in-the-outage").is_none(),
        "the refused change stayed out"
    );
    assert!(app.verify().await.ok());
    let restarted = restart(app, &config).await;
    assert!(restarted
        .services
        .engine
        .budgets()
        .get("in-the-outage")
        .is_none());
}

/// Promise 2 across instances: the first use of an Idempotency-Key, sent to two instances
/// at once, makes one hold, and every call gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idempotency_key_sent_to_two_instances_at_once_makes_one_hold() {
    let Some(place) = Place::postgres().await else {
        return;
    };
    let first = Arc::new(spawn_app_at(CONFIG, place).await);
    let second = Arc::new(spawn_app_at(CONFIG, Place::at(first.place.location.clone())).await);
    let ask = json!({"model": "gpt-4o-mini", "prompt_tokens": 1000, "max_tokens": 100});
    let rounds = 5;
    for round in 0..rounds {
        let key = format!("same-key-{round}");
        let calls: Vec<_> = (0..10)
            .map(|i| {
                let app = if i % 2 == 0 {
                    first.clone()
                } else {
                    second.clone()
                };
                let (ask, key) = (ask.clone(), key.clone());
                tokio::spawn(async move {
                    app.send(
                        reqwest::Method::POST,
                        "/v1/authorizations",
                        B_MEMBER,
                        Some(&ask),
                        Some(&key),
                    )
                    .await
                })
            })
            .collect();
        let mut ids = HashSet::new();
        for c in calls {
            let r = c.await.unwrap();
            assert_eq!(r.status, 200, "{:?}", r.body);
            ids.insert(r.body["authorization_id"].as_str().unwrap().to_string());
        }
        assert_eq!(
            ids.len(),
            1,
            "round {round}: one key, one authorization: {ids:?}"
        );
    }
    let mut conn = sqlx::PgConnection::connect(&postgres_url(&first))
        .await
        .unwrap();
    let holds: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger WHERE kind = 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(holds, rounds);
}

/// A call denied on one instance releases its key's claim: the same key retried on the
/// other is decided anew at once (not kept waiting for a hold that will never come).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_denied_first_use_of_an_idempotency_key_frees_it_for_every_instance() {
    let Some(place) = Place::postgres().await else {
        return;
    };
    let first = spawn_app_at(CONFIG, place).await;
    let second = spawn_app_at(CONFIG, Place::at(first.place.location.clone())).await;
    first
        .add_b_budget(
            json!({"id": "tiny", "scope": "tenant", "window": "lifetime", "limit": "0.0001"}),
        )
        .await;
    assert!(second.sees_budget("b.tiny").await);
    let ask = json!({"model": "gpt-4o-mini", "prompt_tokens": 1000, "max_tokens": 100});
    for app in [&first, &second, &first] {
        let r = app
            .send(
                reqwest::Method::POST,
                "/v1/authorizations",
                B_MEMBER,
                Some(&ask),
                Some("denied-key"),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (402, "budget_exceeded"),
            "{:?}",
            r.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_threshold_crossed_by_the_instances_together_alerts_once() {
    let Some(place) = Place::postgres().await else {
        return;
    };
    let first = spawn_app_at(CONFIG, place).await;
    let second = spawn_app_at(CONFIG, Place::at(first.place.location.clone())).await;
    // Ten calls' worth; warn at 80 %.
    let call = Money::parse("0.00021").unwrap();
    first
        .add_b_budget(json!({"id": "ten", "scope": "tenant", "window": "lifetime",
                             "limit": Money::from_nanos(call.nanos() * 10).to_string()}))
        .await;
    assert!(second.sees_budget("b.ten").await);
    let ask = json!({"model": "gpt-4o-mini", "prompt_tokens": 1000, "max_tokens": 100});
    let usage =
        json!({"usage": {"input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": 100}});
    // Five calls on the first instance and three on the second: 80 % together, neither
    // near it alone.
    for (app, n) in [(&first, 5), (&second, 3)] {
        for _ in 0..n {
            let p = app.authorize(B_MEMBER, ask.clone()).await;
            assert_eq!(p.status, 200, "{:?}", p.body);
            let id = p.body["authorization_id"].as_str().unwrap();
            let s = app.settle(B_MEMBER, id, usage.clone()).await;
            assert_eq!(s.status, 200, "{:?}", s.body);
        }
    }
    let warns = || async {
        first
            .services
            .reader
            .alerts(Some("b"), 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|a| a.bucket.starts_with("b.ten") && a.reason == "threshold")
            .map(|a| a.level)
            .collect::<Vec<_>>()
    };
    assert!(warns().await.is_empty(), "no instance alone reached 80 %");
    // Each instance's sweeper learns the others' use: the threshold alerts, once.
    second.services.sweep().await.unwrap();
    first.services.sweep().await.unwrap();
    second.services.sweep().await.unwrap();
    assert_eq!(warns().await, ["warn"]);
    // What a key is shown is the use of both instances.
    for app in [&first, &second] {
        let u = app.get("/v1/usage", B_MEMBER).await;
        let ten = u.body["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["budget_id"] == "b.ten")
            .unwrap()
            .clone();
        assert_eq!(
            ten["remaining"],
            Money::from_nanos(call.nanos() * 2).to_string(),
            "{ten}"
        );
        assert_eq!(ten["level"], "warn", "{ten}");
    }
    assert!(first.verify().await.ok());
}
