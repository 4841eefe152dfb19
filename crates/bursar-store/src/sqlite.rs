//! The embedded store: one SQLite file in WAL mode, written by one thread.
//!
//! The engine appends entries under its lock through [`LedgerHandle`], which only puts
//! them on a bounded channel. The writer thread takes everything waiting (up to
//! [`MAX_BATCH_COMMANDS`]), writes it in one transaction — entries with their chain hash,
//! the per-bucket counters they change, alerts and catalog changes — commits with
//! the configured durability (`synchronous = NORMAL` survives a killed process,
//! `FULL` a lost machine), and only then resolves the tickets. A caller acknowledges a
//! request only after its ticket resolved, so a killed process (with `power`
//! durability, a lost machine too) loses nothing it acknowledged, and many concurrent
//! requests share one commit.
//!
//! Failure behaviour: if a commit fails, its tickets resolve with an error and the store
//! turns unhealthy: every later ticket fails too (fail closed) until a restart recovers
//! from what is on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use bursar_core::budget::{BucketKey, Counter};
pub use bursar_core::config::Durability;
use bursar_core::engine::LedgerSink;
use bursar_core::ledger::{AlertEvent, Entry, EntryKind, HoldDetail, Replay, GENESIS_HASH};
use bursar_core::pricebook::TokenUsage;
use bursar_core::Money;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::StoreError;

