//! The embedded store: one SQLite file in WAL mode, written by one thread.
//!
//! The writer (shared with the other backends, see the crate documentation) hands each
//! batch to [`Writer::write`]: entries with their chain hash, the per-bucket counters
//! they change, alerts and catalog changes in one transaction, committed with the
//! configured durability (`synchronous = NORMAL` survives a killed process, `FULL` a
//! lost machine).
//!
//! A start replays only the ledger's tail: the stored counters are those at the head
//! (they are written in the same transactions as the entries), and the writer keeps in
//! `meta.replay_from_seq` where the tail begins: at the first hold still open, or the
//! first entry of the recent past ([`crate::RECENT_REPLAY_MS`]), whichever is earlier.
//! The whole chain is then checked in the background ([`crate::ChainCheck`]).
//!
//! One process at a time holds a data directory: the store takes an exclusive lock on
//! its `bursar.lock` file for as long as its writer runs, and a second `bursar serve` on
//! the same directory is refused at start, naming it. (Two engines on one ledger would
//! each enforce budgets on only their own calls.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bursar_core::budget::{BucketKey, Counter};
pub use bursar_core::config::Durability;
use bursar_core::ledger::Entry;
use bursar_core::{FastMap, Money};
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use crate::keys::IdempotencyKeys;
use crate::spool::SpoolConfig;
use crate::{
    counter_deltas, from_i64, parse_counters, parse_detail, spawn_writer, to_i64, AlertRow,
    Backend, CatalogRow, ChainCheck, ChainReader, Command, LedgerReport, Opened, ReplayMarks,
    SettleRow, StoreError, StoredHold, StoredRow, UsageRow, Verification, Verifier,
};
use bursar_core::ledger::GENESIS_HASH;
use bursar_core::ledger::{EntryKind, HoldDetail};
use bursar_core::pricebook::TokenUsage;

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
-- The same holds by time: a start loads the keys of the idempotency window only.
CREATE INDEX IF NOT EXISTS ledger_idempotency_time ON ledger(at_ms)
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

/// How often, at most, the writer stores where the next start may begin replaying.
const REPLAY_MARK_EVERY: Duration = Duration::from_secs(1);

/// Where this start begins replaying, and the hash of the entry before it: the stored
/// replay start, or the whole ledger when there is none (or its anchor is gone, which
/// the background check then reports).
fn replay_start(conn: &Connection) -> Result<(i64, [u8; 32]), StoreError> {
    let from: Option<String> = conn
        .query_row("SELECT v FROM meta WHERE k = 'replay_from_seq'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(from) = from.and_then(|v| v.parse::<i64>().ok()).filter(|f| *f > 1) else {
        return Ok((1, GENESIS_HASH));
    };
    let anchor: Option<Vec<u8>> = conn
        .query_row(
            "SELECT hash FROM ledger WHERE seq = ?1",
            params![from - 1],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match anchor.and_then(|h| <[u8; 32]>::try_from(h).ok()) {
        Some(h) => (from, h),
        None => (1, GENESIS_HASH),
    })
}

