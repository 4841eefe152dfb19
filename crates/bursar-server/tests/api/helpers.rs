//! `spawn_app_at()`: a real Bursar router on port 0 over a store (a fresh SQLite file in a
//! temp dir, or a fresh PostgreSQL database), with a clock the test controls. `store_test!` runs a test on both stores: the
//! embedded SQLite one and a fresh PostgreSQL database (when `BURSAR_TEST_POSTGRES_URL`
//! names a server; without it the PostgreSQL half says loudly that it was skipped).

use std::sync::Arc;

use bursar_core::config::Config;
use bursar_core::pricebook::PriceBook;
use bursar_server::{ManualClock, Services};
use bursar_store::Location;
use chrono::{DateTime, Utc};
use serde_json::Value;

pub const ADMIN: &str = "bsr_test_platform_admin_000000000";
pub const A_ADMIN: &str = "bsr_test_a_admin_0000000000000000";
pub const A_MEMBER: &str = "bsr_test_a_member_000000000000000";
pub const B_ADMIN: &str = "bsr_test_b_admin_0000000000000000";
pub const B_MEMBER: &str = "bsr_test_b_member_000000000000000";
pub const SHADOW_MEMBER: &str = "bsr_test_shadow_member_0000000000";

pub const CONFIG: &str = r#"
[engine]
hold_ttl_secs = 60

[[plans]]
id = "pro"
features = ["chat", "search"]
default_task = "chat"
[plans.tasks.chat]
classes = ["small", "standard"]
default_class = "small"
max_tokens = 1000
[plans.tasks.search]
classes = ["small"]
default_class = "small"
max_tokens = 100
[plans.rate_limits.limited]
requests_per_minute = 3
[plans.rate_card]
markup_bps = 15000

[[plans]]
id = "free"
default_task = "chat"
[plans.tasks.chat]
classes = ["small"]
default_class = "small"
max_tokens = 100

[[tenants]]
id = "a"
plan = "pro"
timezone = "America/New_York"
[[tenants]]
id = "b"
plan = "pro"
[[tenants]]
id = "s"
plan = "pro"
mode = "shadow"

[[users]]
tenant = "a"
id = "ann"
role = "member"

[[keys]]
name = "platform"
kind = "platform_admin"
secret = "bsr_test_platform_admin_000000000"
[[keys]]
name = "a admin"
tenant = "a"
kind = "tenant_admin"
secret = "bsr_test_a_admin_0000000000000000"
[[keys]]
name = "a member"
tenant = "a"
user = "ann"
kind = "member"
secret = "bsr_test_a_member_000000000000000"
[[keys]]
name = "b admin"
tenant = "b"
kind = "tenant_admin"
secret = "bsr_test_b_admin_0000000000000000"
[[keys]]
name = "b member"
tenant = "b"
kind = "member"
secret = "bsr_test_b_member_000000000000000"
[[keys]]
name = "s member"
tenant = "s"
kind = "member"
secret = "bsr_test_shadow_member_0000000000"

[[budgets]]
id = "a-month"
tenant = "a"
scope = "tenant"
window = "monthly"
limit = "100"
[[budgets]]
id = "s-cap"
tenant = "s"
scope = "tenant"
window = "lifetime"
limit = "0.0001"
"#;

/// Where a test app keeps its data: a store location, and a temp dir that lives as long.
pub struct Place {
    pub location: Location,
    /// Deleted when the place is dropped.
    _dir: tempfile::TempDir,
}

/// The PostgreSQL server tests may use, from `BURSAR_TEST_POSTGRES_URL`.
pub fn test_postgres_url() -> Option<String> {
    match std::env::var("BURSAR_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "SKIPPED (PostgreSQL half): set BURSAR_TEST_POSTGRES_URL (e.g. postgres://postgres@127.0.0.1:5432/postgres) to run it; .ci/run does"
            );
            None
        }
    }
}

impl Place {
    pub fn sqlite() -> Place {
        let dir = tempfile::tempdir().unwrap();
        Place {
            location: Location::data_dir(dir.path()),
            _dir: dir,
        }
    }

    /// Another instance's place on the same store.
    pub fn at(location: Location) -> Place {
        Place {
            location,
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A fresh PostgreSQL database, or `None` (skipped loudly) without a server.
    pub async fn postgres() -> Option<Place> {
        let admin = test_postgres_url()?;
        let url = bursar_store::postgres::scratch_database(&admin)
            .await
            .unwrap();
        Some(Place {
            location: Location::Postgres(url),
            _dir: tempfile::tempdir().unwrap(),
        })
    }
}

/// Runs the test `async fn $name(place: Place)` on both stores, as `$name::sqlite` and
/// `$name::postgres`.
#[macro_export]
macro_rules! store_test {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name($crate::helpers::Place::sqlite()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                if let Some(place) = $crate::helpers::Place::postgres().await {
                    super::$name(place).await
                }
            }
        }
    };
}

