//! Rate limits in Redis: one limit across instances, units given back when a call is
//! denied after taking them, and what happens while Redis is down (fail closed by
//! default, fail open for the tenants so configured) and after it returns.

use std::time::{Duration, Instant};

use bursar_core::ledger::EntryKind;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

/// The Redis server tests may use, from `BURSAR_TEST_REDIS_URL`.
pub(crate) fn test_redis_url() -> Option<String> {
    match std::env::var("BURSAR_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIPPED (Redis): set BURSAR_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379) to run it; .ci/run does"
            );
            None
        }
    }
}

/// The test configuration with rate limits in Redis at `url`, a role allowed 60
/// requests a minute, and two keys of each limited role whose secrets are new on every
/// run (a cell in Redis is named by its key, so runs never share one).
struct Limited {
    config: String,
    sixty: String,
    a_slow: String,
    b_slow: String,
}

fn limited_config(redis_url: &str) -> Limited {
    let mut config = format!(
        "[server]\nredis_url = \"{redis_url}\"\n{}",
        CONFIG.replace(
            "[plans.rate_limits.limited]\nrequests_per_minute = 3\n",
            "[plans.rate_limits.limited]\nrequests_per_minute = 3\n[plans.rate_limits.sixty]\nrequests_per_minute = 60\n",
        )
    );
    let mut key = |name: &str, tenant: &str, role: &str| {
        let secret = format!("bsr_test_{name}_{}", Uuid::now_v7().simple());
        config += &format!(
            "[[keys]]\nname = \"{name}\"\ntenant = \"{tenant}\"\nkind = \"member\"\nrole = \"{role}\"\nsecret = \"{secret}\"\n"
        );
        secret
    };
    let sixty = key("sixty", "a", "sixty");
    let a_slow = key("a_slow", "a", "limited");
    let b_slow = key("b_slow", "b", "limited");
    Limited {
        config,
        sixty,
        a_slow,
        b_slow,
    }
}