/// Opens (or creates) the store, streams the ledger's tail to `on_entry` in order after
/// handing the stored counters to `on_counters` (or the whole ledger, on a first start
/// or a ledger written before replay starts were kept), and starts the writer thread.
/// Refuses a ledger whose tail does not verify; checks the rest in the background.
pub fn open<E: FnMut(Entry), C: FnMut(CatalogRow), K: FnOnce(HashMap<BucketKey, Counter>)>(
    path: &Path,
    durability: Durability,
    idempotency_window: Duration,
    mut recovery: crate::Recovery<E, C, K>,
) -> Result<Opened, StoreError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(e.to_string()))?;
    }
    let lock = lock_data_dir(path)?;
    let conn = open_connection(path, durability)?;
    conn.execute_batch(SCHEMA)?;
    conn.execute(
        "INSERT OR IGNORE INTO meta (k, v) VALUES ('schema_version', '1')",
        [],
    )?;
    conn.execute(
        "INSERT OR IGNORE INTO meta (k, v) VALUES ('store_id', ?1)",
        params![Uuid::now_v7().to_string()],
    )?;
    let spool = SpoolConfig {
        dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        store: store_identity(&conn)?,
        durability,
    };
    let conn = land_left_spools(conn, &spool)?;
    // One read transaction: the counters are those at the head the tail ends at.
    conn.execute_batch("BEGIN")?;
    let (from, anchor) = replay_start(&conn)?;
    if from > 1 {
        (recovery.on_counters)(stored_counters(&conn)?);
    }
    let mut marks = ReplayMarks::new(from);
    let (entries, last_hash, problems) = read_ledger(
        &conn,
        from,
        anchor,
        &mut recovery.on_entry,
        Some(&mut marks),
    )?;
    conn.execute_batch("COMMIT")?;
    if let Some(p) = problems.first() {
        return Err(StoreError::Corrupt(format!(
            "the ledger does not verify: {p}; run `bursar ledger verify` for details"
        )));
    }
    read_catalog(&conn, &mut recovery.on_catalog)?;
    let keys = Arc::new(load_idempotency_keys(&conn, idempotency_window)?);
    let chain = if from > 1 {
        check_in_background(path)?
    } else {
        ChainCheck::verified()
    };
    tracing::debug!(from_seq = from, "ledger tail replayed");
    let mut writer = Writer::new(conn, last_hash, Some(marks))?;
    writer.keys = Some(keys.clone());
    writer._lock = Some(lock);
    if durability == Durability::Process {
        writer.wal_flusher = Some(WalFlusher::start(path)?);
    }
    // SQLite's automatic checkpoint (every 1,000 WAL pages) keeps the WAL small. It runs
    // inside a commit; copying it to a second connection was measured and gained
    // nothing on this machine while letting the WAL grow without bound (BENCHMARKS.md).
    // With `process` durability an append is durable once in the page cache: its journal
    // record gives that without waiting for the writer. With `power`, only the writer's
    // synced commit does.
    let journal = match durability {
        Durability::Process => Some(crate::journal::Journal::start(&spool.dir, &spool.store)?),
        Durability::Power => None,
    };
    let (handle, join) = spawn_writer(writer, Some(spool), journal)?;
    Ok(Opened {
        handle,
        shared: None,
        reader: crate::Reader::Sqlite(Reader::open(path)?.with_keys(keys)),
        entries,
        chain,
        writer: join,
    })
}

/// Lands what an earlier run left in its spools and journal, before anything is read:
/// the replay and the stored counters then include it like any other entries.
fn land_left_spools(conn: Connection, spool: &SpoolConfig) -> Result<Connection, StoreError> {
    let head: Option<Vec<u8>> = conn
        .query_row(
            "SELECT hash FROM ledger ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let last_hash = match head {
        Some(h) => <[u8; 32]>::try_from(h)
            .map_err(|_| StoreError::Corrupt("the last entry's hash is not 32 bytes".into()))?,
        None => GENESIS_HASH,
    };
    // No replay marks: the stored replay start stays where it is, before what lands.
    let mut writer = Writer::new(conn, last_hash, None)?;
    crate::spool::land_left_spools(spool, &mut writer)?;
    // After the spools: a spooled command that was journaled moved its journal's mark.
    crate::journal::land_left(&spool.dir, &spool.store, &mut writer)?;
    Ok(writer.conn)
}

/// The name of the file whose lock says a process holds the data directory.
pub const LOCK_FILE: &str = "bursar.lock";

