//! The real binary: crash safety under kill -9, refusal of bad configuration files and
//! of a second server on a held data directory,
//! `ledger verify` and `prices import`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bursar_core::ledger::EntryKind;
use serde_json::json;

mod common;
#[path = "common/relay.rs"]
mod relay;

use bursar_store::Location;
use common::{start, start_command, start_on, BIN};
use std::ffi::OsString;
const MEMBER: &str = "bsr_cli_member_key_00000000000000";

const CONFIG: &str = r#"
[engine]
hold_ttl_secs = 2

[[plans]]
id = "pro"
default_task = "chat"
[plans.tasks.chat]
classes = ["small", "standard"]
default_class = "small"
max_tokens = 1000

[[tenants]]
id = "acme"
plan = "pro"

[[keys]]
name = "member"
tenant = "acme"
kind = "member"
secret = "bsr_cli_member_key_00000000000000"

[[budgets]]
id = "acme-life"
tenant = "acme"
scope = "tenant"
window = "lifetime"
limit = "1000"
"#;

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("bursar.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The store a test runs the binary on.
enum Store {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Store {
    fn args(&self) -> Vec<OsString> {
        match self {
            Store::Sqlite(dir) => vec!["--data-dir".into(), dir.into()],
            Store::Postgres(url) => vec!["--database-url".into(), url.into()],
        }
    }

    fn location(&self) -> Location {
        match self {
            Store::Sqlite(dir) => Location::data_dir(dir),
            Store::Postgres(url) => Location::Postgres(url.clone()),
        }
    }
}

/// A fresh PostgreSQL database, or `None` (skipped loudly) without a server.
async fn scratch_postgres() -> Option<String> {
    match std::env::var("BURSAR_TEST_POSTGRES_URL") {
        Ok(admin) if !admin.is_empty() => Some(
            bursar_store::postgres::scratch_database(&admin)
                .await
                .unwrap(),
        ),
        _ => {
            eprintln!(
                "SKIPPED (PostgreSQL half): set BURSAR_TEST_POSTGRES_URL (e.g. postgres://postgres@127.0.0.1:5432/postgres) to run it; .ci/run does"
            );
            None
        }
    }
}

fn bursar(args: &[&str], store: &Store, config: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .args(store.args())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged_and_leaves_no_hold_open() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::Sqlite(tmp.path().join("data"));
    kill_9(&store, tmp.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_migrate_then_kill_9_loses_nothing_acknowledged() {
    let Some(url) = scratch_postgres().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::Postgres(url);
    let config = write_config(tmp.path(), CONFIG);
    // A database that is behind is refused, naming the command that fixes it.
    let refused = bursar(&["serve", "--listen", "127.0.0.1:0"], &store, &config);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("bursar migrate"), "{err}");
    let out = bursar(&["migrate"], &store, &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let migrations = std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../bursar-store/migrations/postgres"
    ))
    .unwrap()
    .count();
    assert!(String::from_utf8_lossy(&out.stdout)
        .starts_with(&format!("{migrations} migration(s) applied")));
    let out = bursar(&["migrate"], &store, &config);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("0 migration(s) applied"));
    kill_9(&store, tmp.path()).await;
}

/// Promise 6 with promise 3: a tenant that fails open goes on while PostgreSQL is away,
/// and what the instance told its callers survives a kill -9 during the outage: the
/// holds and settles are in its spool, and they land, once, when it starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_decisions_survive_a_kill_9_during_an_outage() {
    let Some(url) = scratch_postgres().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        &CONFIG.replace(
            "[[tenants]]\nid = \"acme\"\nplan = \"pro\"\n",
            "[[tenants]]\nid = \"acme\"\nplan = \"pro\"\nfailure_policy = \"fail_open\"\n",
        ),
    );
    let direct = Store::Postgres(url.clone());
    let out = bursar(&["migrate"], &direct, &config);
    assert!(out.status.success());
    let relay = relay::Relay::start(relay::through(&url, 0).1).await;
    let (relayed, _) = relay::through(&url, relay.port);
    let data = tmp.path().join("data");
    let args: Vec<OsString> = vec![
        "--database-url".into(),
        relayed.into(),
        "--data-dir".into(),
        data.clone().into(),
    ];
    let mut server = start_on(&args, &config);
    let http = reqwest::Client::new();
    let ready = |base: String| {
        let http = http.clone();
        async move {
            http.get(format!("{base}/readyz"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    let c = bursar_client::Client::new(&server.base, MEMBER);
    let ask = bursar_client::Authorize::model("gpt-4o-mini")
        .prompt_tokens(100)
        .max_tokens(50);
    let usage = bursar_client::TokenUsage {
        input_tokens: 100,
        cached_input_tokens: 0,
        output_tokens: 10,
    };
    let before = c.authorize(&ask, None).await.unwrap();
    c.settle(
        &before.authorization_id,
        &bursar_client::Settle::tokens(usage),
    )
    .await
    .unwrap();

    relay.cut();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready(server.base.clone()).await != 503 {
        assert!(Instant::now() < deadline, "the outage never showed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut held, mut settled) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let p = c.authorize(&ask, None).await.unwrap();
        if i % 2 == 0 {
            c.settle(&p.authorization_id, &bursar_client::Settle::tokens(usage))
                .await
                .unwrap();
            settled.push(p.authorization_id.clone());
        }
        held.push(p.authorization_id);
    }
    let spools = || bursar_store::spool::waiting(&data).len();
    assert_eq!(spools(), 1, "the outage is spooled");
    // Killed during the outage: no shutdown hook runs, and nothing reached the store.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let report = bursar_store::read_entries(&direct.location())
        .await
        .unwrap();
    assert!(report
        .entries
        .iter()
        .all(|e| !held.contains(&e.authorization.to_string())));
    // `ledger verify` says what is waiting in the spool.
    let out = Command::new(BIN)
        .args(["ledger", "verify", "--config"])
        .arg(&config)
        .args(["--database-url", url.as_str(), "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kept while the store was away"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The store returns, and the instance starts again: its spool lands first.
    relay.mend();
    let server = start_on(&args, &config);
    assert_eq!(spools(), 0, "the spool landed and was removed");
    let report = bursar_store::read_entries(&direct.location())
        .await
        .unwrap();
    assert!(
        report.chain_problems.is_empty(),
        "{:?}",
        report.chain_problems
    );
    let count = |id: &str, kind: EntryKind| {
        report
            .entries
            .iter()
            .filter(|e| e.authorization.to_string() == id && e.kind == kind)
            .count()
    };
    for id in &held {
        assert_eq!(count(id, EntryKind::Hold), 1, "hold {id}: once");
        let hold = report
            .entries
            .iter()
            .find(|e| e.authorization.to_string() == *id)
            .unwrap();
        assert_ne!(hold.flags & bursar_core::ledger::flags::FAIL_OPEN, 0);
    }
    for id in &settled {
        assert_eq!(count(id, EntryKind::Settle), 1, "settle {id}: once");
    }
    // The holds never settled expire by policy, like any other.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let report = bursar_store::read_entries(&direct.location())
            .await
            .unwrap();
        let finished: HashSet<String> = report
            .entries
            .iter()
            .filter(|e| e.kind != EntryKind::Hold)
            .map(|e| e.authorization.to_string())
            .collect();
        if held.iter().all(|id| finished.contains(id)) {
            break;
        }
        assert!(Instant::now() < deadline, "spooled holds left open");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let out = bursar(&["ledger", "verify"], &direct, &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(server);
}

async fn kill_9(store: &Store, dir: &Path) {
    let config = write_config(dir, CONFIG);
    let mut server = start_on(&store.args(), &config);
    let held: Arc<Mutex<Vec<String>>> = Arc::default();
    let settled: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (held, settled, stop, base) = (
            held.clone(),
            settled.clone(),
            stop.clone(),
            server.base.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let c = bursar_client::Client::new(&base, MEMBER);
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 100_000 {
                i += 1;
                let req = bursar_client::Authorize::model("gpt-4o-mini")
                    .prompt_tokens(100 + i % 50)
                    .max_tokens(50);
                let Ok(p) = c.authorize(&req, None).await else {
                    break;
                };
                held.lock().unwrap().push(p.authorization_id.clone());
                if (i + w).is_multiple_of(2) {
                    let usage = bursar_client::TokenUsage {
                        input_tokens: 100,
                        cached_input_tokens: 0,
                        output_tokens: 10,
                    };
                    match c
                        .settle(&p.authorization_id, &bursar_client::Settle::tokens(usage))
                        .await
                    {
                        Ok(_) => settled.lock().unwrap().push(p.authorization_id),
                        Err(_) => break,
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SIGKILL mid-load: no shutdown hook runs.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    let held = held.lock().unwrap().clone();
    let settled = settled.lock().unwrap().clone();
    assert!(
        held.len() > 100,
        "the load ran ({} holds acknowledged)",
        held.len()
    );

    // Restart: it recovers, and once the TTL has passed no hold is left open. (On
    // PostgreSQL, holds the killed process had claimed wait until it counts as dead:
    // its lock free for DEAD_AFTER.)
    let server = start_on(&store.args(), &config);
    // Every acknowledged hold and settle survived the kill (on the embedded store some
    // were only in the journal: the start landed them before it took any call).
    let report = bursar_store::read_entries(&store.location()).await.unwrap();
    assert!(
        report.chain_problems.is_empty(),
        "{:?}",
        report.chain_problems
    );
    let stored_holds: HashSet<String> = report
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Hold)
        .map(|e| e.authorization.to_string())
        .collect();
    let stored_settles: HashSet<String> = report
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Settle)
        .map(|e| e.authorization.to_string())
        .collect();
    for id in &held {
        assert!(stored_holds.contains(id), "acknowledged hold {id} lost");
    }
    for id in &settled {
        assert!(stored_settles.contains(id), "acknowledged settle {id} lost");
    }

    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    let report = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let report = bursar_store::read_entries(&store.location()).await.unwrap();
        let finished: HashSet<_> = report
            .entries
            .iter()
            .filter(|e| e.kind != EntryKind::Hold && e.kind != EntryKind::Adjustment)
            .map(|e| e.authorization)
            .collect();
        let open = report
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Hold && !finished.contains(&e.authorization))
            .count();
        if open == 0 {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} holds still open past their TTL"
        );
    };
    assert!(
        report.entries.iter().any(|e| e.kind == EntryKind::Expire),
        "unsettled holds expired"
    );
    // The ledger proves itself, while the server runs.
    let out = bursar(&["ledger", "verify"], store, &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(server);
}

#[test]
fn ledger_verify_names_the_edited_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = write_config(tmp.path(), CONFIG);
    let mut server = start(&data, &config);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = bursar_client::Client::new(&server.base, MEMBER);
        for _ in 0..3 {
            let p = c
                .authorize(
                    &bursar_client::Authorize::model("gpt-4o-mini").prompt_tokens(10),
                    Some(&format!("{:?}", Instant::now())),
                )
                .await
                .unwrap();
            c.void(&p.authorization_id, &bursar_client::Void::default())
                .await
                .unwrap();
        }
    });
    // A second server on the same data directory is refused while this one runs: two
    // engines on one ledger would each enforce budgets on their own calls only.
    let mut second = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second server runs on a data directory in use");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("in use by another running bursar"), "{err}");
    // A graceful stop: what was acknowledged is in the store when it ends.
    let term = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    server.child.wait().unwrap();
    let verify = || {
        Command::new(BIN)
            .args(["ledger", "verify", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap()
    };
    let ok = verify();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("6 entries"));
    let conn = rusqlite::Connection::open(bursar_store::sqlite::ledger_path(&data)).unwrap();
    conn.execute("UPDATE ledger SET held = held + 1000 WHERE seq = 3", [])
        .unwrap();
    let bad = verify();
    assert_eq!(bad.status.code(), Some(1));
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.contains("entry 3 "), "{text}");
    // The server refuses to start on a ledger that does not verify.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not verify"));
}

#[test]
fn a_bad_configuration_is_refused_naming_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let text = r#"
[server]
listen = "127.0.0.1:0"
colour = "blue"
"#;
    let config = write_config(tmp.path(), text);
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));

    let impossible = r#"
[[plans]]
id = "pro"
default_task = "write"
[plans.tasks.chat]
classes = ["gigantic"]
default_class = "small"
max_tokens = 100

[[tenants]]
id = "acme"
plan = "enterprise"
timezone = "Moon/Base"

[[keys]]
name = "k"
tenant = "nobody"
kind = "member"
secret = "short"
"#;
    let config = write_config(tmp.path(), impossible);
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "default_task `write`",
        "class `gigantic`",
        "default_class `small`",
        "plan `enterprise`",
        "Moon/Base",
        "tenant `nobody`",
        "secret must start",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn prices_import_reads_litellm_json() {
    let tmp = tempfile::tempdir().unwrap();
    let json = json!({
        "sample_spec": {"input_cost_per_token": 0},
        "gpt-4o-mini": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07, "max_input_tokens": 128000, "max_output_tokens": 16384},
        "claude-3-5-haiku-20241022": {"litellm_provider": "anthropic", "mode": "chat", "input_cost_per_token": 8e-07, "output_cost_per_token": 4e-06, "max_input_tokens": 200000, "max_output_tokens": 8192}
    });
    let src = tmp.path().join("litellm.json");
    std::fs::write(&src, json.to_string()).unwrap();
    let out_path = tmp.path().join("book.toml");
    let out = Command::new(BIN)
        .args(["prices", "import"])
        .arg(&src)
        .arg("--out")
        .arg(&out_path)
        .args(["--effective", "2026-01-01"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported 2 models"));
    let config = format!(
        "[server]\nprice_book = {:?}\n{}",
        out_path.display().to_string(),
        CONFIG
    );
    let config = write_config(tmp.path(), &config);
    let list = Command::new(BIN)
        .args(["prices", "list", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("claude-3-5-haiku-20241022") || text.contains("claude-3-5-haiku"),
        "{text}"
    );
    assert!(text.contains("0.15"), "{text}");
    let bad = Command::new(BIN)
        .args(["prices", "import", "/nonexistent.json"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn admin_commands_drive_a_running_bursar() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let text = format!(
        "{CONFIG}\n[[keys]]\nname = \"root\"\nkind = \"platform_admin\"\nsecret = \"bsr_cli_platform_admin_0000000000\"\n"
    );
    let config = write_config(tmp.path(), &text);
    let server = start(&data, &config);
    let admin = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env("BURSAR_URL", &server.base)
            .env("BURSAR_ADMIN_KEY", "bsr_cli_platform_admin_0000000000")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    let t = admin(&[
        "tenants",
        "create",
        "globex",
        "--plan",
        "pro",
        "--timezone",
        "Asia/Tokyo",
    ]);
    assert_eq!(t["timezone"], "Asia/Tokyo");
    let k = admin(&["keys", "create", "--tenant", "globex", "--name", "app"]);
    let secret = k["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("bsr_"));
    let b = admin(&[
        "budgets", "set", "--tenant", "globex", "daily", "--scope", "tenant", "--window", "daily",
        "--limit", "0.0001",
    ]);
    assert_eq!(b["id"], "globex.daily");
    let list = admin(&["budgets", "list", "--tenant", "globex"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let plans = admin(&["plans"]);
    assert_eq!(plans[0]["id"], "pro");
    let keys = admin(&["keys", "list", "--tenant", "globex"]);
    assert_eq!(keys[0]["name"], "app");
    // The new key spends under the new budget: $0.0001 does not cover 1,000 prompt tokens.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = bursar_client::Client::new(&server.base, &secret);
        let err = c
            .authorize(&bursar_client::Authorize::model("gpt-4o-mini").prompt_tokens(1000), None)
            .await
            .unwrap_err();
        assert!(matches!(err, bursar_client::Error::Api { status: 402, ref code, .. } if code == "budget_exceeded"), "{err}");
    });
    let id = keys[0]["id"].as_str().unwrap();
    let revoked = admin(&["keys", "revoke", "--tenant", "globex", id]);
    assert!(!revoked["revoked_at"].is_null());
    // A revoked key is refused.
    let out = Command::new(BIN)
        .args(["tenants", "set-plan", "globex", "pro"])
        .env("BURSAR_URL", &server.base)
        .env("BURSAR_ADMIN_KEY", &secret)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    // A tenant cannot be given its plan by its own admin: the CLI shows the API's error.
    let ops = admin(&[
        "keys",
        "create",
        "--tenant",
        "globex",
        "--name",
        "ops",
        "--kind",
        "tenant_admin",
    ]);
    let out = Command::new(BIN)
        .args(["tenants", "set-plan", "globex", "pro"])
        .env("BURSAR_URL", &server.base)
        .env("BURSAR_ADMIN_KEY", ops["secret"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("403"), "{stderr}");
}

/// `bursar serve` takes its configuration file, data directory and address from a flag,
/// else the environment, else the configuration file; with none of them it runs the
/// built-in demo configuration on `./bursar-data`.
#[test]
fn serve_takes_each_setting_from_a_flag_the_environment_or_the_file_else_the_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    // A command with none of Bursar's variables from the test's own environment.
    let serve = |args: &[&std::ffi::OsStr]| {
        let mut c = Command::new(BIN);
        c.arg("serve").args(args).current_dir(tmp.path());
        for v in [
            "BURSAR_CONFIG",
            "BURSAR_DATA_DIR",
            "BURSAR_DATABASE_URL",
            "BURSAR_REDIS_URL",
            "BURSAR_LISTEN",
            "BURSAR_MIGRATE",
            "BURSAR_WORKERS",
        ] {
            c.env_remove(v);
        }
        c
    };
    // The call is permitted, and the runtime has `workers` threads running requests.
    let serves = |server: &common::Server, key: &str, workers: usize| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let c = bursar_client::Client::new(&server.base, key);
            c.authorize(
                &bursar_client::Authorize::model("gpt-4o-mini").prompt_tokens(10),
                None,
            )
            .await
            .unwrap();
            let metrics = reqwest::get(format!("{}/metrics", server.base))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let line = format!("\nbursar_runtime_workers {workers}\n");
            assert!(
                metrics.contains(&line),
                "no `{}` in:\n{metrics}",
                line.trim()
            );
        });
    };
    let ledger = |d: &Path| d.join("bursar.db").exists();

    // The file names the address, the data directory and the workers.
    let file_dir = dir("from-file");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nworkers = 3\n{CONFIG}",
        file_dir.display()
    );
    let config = write_config(tmp.path(), &text);
    let server = start_command(serve(&["--config".as_ref(), config.as_os_str()]));
    serves(&server, MEMBER, 3);
    drop(server);
    assert!(ledger(&file_dir));

    // The environment wins over the file, and names the file too.
    let env_dir = dir("from-env");
    let server = start_command({
        let mut c = serve(&[]);
        c.env("BURSAR_CONFIG", &config)
            .env("BURSAR_DATA_DIR", &env_dir)
            .env("BURSAR_WORKERS", "1");
        c
    });
    serves(&server, MEMBER, 1);
    drop(server);
    assert!(ledger(&env_dir));

    // A flag wins over the environment.
    let flag_dir = dir("from-flag");
    let server = start_command({
        let mut c = serve(&[
            "--data-dir".as_ref(),
            flag_dir.as_os_str(),
            "--workers".as_ref(),
            "2".as_ref(),
        ]);
        c.env("BURSAR_CONFIG", &config)
            .env("BURSAR_DATA_DIR", &env_dir)
            .env("BURSAR_WORKERS", "1");
        c
    });
    serves(&server, MEMBER, 2);
    drop(server);
    assert!(ledger(&flag_dir));

    // None of them (but the address, so the test does not take port 8080): the demo
    // configuration and its keys, on ./bursar-data.
    let server = start_command({
        let mut c = serve(&[]);
        c.env("BURSAR_LISTEN", "127.0.0.1:0");
        c
    });
    let cores = std::thread::available_parallelism().unwrap().get();
    serves(&server, "bsr_demo_alice_member_key_000001", cores);
    drop(server);
    assert!(ledger(&dir("bursar-data")));

    // No workers is refused.
    let out = serve(&["--workers".as_ref(), "0".as_ref()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workers"), "{err}");
}