/// Commands waiting for the writer; past this, appends wait (backpressure) rather than
/// growing memory without bound.
pub const MAX_QUEUED_COMMANDS: usize = 65_536;
/// How long the writer waits for more work after the first command of a batch, when the
/// previous batch showed concurrent callers. A commit costs far more than the wait, so
/// under load this multiplies the work per commit; a lone caller never waits.
pub const GROUP_COMMIT_WINDOW: Duration = Duration::from_micros(100);
/// Commands written in one transaction, so one commit never grows without bound.
pub const MAX_BATCH_COMMANDS: usize = 4_096;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dict (id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    auth BLOB NOT NULL,
    tenant INTEGER NOT NULL,
    key_id BLOB,
    held INTEGER NOT NULL,
    cost INTEGER NOT NULL,
    charge INTEGER NOT NULL,
    model_req INTEGER,
    model_used INTEGER,
    price_version INTEGER,
    in_tok INTEGER NOT NULL,
    cached_tok INTEGER NOT NULL,
    out_tok INTEGER NOT NULL,
    quantity INTEGER NOT NULL,
    latency_ms INTEGER,
    flags INTEGER NOT NULL,
    detail TEXT,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_auth ON ledger(auth);
-- Holds made with an Idempotency-Key, found by it once the engine has forgotten them.
CREATE INDEX IF NOT EXISTS ledger_idempotency ON ledger(tenant, json_extract(detail, '$.idempotency_key'))
    WHERE kind = 1 AND json_extract(detail, '$.idempotency_key') IS NOT NULL;
CREATE TABLE IF NOT EXISTS counters (
    bucket TEXT PRIMARY KEY,
    held INTEGER NOT NULL,
    spent INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    tenant TEXT,
    bucket TEXT NOT NULL,
    level TEXT NOT NULL,
    reason TEXT NOT NULL,
    limit_nanos INTEGER NOT NULL,
    used_nanos INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS catalog (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
"#;

/// A catalog object kept by the store (keys, budgets, tenants created by the admin API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogRow {
    pub kind: String,
    pub id: String,
    /// JSON; `None` deletes the row.
    pub body: Option<String>,
}

enum Command {
    Append {
        entries: Vec<Entry>,
        alerts: Vec<AlertEvent>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Catalog {
        row: CatalogRow,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// The ticket of an append: resolves when the entries are committed.
pub struct Ticket(oneshot::Receiver<Result<(), StoreError>>);

impl Ticket {
    pub async fn wait(self) -> Result<(), StoreError> {
        self.0.await.unwrap_or(Err(StoreError::Unavailable(
            "the ledger writer stopped".into(),
        )))
    }

    /// For synchronous callers (CLI tools, benchmarks).
    pub fn wait_blocking(self) -> Result<(), StoreError> {
        self.0
            .blocking_recv()
            .unwrap_or(Err(StoreError::Unavailable(
                "the ledger writer stopped".into(),
            )))
    }
}

/// A cheap, cloneable handle that appends to the ledger.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: SyncSender<Command>,
    healthy: Arc<AtomicBool>,
}

impl LedgerHandle {
    fn send(&self, cmd: Command) {
        // A full queue means the disk is behind: wait for room rather than drop.
        match self.tx.try_send(cmd) {
            Ok(()) => {}
            Err(TrySendError::Full(cmd)) => {
                let _ = self.tx.send(cmd);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.healthy.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Writes a catalog change; resolves when committed.
    pub fn put_catalog(&self, row: CatalogRow) -> Ticket {
        let (done, rx) = oneshot::channel();
        self.send(Command::Catalog { row, done });
        Ticket(rx)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }
}

impl LedgerSink for LedgerHandle {
    type Ticket = Ticket;

    fn append(&self, entries: Vec<Entry>, alerts: Vec<AlertEvent>) -> Ticket {
        let (done, rx) = oneshot::channel();
        if !self.is_healthy() {
            let _ = done.send(Err(StoreError::Unavailable(
                "the ledger is failing; restart to recover".into(),
            )));
        } else {
            self.send(Command::Append {
                entries,
                alerts,
                done,
            });
        }
        Ticket(rx)
    }
}

/// What was on disk when the store opened.
pub struct Opened {
    pub handle: LedgerHandle,
    /// How many entries were replayed.
    pub entries: usize,
    pub catalog: Vec<CatalogRow>,
    pub writer: thread::JoinHandle<()>,
}

fn open_connection(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000;")?;
    conn.execute_batch(match durability {
        Durability::Process => "PRAGMA synchronous = NORMAL;",
        Durability::Power => "PRAGMA synchronous = FULL;",
    })?;
    Ok(conn)
}

/// The path of the ledger database in a data directory.
pub fn ledger_path(data_dir: &Path) -> PathBuf {
    data_dir.join("bursar.db")
}

/// Opens (or creates) the store, streams the ledger to `on_entry` in order (recovery),
/// and starts the writer thread. Refuses a ledger whose chain does not verify.
pub fn open(
    path: &Path,
    durability: Durability,
    mut on_entry: impl FnMut(Entry),
) -> Result<Opened, StoreError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(e.to_string()))?;
    }
    let conn = open_connection(path, durability)?;
    conn.execute_batch(SCHEMA)?;
    conn.execute(
        "INSERT OR IGNORE INTO meta (k, v) VALUES ('schema_version', '1')",
        [],
    )?;
    let report = read_ledger(&conn, &mut on_entry)?;
    if let Some(p) = report.chain_problems.first() {
        return Err(StoreError::Corrupt(format!(
            "the ledger does not verify: {p}; run `bursar ledger verify` for details"
        )));
    }
    let catalog = read_catalog(&conn)?;
    let (tx, rx) = mpsc::sync_channel(MAX_QUEUED_COMMANDS);
    let healthy = Arc::new(AtomicBool::new(true));
    let mut writer = Writer {
        conn,
        group_commit_window: GROUP_COMMIT_WINDOW,
        dict: HashMap::new(),
        last_hash: report.last_hash,
    };
    writer.load_dict()?;
    // SQLite's automatic checkpoint (every 1,000 WAL pages) keeps the WAL small. It runs
    // inside a commit; copying it to a second connection was measured and gained
    // nothing on this machine while letting the WAL grow without bound (BENCHMARKS.md).
    let h = healthy.clone();
    let join = thread::Builder::new()
        .name("bursar-ledger-writer".into())
        .spawn(move || writer.run(rx, h))
        .map_err(|e| StoreError::Io(e.to_string()))?;
    Ok(Opened {
        handle: LedgerHandle { tx, healthy },
        entries: report.entries,
        catalog,
        writer: join,
    })
}

struct Writer {
    conn: Connection,
    group_commit_window: Duration,
    dict: HashMap<String, i64>,
    last_hash: [u8; 32],
}

impl Writer {
    fn load_dict(&mut self) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare("SELECT id, text FROM dict")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (id, text) = row?;
            self.dict.insert(text, id);
        }
        Ok(())
    }

    fn run(&mut self, rx: Receiver<Command>, healthy: Arc<AtomicBool>) {
        let mut last_batch = 0usize;
        loop {
            let first = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(c) => c,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = vec![first];
            // Wait for company only when the last batch had some: a lone caller is not
            // made to wait for others who are not coming.
            let window = if last_batch > 1 {
                self.group_commit_window
            } else {
                Duration::ZERO
            };
            let window_end = std::time::Instant::now() + window;
            while batch.len() < MAX_BATCH_COMMANDS {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => {
                        // Under load, wait a moment for more: one commit for many callers.
                        let left = window_end.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match rx.recv_timeout(left) {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                }
            }
            last_batch = batch.len();
            let saved_hash = self.last_hash;
            let result = if healthy.load(Ordering::SeqCst) {
                self.write(&batch)
            } else {
                Err(StoreError::Unavailable("the ledger is failing".into()))
            };
            if let Err(e) = &result {
                tracing::error!(error = %e, "ledger commit failed; the store now fails closed");
                healthy.store(false, Ordering::SeqCst);
                self.last_hash = saved_hash;
                // Interned texts of the failed transaction were rolled back too.
                self.dict.clear();
                let _ = self.load_dict();
            }
            for cmd in batch {
                let done = match cmd {
                    Command::Append { done, .. } | Command::Catalog { done, .. } => done,
                };
                let _ = done.send(result.clone());
            }
        }
    }

    fn intern(
        dict: &mut HashMap<String, i64>,
        tx: &rusqlite::Transaction<'_>,
        text: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        let Some(text) = text else { return Ok(None) };
        if let Some(&id) = dict.get(text) {
            return Ok(Some(id));
        }
        tx.execute("INSERT INTO dict (text) VALUES (?1)", params![text])?;
        let id = tx.last_insert_rowid();
        dict.insert(text.to_string(), id);
        Ok(Some(id))
    }

    fn write(&mut self, batch: &[Command]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let mut deltas: HashMap<&BucketKey, Counter> = HashMap::new();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO ledger (at_ms, kind, auth, tenant, key_id, held, cost, charge, model_req, model_used, price_version, in_tok, cached_tok, out_tok, quantity, latency_ms, flags, detail, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
            )?;
            let mut alert = tx.prepare_cached(
                "INSERT INTO alerts (at_ms, tenant, bucket, level, reason, limit_nanos, used_nanos) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for cmd in batch {
                match cmd {
                    Command::Append {
                        entries, alerts, ..
                    } => {
                        for e in entries {
                            let hash = e.chain_hash(&self.last_hash);
                            let tenant = Self::intern(&mut self.dict, &tx, Some(&e.tenant))?;
                            let model_req =
                                Self::intern(&mut self.dict, &tx, e.model_requested.as_deref())?;
                            let model_used =
                                Self::intern(&mut self.dict, &tx, e.model_used.as_deref())?;
                            let price =
                                Self::intern(&mut self.dict, &tx, e.price_version.as_deref())?;
                            let detail = match &e.detail {
                                Some(d) => Some(
                                    serde_json::to_string(d.as_ref())
                                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                                ),
                                None => None,
                            };
                            insert.execute(params![
                                e.at_ms,
                                e.kind.code(),
                                e.authorization.as_bytes().as_slice(),
                                tenant,
                                e.key_id.map(|k| k.as_bytes().to_vec()),
                                e.held_delta.nanos(),
                                e.cost_delta.nanos(),
                                e.charge_delta.nanos(),
                                model_req,
                                model_used,
                                price,
                                to_i64(e.usage.input_tokens),
                                to_i64(e.usage.cached_input_tokens),
                                to_i64(e.usage.output_tokens),
                                to_i64(e.quantity),
                                e.latency_ms,
                                e.flags,
                                detail,
                                hash.as_slice(),
                            ])?;
                            self.last_hash = hash;
                            for b in e.buckets() {
                                let c = deltas.entry(b).or_default();
                                c.held += e.held_delta;
                                c.spent += e.cost_delta;
                            }
                        }
                        for a in alerts {
                            alert.execute(params![
                                a.at_ms,
                                a.tenant,
                                a.bucket.to_string(),
                                a.level.as_str(),
                                a.reason,
                                a.limit.nanos(),
                                a.used.nanos(),
                            ])?;
                        }
                    }
                    Command::Catalog { row, .. } => match &row.body {
                        Some(body) => {
                            tx.execute(
                                "INSERT INTO catalog (kind, id, body) VALUES (?1, ?2, ?3) ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
                                params![row.kind, row.id, body],
                            )?;
                        }
                        None => {
                            tx.execute(
                                "DELETE FROM catalog WHERE kind = ?1 AND id = ?2",
                                params![row.kind, row.id],
                            )?;
                        }
                    },
                }
            }
            let mut upsert = tx.prepare_cached(
                "INSERT INTO counters (bucket, held, spent) VALUES (?1, ?2, ?3) ON CONFLICT (bucket) DO UPDATE SET held = held + excluded.held, spent = spent + excluded.spent",
            )?;
            for (bucket, d) in &deltas {
                upsert.execute(params![bucket.to_string(), d.held.nanos(), d.spent.nanos()])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The ledger read back, with what the chain check found.
pub struct LedgerReport {
    pub entries: Vec<Entry>,
    pub last_hash: [u8; 32],
    /// Chain breaks, each naming the entry (`seq`).
    pub chain_problems: Vec<String>,
}

/// What a pass over the ledger found.
struct ChainSummary {
    entries: usize,
    last_hash: [u8; 32],
    chain_problems: Vec<String>,
}

/// Reads the ledger in order, checking the chain, and hands each entry to `visit`; it
/// streams, so memory does not grow with the ledger (only open and expired holds are
/// remembered, to attach their buckets to the entries that follow).
fn read_ledger(
    conn: &Connection,
    visit: &mut dyn FnMut(Entry),
) -> Result<ChainSummary, StoreError> {
    let mut dict: HashMap<i64, String> = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT id, text FROM dict")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (id, text) = row?;
            dict.insert(id, text);
        }
    }
    let text = |id: Option<i64>| id.and_then(|i| dict.get(&i).cloned());
    let mut stmt = conn.prepare(
        "SELECT seq, at_ms, kind, auth, tenant, key_id, held, cost, charge, model_req, model_used, price_version, in_tok, cached_tok, out_tok, quantity, latency_ms, flags, detail, hash FROM ledger ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut entries = 0usize;
    let mut problems = Vec::new();
    let mut prev = GENESIS_HASH;
    let mut expected_seq = 1i64;
    let mut holds: HashMap<Uuid, Arc<HoldDetail>> = HashMap::new();
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        if seq != expected_seq {
            problems.push(format!(
                "entry {expected_seq} is missing (next entry is {seq})"
            ));
        }
        expected_seq = seq + 1;
        let kind_code: i64 = r.get(2)?;
        let auth: Vec<u8> = r.get(3)?;
        let key_id: Option<Vec<u8>> = r.get(5)?;
        let detail: Option<String> = r.get(18)?;
        let stored_hash: Vec<u8> = r.get(19)?;
        let Some(kind) = EntryKind::from_code(kind_code) else {
            problems.push(format!("entry {seq}: unknown kind {kind_code}"));
            continue;
        };
        let detail = match detail {
            Some(d) => match serde_json::from_str::<HoldDetail>(&d) {
                Ok(d) => Some(Arc::new(d)),
                Err(e) => {
                    problems.push(format!("entry {seq}: unreadable hold detail: {e}"));
                    None
                }
            },
            None => None,
        };
        let authorization = Uuid::from_slice(&auth).unwrap_or_default();
        if let Some(d) = &detail {
            holds.insert(authorization, d.clone());
        }
        let e = Entry {
            at_ms: r.get(1)?,
            kind,
            authorization,
            tenant: text(r.get(4)?).unwrap_or_default(),
            key_id: key_id.and_then(|k| Uuid::from_slice(&k).ok()),
            held_delta: Money::from_nanos(r.get(6)?),
            cost_delta: Money::from_nanos(r.get(7)?),
            charge_delta: Money::from_nanos(r.get(8)?),
            model_requested: text(r.get(9)?),
            model_used: text(r.get(10)?),
            price_version: text(r.get(11)?),
            usage: TokenUsage {
                input_tokens: from_i64(r.get(12)?),
                cached_input_tokens: from_i64(r.get(13)?),
                output_tokens: from_i64(r.get(14)?),
            },
            quantity: from_i64(r.get(15)?),
            latency_ms: r.get(16)?,
            flags: r.get(17)?,
            hold: if detail.is_some() {
                None
            } else {
                holds.get(&authorization).cloned()
            },
            detail,
        };
        let h = e.chain_hash(&prev);
        if h.as_slice() != stored_hash.as_slice() {
            problems.push(format!(
                "entry {seq} ({} of authorization {}): hash does not match its content and the previous hash",
                kind.as_str(),
                e.authorization
            ));
        }
        prev = stored_hash.try_into().unwrap_or(h);
        // A settled or voided hold is done; an expired one may still be reconciled.
        if matches!(
            kind,
            EntryKind::Settle | EntryKind::Void | EntryKind::Adjustment
        ) {
            holds.remove(&authorization);
        }
        entries += 1;
        visit(e);
    }
    Ok(ChainSummary {
        entries,
        last_hash: prev,
        chain_problems: problems,
    })
}

fn read_catalog(conn: &Connection) -> Result<Vec<CatalogRow>, StoreError> {
    let mut stmt = conn.prepare("SELECT kind, id, body FROM catalog ORDER BY kind, id")?;
    let rows = stmt.query_map([], |r| {
        Ok(CatalogRow {
            kind: r.get(0)?,
            id: r.get(1)?,
            body: Some(r.get(2)?),
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// What `bursar ledger verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub entries: usize,
    pub buckets: usize,
    pub problems: Vec<String>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Recomputes the hash chain and rebuilds every counter from the entries, and compares
/// them with the stored counters. Opens the file read-only; safe while a server runs.
pub fn verify(path: &Path) -> Result<Verification, StoreError> {
    if !path.exists() {
        return Err(StoreError::Io(format!("no ledger at {}", path.display())));
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.execute_batch("PRAGMA busy_timeout = 5000; BEGIN")?;
    let mut replay = Replay::default();
    let mut n = 0u64;
    let report = read_ledger(&conn, &mut |e| {
        n += 1;
        replay.apply(n, &e);
    })?;
    let mut problems = report.chain_problems;
    problems.append(&mut replay.problems);
    let stored = stored_counters(&conn)?;
    for (bucket, c) in &replay.counters {
        let s = stored.get(bucket).copied().unwrap_or_default();
        if s != *c {
            problems.push(format!(
                "counter {bucket}: stored held {} spent {}, rebuilt from the ledger held {} spent {}",
                s.held, s.spent, c.held, c.spent
            ));
        }
    }
    for (bucket, s) in &stored {
        if !replay.counters.contains_key(bucket) && *s != Counter::default() {
            problems.push(format!("counter {bucket}: stored but no entry touches it"));
        }
    }
    conn.execute_batch("COMMIT")?;
    Ok(Verification {
        entries: report.entries,
        buckets: replay.counters.len(),
        problems,
    })
}

/// Every entry of the ledger in order, read-only (audits, tests, exports).
pub fn read_entries(path: &Path) -> Result<LedgerReport, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.execute_batch("PRAGMA busy_timeout = 5000;")?;
    let mut entries = Vec::new();
    let summary = read_ledger(&conn, &mut |e| entries.push(e))?;
    Ok(LedgerReport {
        entries,
        last_hash: summary.last_hash,
        chain_problems: summary.chain_problems,
    })
}

/// The counters table as stored.
pub fn stored_counters(conn: &Connection) -> Result<HashMap<BucketKey, Counter>, StoreError> {
    let mut stmt = conn.prepare("SELECT bucket, held, spent FROM counters")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut out = HashMap::new();
    for row in rows {
        let (b, held, spent) = row?;
        let key =
            BucketKey::parse(&b).ok_or_else(|| StoreError::Corrupt(format!("bad bucket `{b}`")))?;
        out.insert(
            key,
            Counter {
                held: Money::from_nanos(held),
                spent: Money::from_nanos(spent),
            },
        );
    }
    Ok(out)
}

/// Read-only queries for reports.
pub struct Reader {
    conn: parking_lot::Mutex<Connection>,
}

/// One alert as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AlertRow {
    pub id: i64,
    pub at_ms: i64,
    pub tenant: Option<String>,
    pub bucket: String,
    pub level: String,
    pub reason: String,
    pub limit: Money,
    pub used: Money,
}

/// A hold entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHold {
    pub authorization: Uuid,
    pub held: Money,
    /// The model (or metered API) held for.
    pub model_used: Option<String>,
    pub price_version: Option<String>,
    pub detail: HoldDetail,
}

/// A settle entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleRow {
    pub usage: TokenUsage,
    pub quantity: u64,
    pub cost: Money,
    pub charge: Money,
    pub released: Money,
    pub model_used: Option<String>,
    pub price_version: String,
    pub flags: u32,
}

/// Spend of one tenant grouped by one dimension.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageRow {
    pub group: String,
    pub calls: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost: Money,
    pub charge: Money,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.execute_batch("PRAGMA busy_timeout = 5000;")?;
        Ok(Reader {
            conn: parking_lot::Mutex::new(conn),
        })
    }

    pub fn alerts(&self, tenant: Option<&str>, limit: u32) -> Result<Vec<AlertRow>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, at_ms, tenant, bucket, level, reason, limit_nanos, used_nanos FROM alerts WHERE (?1 IS NULL OR tenant = ?1) ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![tenant, limit], |r| {
            Ok(AlertRow {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                tenant: r.get(2)?,
                bucket: r.get(3)?,
                level: r.get(4)?,
                reason: r.get(5)?,
                limit: Money::from_nanos(r.get(6)?),
                used: Money::from_nanos(r.get(7)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The hold a tenant made with an idempotency key, if any (however old).
    pub fn hold_by_idempotency_key(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<StoredHold>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT l.auth, l.held, mu.text, pv.text, l.detail FROM ledger l
             LEFT JOIN dict mu ON mu.id = l.model_used LEFT JOIN dict pv ON pv.id = l.price_version
             WHERE l.kind = 1 AND l.tenant = (SELECT id FROM dict WHERE text = ?1)
               AND json_extract(l.detail, '$.idempotency_key') = ?2
             ORDER BY l.seq LIMIT 1",
        )?;
        let mut rows = stmt.query(params![tenant, key])?;
        let Some(r) = rows.next()? else {
            return Ok(None);
        };
        let auth: Vec<u8> = r.get(0)?;
        let detail: String = r.get(4)?;
        let detail: HoldDetail = serde_json::from_str(&detail)
            .map_err(|e| StoreError::Corrupt(format!("unreadable hold detail: {e}")))?;
        Ok(Some(StoredHold {
            authorization: Uuid::from_slice(&auth)
                .map_err(|e| StoreError::Corrupt(format!("bad authorization id: {e}")))?,
            held: Money::from_nanos(r.get(1)?),
            model_used: r.get(2)?,
            price_version: r.get(3)?,
            detail,
        }))
    }

    /// Every (bucket, level) ever alerted, once each: what recovery restores so that a
    /// threshold of a period alerts once, across restarts.
    pub fn alerted_levels(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached("SELECT DISTINCT bucket, level FROM alerts")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Settled spend of a tenant since `since_ms`, by model used.
    pub fn usage_by_model(&self, tenant: &str, since_ms: i64) -> Result<Vec<UsageRow>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT COALESCE(d.text, ''), COUNT(*), SUM(l.in_tok), SUM(l.out_tok), SUM(l.cost), SUM(l.charge)
             FROM ledger l JOIN dict t ON t.id = l.tenant LEFT JOIN dict d ON d.id = l.model_used
             WHERE t.text = ?1 AND l.at_ms >= ?2 AND l.kind IN (2, 4, 5, 6)
             GROUP BY l.model_used ORDER BY SUM(l.cost) DESC",
        )?;
        let rows = stmt.query_map(params![tenant, since_ms], |r| {
            Ok(UsageRow {
                group: r.get(0)?,
                calls: r.get(1)?,
                input_tokens: r.get(2)?,
                output_tokens: r.get(3)?,
                cost: Money::from_nanos(r.get(4)?),
                charge: Money::from_nanos(r.get(5)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Entries of one authorization, in order (for audits and for answers about old ids).
    pub fn entries_of(
        &self,
        auth: Uuid,
    ) -> Result<Vec<(i64, EntryKind, Money, Money)>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, kind, held, cost FROM ledger WHERE auth = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![auth.as_bytes().as_slice()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, kind, held, cost) = row?;
            if let Some(k) = EntryKind::from_code(kind) {
                out.push((seq, k, Money::from_nanos(held), Money::from_nanos(cost)));
            }
        }
        Ok(out)
    }

    /// The settle entry of an authorization, if it was settled: for answering a retried
    /// settle after the engine forgot it.
    pub fn settle_entry_of(&self, auth: Uuid) -> Result<Option<SettleRow>, StoreError> {
        let conn = self.conn.lock();
        let row = conn
            .query_row(
                "SELECT l.in_tok, l.cached_tok, l.out_tok, l.quantity, l.cost, l.charge, l.held, m.text, p.text, l.flags
                 FROM ledger l LEFT JOIN dict m ON m.id = l.model_used LEFT JOIN dict p ON p.id = l.price_version
                 WHERE l.auth = ?1 AND l.kind = 2 LIMIT 1",
                params![auth.as_bytes().as_slice()],
                |r| {
                    Ok(SettleRow {
                        usage: TokenUsage {
                            input_tokens: from_i64(r.get(0)?),
                            cached_input_tokens: from_i64(r.get(1)?),
                            output_tokens: from_i64(r.get(2)?),
                        },
                        quantity: from_i64(r.get(3)?),
                        cost: Money::from_nanos(r.get(4)?),
                        charge: Money::from_nanos(r.get(5)?),
                        released: -Money::from_nanos(r.get(6)?),
                        model_used: r.get(7)?,
                        price_version: r.get::<_, Option<String>>(8)?.unwrap_or_default(),
                        flags: r.get(9)?,
                    })
                },
            )
            .optional()?;
        Ok(row)
    }

    /// Whether an authorization id was ever recorded for this tenant.
    pub fn exists(&self, auth: Uuid, tenant: &str) -> Result<bool, StoreError> {
        let conn = self.conn.lock();
        let found: Option<i64> = conn
            .query_row(
                "SELECT l.seq FROM ledger l JOIN dict t ON t.id = l.tenant WHERE l.auth = ?1 AND t.text = ?2 LIMIT 1",
                params![auth.as_bytes().as_slice(), tenant],
                |r| r.get(0),
            )
            .optional()?;
        Ok(found.is_some())
    }
}