/// Takes the data directory's lock, held until the writer ends; refuses a directory
/// another live process holds. (The OS drops the lock with its holder, however it ends.)
fn lock_data_dir(db: &Path) -> Result<std::fs::File, StoreError> {
    let dir = db.parent().unwrap_or(Path::new("."));
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "the data directory {} is in use by another running bursar (it holds {}); one process at a time serves an embedded store",
            dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Io(format!("{}: {e}", path.display())))
        }
    }
}

/// The idempotency keys of the stored holds of the window, through the partial index
/// of keyed holds by time. The window ends at the ledger's last entry or now, whichever
/// is earlier (an entry stamped ahead of a clock set back makes it reach further back,
/// never less far). An empty ledger's filter is complete from any time.
fn load_idempotency_keys(
    conn: &Connection,
    window: Duration,
) -> Result<IdempotencyKeys, StoreError> {
    let started = Instant::now();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let last_ms: Option<i64> = conn
        .query_row(
            "SELECT at_ms FROM ledger ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    // An empty ledger has no key of any time.
    let from_ms = last_ms.map_or(i64::MIN, |last| {
        last.min(now_ms)
            .saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
    });
    let keys = IdempotencyKeys::new(window, from_ms);
    let mut stmt = conn.prepare(KEYS_OF_THE_WINDOW)?;
    let mut rows = stmt.query(params![from_ms])?;
    while let Some(r) = rows.next()? {
        let (at_ms, tenant, key): (i64, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
        keys.add([(at_ms, tenant.as_str(), key.as_str())]);
    }
    tracing::debug!(
        keys = keys.len(),
        from_ms,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "idempotency keys loaded"
    );
    Ok(keys)
}

/// The keyed holds made at or after `?1`: the condition is the partial index's, so the
/// index (by time) answers it.
pub(crate) const KEYS_OF_THE_WINDOW: &str = "SELECT l.at_ms, t.text, json_extract(l.detail, '$.idempotency_key')
     FROM ledger l JOIN dict t ON t.id = l.tenant
     WHERE l.kind = 1 AND json_extract(l.detail, '$.idempotency_key') IS NOT NULL AND l.at_ms >= ?1";

/// The first hold of tenant `?1` with idempotency key `?2` at or after `?3`: a key equal
/// to `?2` is not NULL, so the partial index by tenant and key answers it.
pub(crate) const HOLD_BY_IDEMPOTENCY_KEY: &str =
    "SELECT l.auth, l.held, mu.text, pv.text, l.detail FROM ledger l
     LEFT JOIN dict mu ON mu.id = l.model_used LEFT JOIN dict pv ON pv.id = l.price_version
     WHERE l.kind = 1 AND l.tenant = (SELECT id FROM dict WHERE text = ?1)
       AND json_extract(l.detail, '$.idempotency_key') = ?2 AND l.at_ms >= ?3
     ORDER BY l.seq LIMIT 1";

fn store_identity(conn: &Connection) -> Result<String, StoreError> {
    Ok(conn.query_row("SELECT v FROM meta WHERE k = 'store_id'", [], |r| r.get(0))?)
}

/// Checks the whole ledger (chain and counters, as `bursar ledger verify` does) on a
/// thread of its own, on a read-only snapshot, while the server runs.
fn check_in_background(path: &Path) -> Result<Arc<ChainCheck>, StoreError> {
    let chain = Arc::new(ChainCheck::default());
    let (check, path) = (chain.clone(), path.to_path_buf());
    std::thread::Builder::new()
        .name("bursar-ledger-check".into())
        .spawn(move || {
            let started = Instant::now();
            check.report(verify(&path), started);
        })
        .map_err(|e| StoreError::Io(e.to_string()))?;
    Ok(chain)
}

/// Stores where the next start may begin replaying, when it moved.
fn store_replay_start(
    marks: &mut Option<ReplayMarks>,
    conn: &Connection,
) -> Result<(), StoreError> {
    if let Some(from) = marks.as_mut().and_then(ReplayMarks::to_store) {
        conn.execute(
            "INSERT INTO meta (k, v) VALUES ('replay_from_seq', ?1) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            params![from.to_string()],
        )?;
    }
    Ok(())
}

struct Writer {
    conn: Connection,
    dict: FastMap<String, i64>,
    last_hash: [u8; 32],
    /// The chain head before the batch being written, restored when it fails.
    saved_hash: [u8; 32],
    /// Open holds and recent entries: where the next start may begin replaying (none
    /// while a start lands a spool: the stored start stays before it).
    marks: Option<ReplayMarks>,
    marked_at: Instant,
    /// Ends the WAL flusher when the writer ends.
    wal_flusher: Option<WalFlusher>,
    /// The idempotency keys the store has, which each batch adds to before its commit.
    keys: Option<Arc<IdempotencyKeys>>,
    /// The data directory's lock, released when the writer ends.
    _lock: Option<std::fs::File>,
}

/// How often the WAL's written pages are flushed to disk ahead of checkpoints.
const WAL_FLUSH_EVERY: Duration = Duration::from_millis(20);

/// Flushes the WAL file to disk on a thread of its own, every [`WAL_FLUSH_EVERY`].
///
/// With `synchronous = NORMAL`, SQLite syncs the WAL before each automatic checkpoint
/// (every 1,000 pages), inside a commit: the writer, and every caller waiting on it,
/// stalled for the whole WAL written since the last one (~11 ms a checkpoint, many a
/// second under load: the HTTP p99). Flushed ahead, that sync finds little left to
/// write. This adds no durability and removes none: commits never wait for it.
struct WalFlusher {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl WalFlusher {
    fn start(db: &Path) -> Result<Self, StoreError> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (done, mut wal) = (stop.clone(), db.as_os_str().to_owned());
        wal.push("-wal");
        std::thread::Builder::new()
            .name("bursar-wal-flush".into())
            .spawn(move || {
                let mut file: Option<std::fs::File> = None;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(WAL_FLUSH_EVERY);
                    // The WAL exists from the first write on, and stays while the
                    // writer's connection is open.
                    if file.is_none() {
                        file = std::fs::File::open(&wal).ok();
                    }
                    if let Some(f) = &file {
                        if f.sync_data().is_err() {
                            file = None;
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(WalFlusher { stop })
    }
}

impl Drop for WalFlusher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Backend for Writer {
    fn write(&mut self, batch: &[Command]) -> Result<(), StoreError> {
        self.saved_hash = self.last_hash;
        self.write_batch(batch)
    }

    fn forget(&mut self) {
        self.last_hash = self.saved_hash;
        // Interned texts of the failed transaction were rolled back too. (The replay
        // marks it noted are noted again, the same, when the batch is written again.)
        self.dict.clear();
        let _ = self.load_dict();
    }

    fn idle(&mut self) -> Result<(), StoreError> {
        store_replay_start(&mut self.marks, &self.conn)
    }

    fn close(&mut self) {
        if let Err(e) = store_replay_start(&mut self.marks, &self.conn) {
            tracing::warn!(error = %e, "the replay start was not stored; the next start replays more");
        }
    }

    fn identity(&mut self) -> Result<String, StoreError> {
        store_identity(&self.conn)
    }

    fn spool_landed(&mut self, spool: Uuid) -> Result<u64, StoreError> {
        let landed: Option<String> = self
            .conn
            .query_row(
                "SELECT v FROM meta WHERE k = ?1",
                params![spool_key(spool)],
                |r| r.get(0),
            )
            .optional()?;
        landed.map_or(Ok(0), |v| {
            v.parse()
                .map_err(|_| StoreError::Corrupt(format!("spool mark `{v}` is not a number")))
        })
    }

    fn hold_detail(&mut self, auth: Uuid) -> Result<Option<HoldDetail>, StoreError> {
        let detail: Option<Option<String>> = self
            .conn
            .query_row(
                "SELECT detail FROM ledger WHERE auth = ?1 AND kind = ?2",
                params![auth.as_bytes().as_slice(), EntryKind::Hold.code()],
                |r| r.get(0),
            )
            .optional()?;
        detail.flatten().map(|d| parse_detail(&d)).transpose()
    }
}

/// The (time, tenant, idempotency key) of every hold a command appends.
fn idempotency_keys(cmd: &Command) -> impl Iterator<Item = (i64, &str, &str)> {
    let entries: &[Entry] = match cmd {
        Command::Append { entries, .. } => entries,
        _ => &[],
    };
    entries.iter().filter_map(|e| {
        let key = e.detail.as_ref()?.idempotency_key.as_deref()?;
        (e.kind == EntryKind::Hold).then_some((e.at_ms, &*e.tenant, key))
    })
}

/// The `meta` key of a spool's mark.
fn spool_key(spool: Uuid) -> String {
    format!("spool:{spool}")
}

impl Writer {
    /// A writer on `conn`, whose chain ends at `last_hash`, with the texts interned so far.
    fn new(
        conn: Connection,
        last_hash: [u8; 32],
        marks: Option<ReplayMarks>,
    ) -> Result<Writer, StoreError> {
        let mut writer = Writer {
            conn,
            dict: FastMap::default(),
            last_hash,
            saved_hash: last_hash,
            marks,
            marked_at: Instant::now(),
            wal_flusher: None,
            keys: None,
            _lock: None,
        };
        writer.load_dict()?;
        Ok(writer)
    }

    fn load_dict(&mut self) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare("SELECT id, text FROM dict")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (id, text) = row?;
            self.dict.insert(text, id);
        }
        Ok(())
    }

    fn intern(
        dict: &mut FastMap<String, i64>,
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

    fn write_batch(&mut self, batch: &[Command]) -> Result<(), StoreError> {
        if let Some(keys) = &self.keys {
            // Before the commit: a key is never in the store and not in the filter.
            keys.add(batch.iter().flat_map(idempotency_keys));
        }
        let tx = self.conn.transaction()?;
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
                        for e in entries.iter() {
                            let detail = e.detail_text();
                            let hash = e.chain_hash_with_detail(&self.last_hash, detail.as_deref());
                            let tenant = Self::intern(&mut self.dict, &tx, Some(&e.tenant))?;
                            let model_req =
                                Self::intern(&mut self.dict, &tx, e.model_requested.as_deref())?;
                            let model_used =
                                Self::intern(&mut self.dict, &tx, e.model_used.as_deref())?;
                            let price =
                                Self::intern(&mut self.dict, &tx, e.price_version.as_deref())?;
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
                            if let Some(m) = &mut self.marks {
                                m.note(tx.last_insert_rowid(), e.at_ms, e.kind, e.authorization);
                            }
                        }
                        for a in alerts.iter() {
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
                    Command::SpoolMark { spool, through } => {
                        // Every batch carries its journal's mark: prepared once.
                        tx.prepare_cached(
                            "INSERT INTO meta (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                        )?
                        .execute(params![spool_key(*spool), through.to_string()])?;
                    }
                    Command::ForgetMark { spool } => {
                        tx.execute("DELETE FROM meta WHERE k = ?1", params![spool_key(*spool)])?;
                    }
                    Command::Barrier { .. } | Command::Retire { .. } => {}
                }
            }
            let mut upsert = tx.prepare_cached(
                "INSERT INTO counters (bucket, held, spent) VALUES (?1, ?2, ?3) ON CONFLICT (bucket) DO UPDATE SET held = held + excluded.held, spent = spent + excluded.spent",
            )?;
            for (bucket, d) in &counter_deltas(batch) {
                upsert.execute(params![bucket.to_string(), d.held.nanos(), d.spent.nanos()])?;
            }
        }
        if self.marked_at.elapsed() >= REPLAY_MARK_EVERY {
            self.marked_at = Instant::now();
            store_replay_start(&mut self.marks, &tx)?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// A ledger row as read: columns in the order of `ledger`'s, the texts (tenant, models,
/// price version) at 4 and 9–11 through `text` (joined in, or looked up by id).
fn stored_row(
    r: &rusqlite::Row<'_>,
    text: impl Fn(usize) -> rusqlite::Result<Option<String>>,
) -> rusqlite::Result<StoredRow> {
    let auth: Vec<u8> = r.get(3)?;
    let key_id: Option<Vec<u8>> = r.get(5)?;
    Ok(StoredRow {
        seq: r.get(0)?,
        at_ms: r.get(1)?,
        kind: r.get(2)?,
        auth: Uuid::from_slice(&auth).unwrap_or_default(),
        tenant: text(4)?,
        key_id: key_id.and_then(|k| Uuid::from_slice(&k).ok()),
        held: r.get(6)?,
        cost: r.get(7)?,
        charge: r.get(8)?,
        model_requested: text(9)?,
        model_used: text(10)?,
        price_version: text(11)?,
        input_tokens: r.get(12)?,
        cached_input_tokens: r.get(13)?,
        output_tokens: r.get(14)?,
        quantity: r.get(15)?,
        latency_ms: r.get(16)?,
        flags: r.get(17)?,
        detail: r.get(18)?,
        hash: r.get(19)?,
    })
}

/// Reads the ledger in order from entry `from` (whose previous entry's hash is
/// `anchor`), checking the chain, and hands each entry to `visit` (and to `marks`).
/// Returns the number of entries, the last hash and the chain's problems. Call it inside
/// a read transaction: the texts and the rows must come from one snapshot.
fn read_ledger(
    conn: &Connection,
    from: i64,
    anchor: [u8; 32],
    visit: &mut dyn FnMut(Entry),
    mut marks: Option<&mut ReplayMarks>,
) -> Result<(usize, [u8; 32], Vec<String>), StoreError> {
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
        "SELECT seq, at_ms, kind, auth, tenant, key_id, held, cost, charge, model_req, model_used, price_version, in_tok, cached_tok, out_tok, quantity, latency_ms, flags, detail, hash FROM ledger WHERE seq >= ?1 ORDER BY seq",
    )?;
    let mut rows = stmt.query(params![from])?;
    let mut chain = ChainReader::starting_at(from, anchor);
    while let Some(r) = rows.next()? {
        let row = stored_row(r, |i| Ok(text(r.get(i)?)))?;
        let seq = row.seq;
        if let Some(e) = chain.push(row) {
            if let Some(m) = marks.as_deref_mut() {
                m.note(seq, e.at_ms, e.kind, e.authorization);
            }
            visit(e);
        }
    }
    Ok(chain.finish())
}

fn read_catalog(conn: &Connection, on_row: &mut dyn FnMut(CatalogRow)) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("SELECT kind, id, body FROM catalog")?;
    let rows = stmt.query_map([], |r| {
        Ok(CatalogRow {
            kind: r.get(0)?,
            id: r.get(1)?,
            body: Some(r.get(2)?),
        })
    })?;
    for row in rows {
        on_row(row?);
    }
    Ok(())
}

fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Io(format!("no ledger at {}", path.display())));
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.execute_batch("PRAGMA busy_timeout = 5000;")?;
    Ok(conn)
}

/// Recomputes the hash chain and rebuilds every counter from the entries, and compares
/// them with the stored counters. Opens the file read-only; safe while a server runs.
pub fn verify(path: &Path) -> Result<Verification, StoreError> {
    let conn = open_read_only(path)?;
    conn.execute_batch("BEGIN")?;
    let mut verifier = Verifier::default();
    let (entries, _, problems) =
        read_ledger(&conn, 1, GENESIS_HASH, &mut |e| verifier.apply(&e), None)?;
    let stored = stored_counters(&conn)?;
    conn.execute_batch("COMMIT")?;
    Ok(verifier.finish(entries, problems, &stored))
}

/// Every entry of the ledger in order, read-only (audits, tests, exports).
pub fn read_entries(path: &Path) -> Result<LedgerReport, StoreError> {
    let conn = open_read_only(path)?;
    let mut entries = Vec::new();
    // One read transaction: the texts and the rows from one snapshot (a row written
    // between two would name texts the first did not have, and not verify).
    conn.execute_batch("BEGIN")?;
    let (_, last_hash, chain_problems) =
        read_ledger(&conn, 1, GENESIS_HASH, &mut |e| entries.push(e), None)?;
    conn.execute_batch("COMMIT")?;
    Ok(LedgerReport {
        entries,
        last_hash,
        chain_problems,
    })
}

/// The counters table as stored.
pub fn stored_counters(conn: &Connection) -> Result<HashMap<BucketKey, Counter>, StoreError> {
    let mut stmt = conn.prepare("SELECT bucket, held, spent FROM counters")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    parse_counters(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Read-only queries for reports (see [`crate::Reader`]).
pub struct Reader {
    conn: parking_lot::Mutex<Connection>,
    /// With the store's writer in this process: the keys its holds may carry.
    keys: Option<Arc<IdempotencyKeys>>,
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
            keys: None,
        })
    }

    /// Answers "no hold" without a query for a key `keys` certainly lacks.
    fn with_keys(mut self, keys: Arc<IdempotencyKeys>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// How many idempotency keys of the window its filter keeps (with the store's
    /// writer in this process).
    pub fn idempotency_keys_remembered(&self) -> Option<usize> {
        self.keys.as_ref().map(|k| k.len())
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

    /// The first hold a tenant made with an idempotency key at or after `since_ms` (the
    /// start of the idempotency window), if any.
    pub fn hold_by_idempotency_key(
        &self,
        tenant: &str,
        key: &str,
        since_ms: i64,
    ) -> Result<Option<StoredHold>, StoreError> {
        if self
            .keys
            .as_ref()
            .is_some_and(|k| !k.may_have(tenant, key, since_ms))
        {
            return Ok(None);
        }
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(HOLD_BY_IDEMPOTENCY_KEY)?;
        let mut rows = stmt.query(params![tenant, key, since_ms])?;
        let Some(r) = rows.next()? else {
            return Ok(None);
        };
        let auth: Vec<u8> = r.get(0)?;
        let detail: String = r.get(4)?;
        let detail = parse_detail(&detail)?;
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

    /// The rows of one of a tenant's authorizations, in order, texts joined in.
    pub fn authorization_rows(
        &self,
        auth: Uuid,
        tenant: &str,
    ) -> Result<Vec<StoredRow>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT l.seq, l.at_ms, l.kind, l.auth, t.text, l.key_id, l.held, l.cost, l.charge, mr.text, mu.text, pv.text,
                    l.in_tok, l.cached_tok, l.out_tok, l.quantity, l.latency_ms, l.flags, l.detail, l.hash
             FROM ledger l JOIN dict t ON t.id = l.tenant
             LEFT JOIN dict mr ON mr.id = l.model_req LEFT JOIN dict mu ON mu.id = l.model_used
             LEFT JOIN dict pv ON pv.id = l.price_version
             WHERE l.auth = ?1 AND t.text = ?2 ORDER BY l.seq",
        )?;
        let rows = stmt.query_map(params![auth.as_bytes().as_slice(), tenant], |r| {
            stored_row(r, |i| r.get(i))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Entries of one authorization, in order: (seq, kind code, held, cost).
    pub fn entries_of(&self, auth: Uuid) -> Result<Vec<(i64, i64, i64, i64)>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, kind, held, cost FROM ledger WHERE auth = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![auth.as_bytes().as_slice()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
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