fn small() -> Value {
    json!({"model": "gpt-4o-mini", "prompt_tokens": 1, "max_tokens": 1})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_limit_of_60_a_minute_holds_across_two_instances_sharing_redis() {
    let Some(redis) = test_redis_url() else {
        return;
    };
    let l = limited_config(&redis);
    // Two instances as they are deployed, on one PostgreSQL database; on two embedded
    // stores where there is none (the limit is Redis's either way).
    let (first, second) = match Place::postgres().await {
        Some(place) => {
            let first = spawn_app_at(&l.config, place).await;
            let second = spawn_app_at(&l.config, Place::at(first.place.location.clone())).await;
            (first, second)
        }
        None => (
            spawn_app_at(&l.config, Place::sqlite()).await,
            spawn_app_at(&l.config, Place::sqlite()).await,
        ),
    };
    assert!(first.services.limiter.is_some() && second.services.limiter.is_some());

    // 150 calls at once, alternating between the instances.
    let started = Instant::now();
    let mut calls = Vec::new();
    for i in 0..150 {
        let (base, http, key) = {
            let app = if i % 2 == 0 { &first } else { &second };
            (app.base.clone(), app.http.clone(), l.sixty.clone())
        };
        calls.push(tokio::spawn(async move {
            let r = http
                .post(format!("{base}/v1/authorizations"))
                .bearer_auth(key)
                .json(&small())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").is_some();
            let body: Value = r.json().await.unwrap();
            (i % 2, status, retry_after, body)
        }));
    }
    let mut permitted = [0u32; 2];
    let mut limited = 0;
    for c in calls {
        let (instance, status, retry_after, body) = c.await.unwrap();
        match status {
            200 => permitted[instance] += 1,
            429 => {
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                assert!(retry_after, "a 429 says when to come back");
                limited += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let elapsed = started.elapsed();
    let total = permitted[0] + permitted[1];
    // GCRA at 60 a minute: the whole minute as a burst, then one a second. Each instance
    // got 75 calls: counting alone, each would have let 60 through, 120 in all. (How the
    // 60 split between them depends on which instance's calls reached Redis first.)
    let refilled = u32::try_from(elapsed.as_secs()).unwrap() + 1;
    assert!(
        (60..=60 + refilled).contains(&total),
        "{total} permitted in {elapsed:?} across two instances; the limit is 60 a minute"
    );
    assert_eq!(total + limited, 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_denied_by_its_budget_gives_its_rate_back() {
    let Some(redis) = test_redis_url() else {
        return;
    };
    let l = limited_config(&redis);
    let app = spawn_app_at(&l.config, Place::sqlite()).await;
    app.add_b_budget(
        json!({"id": "tiny", "scope": "tenant", "window": "lifetime", "limit": "0.0001"}),
    )
    .await;
    // Five calls the budget refuses: each took a unit from Redis and gave it back.
    let big = json!({"model": "gpt-4o-mini", "prompt_tokens": 1000, "max_tokens": 100});
    for _ in 0..5 {
        let r = app.authorize(&l.b_slow, big.clone()).await;
        assert_eq!(
            (r.status, r.code()),
            (402, "budget_exceeded"),
            "{:?}",
            r.body
        );
    }
    // So the three a minute are all still there. A retry of a permitted call, with its
    // idempotency key, gets the first answer and takes nothing more.
    let body = small();
    let idempotent = || {
        app.send(
            reqwest::Method::POST,
            "/v1/authorizations",
            &l.b_slow,
            Some(&body),
            Some("once"),
        )
    };
    let once = idempotent().await;
    assert_eq!(once.status, 200, "{:?}", once.body);
    assert_eq!(
        once.body["rate_limits"][0]["remaining"], 2,
        "{:?}",
        once.body
    );
    for _ in 0..2 {
        let again = idempotent().await;
        assert_eq!(again.status, 200);
        assert_eq!(
            again.body["authorization_id"],
            once.body["authorization_id"]
        );
    }
    for _ in 0..2 {
        let r = app.authorize(&l.b_slow, small()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    // And the fourth waits.
    let r = app.authorize(&l.b_slow, small()).await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"));
}

/// A Redis server of this test's own, on its own port, that the test can stop and start
/// again (the machine's shared one must stay up for the other tests).
struct OwnRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = OwnRedis { port, child: None };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed where BURSAR_TEST_REDIS_URL is set");
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_fails_closed_or_open_as_configured_and_recovers() {
    if test_redis_url().is_none() {
        return;
    }
    let mut redis = OwnRedis::start();
    // Tenant b fails open; a keeps the default, fail closed.
    let l = limited_config(&redis.url());
    let config = l.config.replace(
        "[[tenants]]\nid = \"b\"\nplan = \"pro\"\n",
        "[[tenants]]\nid = \"b\"\nplan = \"pro\"\nfailure_policy = \"fail_open\"\n",
    );
    let app = spawn_app_at(&config, Place::sqlite()).await;
    let ready = app.get("/readyz", "").await;
    assert_eq!(ready.status, 200);
    assert_eq!(
        ready.body,
        json!({"ready": true, "store": "up", "redis": "up", "ledger": "verified", "spooled": 0})
    );
    assert_eq!(app.authorize(&l.a_slow, small()).await.status, 200);

    redis.stop();
    // Fail closed: a clear 503, nothing held.
    let r = app.authorize(&l.a_slow, small()).await;
    assert_eq!(
        (r.status, r.code()),
        (503, "rate_limiter_unavailable"),
        "{:?}",
        r.body
    );
    assert!(r.headers.contains_key("retry-after"));
    // Fail open: the tenant goes on, its limit counted by this instance alone.
    for _ in 0..3 {
        let r = app.authorize(&l.b_slow, small()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let r = app.authorize(&l.b_slow, small()).await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"), "{:?}", r.body);
    // A call with no rate limit needs no Redis.
    assert_eq!(app.authorize(A_MEMBER, small()).await.status, 200);
    let ready = app.get("/readyz", "").await;
    assert_eq!(ready.status, 503);
    assert_eq!(
        ready.body,
        json!({"ready": false, "store": "up", "redis": "unreachable", "ledger": "verified", "spooled": 0})
    );

    // Redis returns: the instance is ready again and the fail-closed tenant is served.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = app.authorize(&l.a_slow, small()).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.code(), "rate_limiter_unavailable", "{:?}", r.body);
        assert!(
            Instant::now() < deadline,
            "Redis came back but calls still fail"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.get("/readyz", "").await.status, 200);

    // What was refused held nothing; what went on is in the ledger.
    let a_slow_id = app
        .services
        .engine
        .identify(&l.a_slow, start_time())
        .unwrap()
        .key
        .id;
    let b_slow_id = app
        .services
        .engine
        .identify(&l.b_slow, start_time())
        .unwrap()
        .key
        .id;
    let entries = app.entries().await;
    let holds_of = |id| {
        entries
            .iter()
            .filter(|e| e.kind == EntryKind::Hold && e.key_id == Some(id))
            .count()
    };
    assert_eq!(holds_of(a_slow_id), 2, "one before the outage, one after");
    assert_eq!(holds_of(b_slow_id), 3);
    assert!(app.verify().await.ok());
}

/// Two deployments may share one Redis database: each counts under its own prefix
/// (`server.redis_prefix`), even where their cells have the same names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deployments_with_their_own_prefixes_share_one_redis_without_sharing_limits() {
    let Some(redis) = test_redis_url() else {
        return;
    };
    let l = limited_config(&redis);
    let run = Uuid::now_v7().simple().to_string();
    let deployment = |name: &str| {
        l.config.replacen(
            "[server]\n",
            &format!("[server]\nredis_prefix = \"{name}-{run}\"\n"),
            1,
        )
    };
    let one = spawn_app_at(&deployment("one"), Place::sqlite()).await;
    let two = spawn_app_at(&deployment("two"), Place::sqlite()).await;
    let same = spawn_app_at(&deployment("one"), Place::sqlite()).await;
    // The same key (same cell names) on each: 3 a minute.
    for _ in 0..3 {
        let r = one.authorize(&l.a_slow, small()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let r = one.authorize(&l.a_slow, small()).await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"));
    // Another prefix: its own count.
    let r = two.authorize(&l.a_slow, small()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The same prefix: the same count.
    let r = same.authorize(&l.a_slow, small()).await;
    assert_eq!((r.status, r.code()), (429, "rate_limited"));
}