pub struct TestApp {
    pub base: String,
    pub services: Arc<Services>,
    pub clock: Arc<ManualClock>,
    pub http: reqwest::Client,
    pub place: Place,
    pub running: Option<Running>,
}

pub fn start_time() -> DateTime<Utc> {
    "2026-05-14T10:00:00Z".parse().unwrap()
}

pub async fn spawn_app_with(config: &str) -> TestApp {
    spawn_app_at(config, Place::sqlite()).await
}

/// A Bursar over the store at `place` (a restart when the place was used before).
pub async fn spawn_app_at(config: &str, place: Place) -> TestApp {
    let book = Arc::new(PriceBook::builtin().unwrap());
    let mut config = Config::parse(config, &book, start_time()).unwrap();
    // An instance on PostgreSQL spools in its place's directory.
    if config.server.data_dir.is_none() {
        config.server.data_dir = Some(place._dir.path().display().to_string());
    }
    let clock = Arc::new(ManualClock::new(start_time()));
    let (services, writer) =
        bursar_server::build(config, book, &place.location, true, clock.clone())
            .await
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = services.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let _ = bursar_server::serve(listener, s, async {
            let _ = stopped.await;
        })
        .await;
    });
    TestApp {
        base: format!("http://{addr}"),
        services,
        clock,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .unwrap(),
        place,
        running: Some(Running {
            stop,
            server,
            writer,
        }),
    }
}

/// What stops a test app the way a process exit would.
pub struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    writer: std::thread::JoinHandle<()>,
}

/// Stops `app` (server, then the ledger writer, as when a process exits) and starts a
/// new Bursar on the same store: a restart.
pub async fn restart(app: TestApp, config: &str) -> TestApp {
    let TestApp {
        services,
        http,
        place,
        running,
        ..
    } = app;
    drop(http);
    let running = running.unwrap();
    let _ = running.stop.send(());
    running.server.await.unwrap();
    // Connection tasks may end just after the server does.
    for _ in 0..500 {
        if Arc::strong_count(&services) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        Arc::strong_count(&services),
        1,
        "something still holds the stopped app"
    );
    drop(services);
    tokio::task::spawn_blocking(move || running.writer.join().unwrap())
        .await
        .unwrap();
    spawn_app_at(config, place).await
}

pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl TestApp {
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<&Value>,
        idem: Option<&str>,
    ) -> Resp {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(b) = body {
            r = r.json(b);
        }
        if let Some(k) = idem {
            r = r.header("Idempotency-Key", k);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Resp {
            status,
            body,
            headers,
        }
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> Resp {
        self.send(reqwest::Method::POST, path, key, Some(&body), None)
            .await
    }

    pub async fn get(&self, path: &str, key: &str) -> Resp {
        self.send(reqwest::Method::GET, path, key, None, None).await
    }

    /// Sent on a connection of its own: a server may close a connection whose body it
    /// refused unread (413), and a pooled connection closed that way would fail the
    /// next request made on it.
    pub async fn raw_post(&self, path: &str, key: &str, body: Vec<u8>) -> Resp {
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Resp {
            status,
            body,
            headers,
        }
    }

    /// Makes a budget for tenant `b` with its admin key.
    pub async fn add_b_budget(&self, body: Value) {
        let r = self
            .post("/v1/admin/tenants/b/budgets", B_ADMIN, body)
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }

    /// Whether this instance enforces budget `id` within two seconds (another instance
    /// may have made it).
    pub async fn sees_budget(&self, id: &str) -> bool {
        for _ in 0..200 {
            if self.services.engine.budgets().get(id).is_some() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    }

    pub async fn authorize(&self, key: &str, body: Value) -> Resp {
        self.post("/v1/authorizations", key, body).await
    }

    pub async fn settle(&self, key: &str, id: &str, body: Value) -> Resp {
        self.post(&format!("/v1/authorizations/{id}/settle"), key, body)
            .await
    }

    /// Every ledger entry, in order.
    /// Waits until what was acknowledged has landed in the store (an acknowledged entry
    /// may be only in the journal for a moment), as the server's own readers do.
    pub async fn caught_up(&self) {
        self.services.ledger.barrier().wait().await.unwrap();
    }

    pub async fn entries(&self) -> Vec<bursar_core::ledger::Entry> {
        self.caught_up().await;
        let report = bursar_store::read_entries(&self.place.location)
            .await
            .unwrap();
        assert!(
            report.chain_problems.is_empty(),
            "{:?}",
            report.chain_problems
        );
        report.entries
    }

    /// How many entries of `kind` the ledger holds.
    pub async fn count_entries(&self, kind: bursar_core::ledger::EntryKind) -> usize {
        self.entries()
            .await
            .iter()
            .filter(|e| e.kind == kind)
            .count()
    }

    /// `bursar ledger verify` on this app's store.
    pub async fn verify(&self) -> bursar_store::Verification {
        self.caught_up().await;
        bursar_store::verify(&self.place.location).await.unwrap()
    }
}
