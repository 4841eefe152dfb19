//! The PostgreSQL store: the system of record when several Bursar instances run.
//!
//! The schema is the embedded store's (see `migrations/postgres`), applied by
//! `bursar migrate` or on start when asked; a database that is behind is refused.
//!
//! Writing: each instance has one writer thread (shared loop, see the crate
//! documentation) with its own connection. A batch is one transaction: first what only
//! this instance touches (its counter rows, per bucket and instance, and the open-holds
//! rows, in one statement), then the chain head's row lock (`SELECT … FOR UPDATE`), so
//! the batches of every instance form one total order and one hash chain, and the
//! entries and the new head in one statement. The commit does not wait for the WAL
//! flush (the lock is released at once); the flush follows in the same round trip, and
//! only then are the batch's callers answered. The lock is held for one batch's three
//! round trips, not one request, so instances contend once per commit, briefly.
//!
//! Several instances share one database (ARCHITECTURE.md, "Several instances"): each
//! registers in `instances` and holds a session advisory lock on its id while it lives;
//! its counter rows are also its use for the leases; its writer records open holds and
//! announces catalog changes; [`Shared`] grants and takes back leases, claims holds
//! before they are finished, and closes instances that died.
//!
//! A lost connection (PostgreSQL restarted, the backend terminated) is not the end: the
//! writer reconnects at once, asks whether the failed batch's last entry is in the
//! ledger with the hash it computed (the commit may have landed before the connection
//! died), and if not writes the batch again. A store that stays away fails the write;
//! the writer loop (`crate::run_writer`) then fails closed and tries again, with the
//! same check, until the store returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bursar_core::budget::{BucketKey, Counter};
use bursar_core::engine::LeaseWant;
use bursar_core::ledger::{Entry, EntryKind, HoldDetail, GENESIS_HASH};
use bursar_core::pricebook::TokenUsage;
use bursar_core::Money;
use futures_util::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;

use crate::spool::{InDoubt, SpoolConfig};
use crate::{
    counter_deltas, from_i64, parse_counters, parse_detail, spawn_writer, to_i64, AlertRow,
    Backend, CatalogRow, ChainReader, Command, LedgerReport, OpenOptions, Opened, SettleRow,
    StoreError, StoredHold, StoredRow, UsageRow, Verification, Verifier, MAX_BATCH_COMMANDS,
    MAX_QUEUED_COMMANDS,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long a connection attempt may take before the store counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections of the read pool (reports, idempotency look-ups, settles of old ids).
const READ_POOL_SIZE: u32 = 8;
/// The URL with any password replaced, for logs and messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "postgres://(unparsable url)".into(),
    }
}

fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    url.parse::<PgConnectOptions>()
        .map_err(|e| StoreError::Database(format!("bad database URL {}: {e}", redact(url))))
}

async fn pool(url: &str, size: u32) -> Result<PgPool, StoreError> {
    pool_with(url, size, connect_options(url)?).await
}

async fn pool_with(url: &str, size: u32, options: PgConnectOptions) -> Result<PgPool, StoreError> {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|e| StoreError::Unavailable(format!("PostgreSQL at {}: {e}", redact(url))))
}

/// Applies the pending migrations; returns how many ran. Safe to run from several
/// instances at once (the migrator takes an advisory lock).
pub async fn migrate(url: &str) -> Result<usize, StoreError> {
    let pool = pool(url, 1).await?;
    let before = applied_versions(&pool).await?.len();
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|e| StoreError::Schema(e.to_string()))?;
    let after = applied_versions(&pool).await?.len();
    pool.close().await;
    Ok(after.saturating_sub(before))
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, StoreError> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    Ok(
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await?,
    )
}

/// Refuses a database whose schema is not the one this build knows.
async fn check_schema(pool: &PgPool) -> Result<(), StoreError> {
    let applied = applied_versions(pool).await?;
    let known: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    if let Some(v) = applied.iter().find(|v| !known.contains(v)) {
        return Err(StoreError::Schema(format!(
            "the database has migration {v}, which this Bursar does not know: it was migrated by a newer version"
        )));
    }
    let pending: Vec<String> = known
        .iter()
        .filter(|v| !applied.contains(v))
        .map(|v| v.to_string())
        .collect();
    if !pending.is_empty() {
        return Err(StoreError::Schema(format!(
            "migrations {} are not applied; run `bursar migrate --database-url …` (or start with --migrate)",
            pending.join(", ")
        )));
    }
    Ok(())
}

/// Opens the store: checks (or applies) the schema, streams the ledger to `on_entry`
/// in order, and starts the writer thread.
pub async fn open<E: FnMut(Entry), C: FnMut(CatalogRow), K: FnOnce(HashMap<BucketKey, Counter>)>(
    url: &str,
    options: OpenOptions,
    mut recovery: crate::Recovery<E, C, K>,
) -> Result<Opened, StoreError> {
    if options.migrate {
        let n = migrate(url).await?;
        if n > 0 {
            tracing::info!(migrations = n, "applied database migrations");
        }
    }
    // Claims, grants and give-backs commit without waiting for their WAL flush: each
    // matters only through ledger entries committed after it (a settle after its
    // claim, a hold after its grant), and the writer flushes before anyone is answered,
    // which makes everything before in the WAL durable too.
    let pool = pool_with(
        url,
        READ_POOL_SIZE,
        connect_options(url)?.options([("synchronous_commit", "off")]),
    )
    .await?;
    check_schema(&pool).await?;
    // This process is a new instance: registered, and its lock taken, before anything.
    let instance = Uuid::now_v7();
    let (rt, conn) = writer_connection(url, instance).await?;
    let registered = async {
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL synchronous_commit = on")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO instances (id, started_at_ms) VALUES ($1, $2)")
            .bind(instance)
            .bind(chrono::Utc::now().timestamp_millis())
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = registered {
        drop(conn);
        rt.shutdown_background();
        return Err(e.into());
    }
    let writer = Writer {
        url: url.to_string(),
        instance,
        rt,
        conn: Some(conn),
        dict: HashMap::new(),
        unlanded: None,
    };
    // What an earlier run of this data directory kept in its spool lands first (on the
    // writer's own runtime, so off this one): the replay then reads it like the rest.
    let (dir, durability) = (options.spool_dir.clone(), options.durability);
    let landing = tokio::task::spawn_blocking(move || {
        let mut writer = writer;
        let Some(dir) = dir else {
            return (writer, Ok(None));
        };
        let landed = writer.identity().and_then(|store| {
            let config = SpoolConfig {
                dir,
                store,
                durability,
            };
            crate::spool::land_left_spools(&config, &mut writer)?;
            Ok(Some(config))
        });
        (writer, landed)
    })
    .await;
    let (writer, spool) = match landing {
        Ok((writer, Ok(spool))) => (writer, spool),
        Ok((writer, Err(e))) => {
            // A runtime may not be dropped inside another; this one has nothing running.
            writer.rt.shutdown_background();
            return Err(e);
        }
        Err(e) => return Err(StoreError::Io(format!("landing the spool: {e}"))),
    };
    let replayed = replay(
        &pool,
        &mut recovery.on_entry,
        &mut recovery.on_catalog,
        recovery.on_counters,
    )
    .await;
    let (entries, tail) = match replayed {
        Ok(found) => found,
        Err(e) => {
            writer.rt.shutdown_background();
            return Err(e);
        }
    };
    let (handle, join) = spawn_writer(writer, spool, None)?;
    Ok(Opened {
        handle,
        shared: Some({
            let (claims, requests) = tokio::sync::mpsc::channel(MAX_QUEUED_COMMANDS);
            tokio::spawn(claim_in_groups(pool.clone(), instance, requests));
            Shared {
                pool: pool.clone(),
                instance,
                claims,
                suspects: Default::default(),
                claims_swept_ms: Default::default(),
            }
        }),
        chain: if tail {
            check_in_background(url.to_string())
        } else {
            crate::ChainCheck::verified()
        },
        reader: crate::Reader::Postgres(Reader { pool }),
        entries,
        writer: join,
    })
}

/// Streams the ledger to `on_entry` and the catalog to `on_catalog`, from one snapshot.
/// Where a start begins replaying, and the hash of the entry before it: the hold entry
/// of the oldest hold still open (`open_holds`, every instance's), or the first entry of
/// the ten minutes of entry time before the newest entry ([`crate::RECENT_REPLAY_MS`]),
/// whichever is earlier; the whole ledger when that is its start.
async fn replay_start(conn: &mut PgConnection) -> Result<(i64, [u8; 32]), StoreError> {
    let whole = (1, GENESIS_HASH);
    let newest: Option<(i64, i64)> =
        sqlx::query_as("SELECT seq, at_ms FROM ledger ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let Some((head, newest_ms)) = newest else {
        return Ok(whole);
    };
    let old: Option<i64> =
        sqlx::query_scalar("SELECT seq FROM ledger WHERE at_ms < $1 ORDER BY seq DESC LIMIT 1")
            .bind(newest_ms - crate::RECENT_REPLAY_MS)
            .fetch_optional(&mut *conn)
            .await?;
    let open: Option<i64> = sqlx::query_scalar(
        "SELECT MIN(l.seq) FROM open_holds o JOIN ledger l ON l.auth = o.auth AND l.kind = 1",
    )
    .fetch_one(&mut *conn)
    .await?;
    let from = old
        .map_or(1, |s| s + 1)
        .min(open.unwrap_or(head + 1))
        .max(1);
    if from == 1 {
        return Ok(whole);
    }
    let anchor: Option<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM ledger WHERE seq = $1")
        .bind(from - 1)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match anchor.and_then(|h| <[u8; 32]>::try_from(h).ok()) {
        Some(h) => (from, h),
        None => whole,
    })
}

/// Streams the ledger's tail (or all of it) and the catalog to recovery from one
/// snapshot; returns the entries replayed and whether only a tail was.
async fn replay<K: FnOnce(HashMap<BucketKey, Counter>)>(
    pool: &PgPool,
    on_entry: &mut dyn FnMut(Entry),
    on_catalog: &mut dyn FnMut(CatalogRow),
    on_counters: K,
) -> Result<(usize, bool), StoreError> {
    let mut tx = snapshot(pool).await?;
    let (from, anchor) = replay_start(&mut tx).await?;
    if from > 1 {
        on_counters(stored_counters(&mut tx).await?);
    }
    let (entries, _, problems) = read_ledger(&mut tx, from, anchor, on_entry).await?;
    if let Some(p) = problems.first() {
        return Err(StoreError::Corrupt(format!(
            "the ledger does not verify: {p}; run `bursar ledger verify` for details"
        )));
    }
    {
        let mut rows = sqlx::query("SELECT kind, id, body FROM catalog").fetch(&mut *tx);
        while let Some(r) = rows.try_next().await? {
            on_catalog(CatalogRow {
                kind: r.try_get(0)?,
                id: r.try_get(1)?,
                body: Some(r.try_get(2)?),
            });
        }
    }
    tx.commit().await?;
    Ok((entries, from > 1))
}

/// Checks the whole ledger (chain and counters, as `bursar ledger verify`) in the
/// background, on a snapshot, while the instance runs.
fn check_in_background(url: String) -> Arc<crate::ChainCheck> {
    let chain = Arc::new(crate::ChainCheck::default());
    let check = chain.clone();
    // On a thread and runtime of its own: it reads the whole ledger.
    let spawned = std::thread::Builder::new()
        .name("bursar-ledger-check".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let found = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError::Io(e.to_string()))
                .and_then(|rt| rt.block_on(verify(&url)));
            check.report(found, started);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "the ledger check could not start; run `bursar ledger verify`");
    }
    chain
}

/// Connects the writer on a runtime of its own (the writer thread's), from a thread of
/// its own: a runtime cannot be started from inside the caller's.
async fn writer_connection(
    url: &str,
    instance: Uuid,
) -> Result<(tokio::runtime::Runtime, PgConnection), StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let url = url.to_string();
    std::thread::Builder::new()
        .name("bursar-ledger-connect".into())
        .spawn(move || {
            let made = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError::Io(e.to_string()))
                .and_then(|rt| {
                    let conn = rt.block_on(connect_writer(&url, instance))?;
                    Ok((rt, conn))
                });
            let _ = tx.send(made);
        })
        .map_err(|e| StoreError::Io(e.to_string()))?;
    rx.await
        .unwrap_or_else(|_| Err(StoreError::Io("the connecting thread stopped".into())))
}

/// A read-only transaction over one consistent snapshot.
async fn snapshot(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

async fn load_dict(conn: &mut PgConnection) -> Result<HashMap<i64, String>, StoreError> {
    let rows = sqlx::query("SELECT id, text FROM dict")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// A ledger row (columns in the order of the `ledger` table); `text` reads the interned
/// texts (tenant, models, price version) of a column, as ids or as joined texts.
/// Ledger rows with their texts joined in place of their ids, so a few rows need no
/// dictionary (read with [`stored_row`]); a macro, so queries stay literal strings.
macro_rules! rows_with_texts {
    () => {
        "SELECT l.seq, l.at_ms, l.kind, l.auth, t.text, l.key_id, l.held, l.cost, l.charge, mr.text, mu.text, pv.text,
        l.in_tok, l.cached_tok, l.out_tok, l.quantity, l.latency_ms, l.flags, l.detail, l.hash
    FROM ledger l JOIN dict t ON t.id = l.tenant
    LEFT JOIN dict mr ON mr.id = l.model_req LEFT JOIN dict mu ON mu.id = l.model_used
    LEFT JOIN dict pv ON pv.id = l.price_version"
    };
}

fn stored_row(
    r: &PgRow,
    text: impl Fn(usize) -> Result<Option<String>, sqlx::Error>,
) -> Result<StoredRow, sqlx::Error> {
    Ok(StoredRow {
        seq: r.try_get(0)?,
        at_ms: r.try_get(1)?,
        kind: i64::from(r.try_get::<i16, _>(2)?),
        auth: r.try_get(3)?,
        tenant: text(4)?,
        key_id: r.try_get(5)?,
        held: r.try_get(6)?,
        cost: r.try_get(7)?,
        charge: r.try_get(8)?,
        model_requested: text(9)?,
        model_used: text(10)?,
        price_version: text(11)?,
        input_tokens: r.try_get(12)?,
        cached_input_tokens: r.try_get(13)?,
        output_tokens: r.try_get(14)?,
        quantity: r.try_get(15)?,
        latency_ms: r.try_get(16)?,
        flags: r.try_get::<i32, _>(17)? as u32,
        detail: r.try_get(18)?,
        hash: r.try_get(19)?,
    })
}

/// Streams the ledger in order through the chain check to `visit`.
async fn read_ledger(
    conn: &mut PgConnection,
    from: i64,
    anchor: [u8; 32],
    visit: &mut dyn FnMut(Entry),
) -> Result<(usize, [u8; 32], Vec<String>), StoreError> {
    let dict = load_dict(conn).await?;
    let mut chain = ChainReader::starting_at(from, anchor);
    let mut rows = sqlx::query(
        "SELECT seq, at_ms, kind, auth, tenant, key_id, held, cost, charge, model_req, model_used, price_version, in_tok, cached_tok, out_tok, quantity, latency_ms, flags, detail, hash FROM ledger WHERE seq >= $1 ORDER BY seq",
    )
    .bind(from)
    .fetch(&mut *conn);
    while let Some(r) = rows.try_next().await? {
        let text = |i: usize| -> Result<Option<String>, sqlx::Error> {
            Ok(r.try_get::<Option<i64>, _>(i)?
                .and_then(|id| dict.get(&id).cloned()))
        };
        if let Some(e) = chain.push(stored_row(&r, text)?) {
            visit(e);
        }
    }
    Ok(chain.finish())
}

async fn stored_counters(
    conn: &mut PgConnection,
) -> Result<HashMap<BucketKey, Counter>, StoreError> {
    let rows = sqlx::query(
        "SELECT bucket, SUM(held)::bigint, SUM(spent)::bigint FROM counters GROUP BY bucket",
    )
    .fetch_all(&mut *conn)
    .await?;
    let rows = rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    parse_counters(rows)
}

/// Recomputes the chain and the counters from one snapshot; safe while servers write.
pub async fn verify(url: &str) -> Result<Verification, StoreError> {
    let pool = pool(url, 1).await?;
    check_schema(&pool).await?;
    let mut tx = snapshot(&pool).await?;
    let mut verifier = Verifier::default();
    let (entries, _, problems) =
        read_ledger(&mut tx, 1, GENESIS_HASH, &mut |e| verifier.apply(&e)).await?;
    let stored = stored_counters(&mut tx).await?;
    tx.commit().await?;
    pool.close().await;
    Ok(verifier.finish(entries, problems, &stored))
}

/// Every entry of the ledger in order, from one snapshot.
pub async fn read_entries(url: &str) -> Result<LedgerReport, StoreError> {
    let pool = pool(url, 1).await?;
    check_schema(&pool).await?;
    let mut tx = snapshot(&pool).await?;
    let mut entries = Vec::new();
    let (_, last_hash, chain_problems) =
        read_ledger(&mut tx, 1, GENESIS_HASH, &mut |e| entries.push(e)).await?;
    tx.commit().await?;
    pool.close().await;
    Ok(LedgerReport {
        entries,
        last_hash,
        chain_problems,
    })
}

/// The writer's side: one connection, a runtime of its own (it runs on the writer
/// thread), and the texts it has interned.
struct Writer {
    url: String,
    instance: Uuid,
    rt: tokio::runtime::Runtime,
    conn: Option<PgConnection>,
    dict: HashMap<String, i64>,
    /// Where the last failed attempt would have put the chain, had it committed.
    unlanded: ChainMark,
}

impl Writer {
    /// Runs `query` on the writer's connection (made again if it was lost); an error
    /// drops the connection, so the next use makes a new one.
    fn on_connection<T>(
        &mut self,
        query: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, StoreError> {
        let Writer {
            url,
            instance,
            rt,
            conn,
            ..
        } = self;
        rt.block_on(async {
            let c = connection(url, *instance, conn).await?;
            let answer = query(c).await;
            if answer.is_err() {
                *conn = None;
            }
            Ok(answer?)
        })
    }
}

/// Where a batch put the chain: its last entry's sequence number and hash.
type ChainMark = Option<(i64, [u8; 32])>;

impl Backend for Writer {
    fn write(&mut self, batch: &[Command]) -> Result<(), StoreError> {
        let Writer {
            url,
            instance,
            rt,
            conn,
            dict,
            unlanded,
        } = self;
        let instance = *instance;
        rt.block_on(async {
            // Twice: a connection that was killed is replaced at once, without failing
            // anyone; a store that is away fails this write, and the writer loop tries
            // again later.
            let mut last = None;
            for _ in 0..2 {
                let c = match connection(url, instance, conn).await {
                    Ok(c) => c,
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                };
                // The last attempt at this batch may have committed before its
                // connection went: then it is not written twice.
                if let Some((seq, hash)) = *unlanded {
                    let stored: Result<Option<Vec<u8>>, sqlx::Error> =
                        sqlx::query_scalar("SELECT hash FROM ledger WHERE seq = $1")
                            .bind(seq)
                            .fetch_optional(&mut *c)
                            .await;
                    match stored {
                        Ok(h) if h.as_deref() == Some(hash.as_slice()) => {
                            tracing::info!(seq, "the failed batch had been committed");
                            // Its spool mark, if it has one, is written now.
                            if let Err(e) = write_spool_marks(c, batch).await {
                                *conn = None;
                                dict.clear();
                                last = Some(e);
                                continue;
                            }
                            *unlanded = None;
                            return Ok(());
                        }
                        Ok(_) => *unlanded = None,
                        Err(e) => {
                            *conn = None;
                            dict.clear();
                            last = Some(e.into());
                            continue;
                        }
                    }
                }
                let mut mark: ChainMark = None;
                match write_batch(c, instance, batch, dict, &mut mark).await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        // The connection may be gone, and the commit may have landed
                        // before it went.
                        *conn = None;
                        dict.clear();
                        *unlanded = mark;
                        if !e.is_transient() {
                            return Err(e);
                        }
                        tracing::warn!(error = %e, "ledger batch failed; checking it and writing it again on a new connection");
                        last = Some(e);
                    }
                }
            }
            Err(last.unwrap_or_else(|| StoreError::Unavailable("no connection".into())))
        })
    }

    fn forget(&mut self) {
        // `unlanded` stays: the next write is of the same batch.
        self.dict.clear();
        self.conn = None;
    }

    fn close(&mut self) {
        // A clean exit: this instance closes itself, so what it leased and did not use
        // goes back to the others now, not when they find it dead.
        let Writer {
            instance, rt, conn, ..
        } = self;
        let Some(c) = conn.as_mut() else { return };
        let closed = rt.block_on(async {
            let mut tx = c.begin().await?;
            sqlx::query("SELECT seq FROM chain_head FOR UPDATE")
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE instances SET closed = TRUE WHERE id = $1")
                .bind(*instance)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        });
        if let Err(e) = closed {
            tracing::warn!(error = %e, "closing this instance failed; the others will find it dead");
        }
    }

    fn idle(&mut self) -> Result<(), StoreError> {
        self.on_connection(async |c| sqlx::query("SELECT 1").execute(c).await.map(|_| ()))
    }

    fn identity(&mut self) -> Result<String, StoreError> {
        self.on_connection(async |c| {
            sqlx::query_scalar("SELECT id FROM store_identity")
                .fetch_one(c)
                .await
        })
    }

    fn spool_landed(&mut self, spool: Uuid) -> Result<u64, StoreError> {
        let landed: Option<i64> = self.on_connection(async |c| {
            sqlx::query_scalar("SELECT landed FROM spool_marks WHERE spool = $1")
                .bind(spool)
                .fetch_optional(c)
                .await
        })?;
        Ok(landed.map_or(0, from_i64))
    }

    fn hold_detail(&mut self, auth: Uuid) -> Result<Option<HoldDetail>, StoreError> {
        let detail: Option<Option<String>> = self.on_connection(async |c| {
            sqlx::query_scalar("SELECT detail FROM ledger WHERE auth = $1 AND kind = $2")
                .bind(auth)
                .bind(i16::try_from(EntryKind::Hold.code()).unwrap_or(i16::MAX))
                .fetch_optional(c)
                .await
        })?;
        detail.flatten().map(|d| parse_detail(&d)).transpose()
    }

    fn in_doubt(&self) -> Option<InDoubt> {
        self.unlanded.map(|(seq, hash)| InDoubt { seq, hash })
    }

    fn expect_in_doubt(&mut self, d: Option<InDoubt>) {
        self.unlanded = d.map(|d| (d.seq, d.hash));
    }
}

/// The spool marks of a batch whose entries had been committed (by an attempt whose
/// answer was lost), in a transaction of their own, durable before the batch counts
/// as landed.
async fn write_spool_marks(conn: &mut PgConnection, batch: &[Command]) -> Result<(), StoreError> {
    if !batch.iter().any(|c| matches!(c, Command::SpoolMark { .. })) {
        return Ok(());
    }
    sqlx::raw_sql("BEGIN").execute(&mut *conn).await?;
    for c in batch {
        if let Command::SpoolMark { spool, through } = c {
            mark_spool(conn, *spool, *through).await?;
        }
    }
    sqlx::raw_sql("SET LOCAL synchronous_commit = on; COMMIT")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn mark_spool(conn: &mut PgConnection, spool: Uuid, through: u64) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO spool_marks (spool, landed) VALUES ($1, $2)
         ON CONFLICT (spool) DO UPDATE SET landed = GREATEST(spool_marks.landed, EXCLUDED.landed)",
    )
    .bind(spool)
    .bind(to_i64(through))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The advisory lock key of an instance: it holds the lock on its own id while it lives.
fn instance_lock(id: Uuid) -> i64 {
    let b = id.as_bytes();
    i64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]])
}

/// A writer's connection: connected, and holding its instance's lock.
async fn connect_writer(url: &str, instance: Uuid) -> Result<PgConnection, StoreError> {
    // Batches commit without waiting for the WAL flush, then flush (`write_batch`).
    let mut c =
        PgConnection::connect_with(&connect_options(url)?.options([("synchronous_commit", "off")]))
            .await
            .map_err(|e| StoreError::Unavailable(format!("PostgreSQL at {}: {e}", redact(url))))?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(instance_lock(instance))
        .fetch_one(&mut c)
        .await?;
    if !locked {
        return Err(StoreError::Unavailable(format!(
            "the lock of instance {instance} is taken (another process probing it); try again"
        )));
    }
    Ok(c)
}

async fn connection<'a>(
    url: &str,
    instance: Uuid,
    conn: &'a mut Option<PgConnection>,
) -> Result<&'a mut PgConnection, StoreError> {
    if conn.is_none() {
        *conn = Some(connect_writer(url, instance).await?);
    }
    conn.as_mut()
        .ok_or_else(|| StoreError::Unavailable("no connection".into()))
}

async fn intern(
    conn: &mut PgConnection,
    dict: &mut HashMap<String, i64>,
    text: Option<&str>,
) -> Result<Option<i64>, StoreError> {
    let Some(text) = text else { return Ok(None) };
    if let Some(&id) = dict.get(text) {
        return Ok(Some(id));
    }
    // DO UPDATE (not DO NOTHING) so the id comes back whoever inserted the text first.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO dict (text) VALUES ($1) ON CONFLICT (text) DO UPDATE SET text = EXCLUDED.text RETURNING id",
    )
    .bind(text)
    .fetch_one(&mut *conn)
    .await?;
    dict.insert(text.to_string(), id);
    Ok(Some(id))
}

/// The columns of a batch's entries, for one multi-row insert.
#[derive(Default)]
struct Columns {
    seq: Vec<i64>,
    at_ms: Vec<i64>,
    kind: Vec<i16>,
    auth: Vec<Uuid>,
    tenant: Vec<Option<i64>>,
    key_id: Vec<Option<Uuid>>,
    held: Vec<i64>,
    cost: Vec<i64>,
    charge: Vec<i64>,
    model_req: Vec<Option<i64>>,
    model_used: Vec<Option<i64>>,
    price_version: Vec<Option<i64>>,
    in_tok: Vec<i64>,
    cached_tok: Vec<i64>,
    out_tok: Vec<i64>,
    quantity: Vec<i64>,
    latency_ms: Vec<Option<i64>>,
    flags: Vec<i32>,
    detail: Vec<Option<String>>,
    idem: Vec<Option<String>>,
    hash: Vec<Vec<u8>>,
}

async fn write_batch(
    conn: &mut PgConnection,
    instance: Uuid,
    batch: &[Command],
    dict: &mut HashMap<String, i64>,
    mark: &mut ChainMark,
) -> Result<(), StoreError> {
    // Begun and committed by hand, so the commit and the flush go in one round trip.
    // On an error the caller drops the connection, and the transaction with it.
    sqlx::raw_sql("BEGIN").execute(&mut *conn).await?;
    // First what no other instance's batch touches: texts, this instance's counter
    // rows, the open-holds rows of its holds, alerts, catalog rows. Only then the chain
    // head, whose lock every batch of every instance takes in turn: it is held for
    // three round trips, not for the whole batch.
    let mut cols = Columns::default();
    // Holds this batch opens and finishes, for `open_holds`.
    let (mut opened, mut claimed, mut finished) = (Vec::new(), Vec::new(), Vec::new());
    let mut entries = Vec::new();
    for cmd in batch {
        match cmd {
            Command::Append {
                entries: es,
                alerts,
                ..
            } => {
                for e in es.iter() {
                    cols.at_ms.push(e.at_ms);
                    cols.kind
                        .push(i16::try_from(e.kind.code()).unwrap_or(i16::MAX));
                    cols.auth.push(e.authorization);
                    cols.tenant.push(intern(conn, dict, Some(&e.tenant)).await?);
                    cols.key_id.push(e.key_id);
                    cols.held.push(e.held_delta.nanos());
                    cols.cost.push(e.cost_delta.nanos());
                    cols.charge.push(e.charge_delta.nanos());
                    cols.model_req
                        .push(intern(conn, dict, e.model_requested.as_deref()).await?);
                    cols.model_used
                        .push(intern(conn, dict, e.model_used.as_deref()).await?);
                    cols.price_version
                        .push(intern(conn, dict, e.price_version.as_deref()).await?);
                    cols.in_tok.push(to_i64(e.usage.input_tokens));
                    cols.cached_tok.push(to_i64(e.usage.cached_input_tokens));
                    cols.out_tok.push(to_i64(e.usage.output_tokens));
                    cols.quantity.push(to_i64(e.quantity));
                    cols.latency_ms.push(e.latency_ms.map(i64::from));
                    cols.flags.push(e.flags as i32);
                    cols.detail.push(e.detail_text());
                    cols.idem
                        .push(e.detail.as_ref().and_then(|d| d.idempotency_key.clone()));
                    match e.kind {
                        EntryKind::Hold => {
                            opened.push(e.authorization);
                            // A hold permitted failing open is this instance's to finish
                            // from the start (see `Engine::is_fail_open_hold`).
                            claimed.push(
                                (e.flags & bursar_core::ledger::flags::FAIL_OPEN != 0)
                                    .then_some(instance),
                            );
                        }
                        EntryKind::Settle | EntryKind::Void | EntryKind::Expire => {
                            finished.push(e.authorization);
                        }
                        EntryKind::Release | EntryKind::Adjustment => {}
                    }
                    entries.push(e);
                }
                for a in alerts.iter() {
                    sqlx::query(
                        "INSERT INTO alerts (at_ms, tenant, bucket, level, reason, limit_nanos, used_nanos) VALUES ($1, $2, $3, $4, $5, $6, $7)
                         ON CONFLICT (bucket, level) WHERE reason = 'threshold' DO NOTHING",
                    )
                    .bind(a.at_ms)
                    .bind(&a.tenant)
                    .bind(a.bucket.to_string())
                    .bind(a.level.as_str())
                    .bind(&a.reason)
                    .bind(a.limit.nanos())
                    .bind(a.used.nanos())
                    .execute(&mut *conn)
                    .await?;
                }
            }
            Command::Catalog { row, .. } => match &row.body {
                Some(body) => {
                    sqlx::query(
                        "INSERT INTO catalog (kind, id, body) VALUES ($1, $2, $3) ON CONFLICT (kind, id) DO UPDATE SET body = EXCLUDED.body",
                    )
                    .bind(&row.kind)
                    .bind(&row.id)
                    .bind(body)
                    .execute(&mut *conn)
                    .await?;
                }
                None => {
                    sqlx::query("DELETE FROM catalog WHERE kind = $1 AND id = $2")
                        .bind(&row.kind)
                        .bind(&row.id)
                        .execute(&mut *conn)
                        .await?;
                }
            },
            Command::SpoolMark { spool, through } => mark_spool(conn, *spool, *through).await?,
            Command::ForgetMark { spool } => {
                sqlx::query("DELETE FROM spool_marks WHERE spool = $1")
                    .bind(spool)
                    .execute(&mut *conn)
                    .await?;
            }
            Command::Barrier { .. } | Command::Retire { .. } => {}
        }
    }
    if !entries.is_empty() {
        // A hold opened and finished in this batch is never open after its commit (and
        // one statement's insert and delete would not see each other).
        let both: std::collections::HashSet<Uuid> = {
            let f: std::collections::HashSet<&Uuid> = finished.iter().collect();
            opened.iter().filter(|a| f.contains(a)).copied().collect()
        };
        let (mut open_auth, mut open_claim) = (Vec::new(), Vec::new());
        for (a, c) in opened.iter().zip(&claimed) {
            if !both.contains(a) {
                open_auth.push(*a);
                open_claim.push(*c);
            }
        }
        finished.retain(|a| !both.contains(a));
        let deltas = counter_deltas(batch);
        let mut buckets: Vec<(String, i64, i64)> = deltas
            .iter()
            .map(|(b, d)| (b.to_string(), d.held.nanos(), d.spent.nanos()))
            .collect();
        buckets.sort();
        let (names, (held, spent)): (Vec<String>, (Vec<i64>, Vec<i64>)) =
            buckets.into_iter().map(|(b, h, s)| (b, (h, s))).unzip();
        // This instance's counter rows (also its use, for the leases) and the open
        // holds, in one statement, in the same transaction as the entries.
        sqlx::query(
            "WITH c AS (
               INSERT INTO counters (bucket, instance, held, spent)
               SELECT b, $4, h, s FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) AS t(b, h, s)
               ON CONFLICT (bucket, instance) DO UPDATE
                 SET held = counters.held + EXCLUDED.held, spent = counters.spent + EXCLUDED.spent
             ), o AS (
               INSERT INTO open_holds (auth, claimed_by) SELECT * FROM UNNEST($5::uuid[], $6::uuid[])
               ON CONFLICT DO NOTHING
             ), f AS (
               DELETE FROM open_holds WHERE auth = ANY($7)
             )
             SELECT 1",
        )
        .bind(&names)
        .bind(&held)
        .bind(&spent)
        .bind(instance)
        .bind(&open_auth)
        .bind(&open_claim)
        .bind(&finished)
        .execute(&mut *conn)
        .await?;
    }
    // The chain head's lock orders this batch after every batch of every instance.
    let head = sqlx::query("SELECT seq, hash FROM chain_head FOR UPDATE")
        .fetch_one(&mut *conn)
        .await?;
    // An instance another one found dead (its lock free: a connection lost for long)
    // may not write: what it decided since may not be covered by its leases any more.
    // (Its own statement, so its snapshot is taken after the lock.)
    let closed: Option<bool> = sqlx::query_scalar("SELECT closed FROM instances WHERE id = $1")
        .bind(instance)
        .fetch_optional(&mut *conn)
        .await?;
    if closed != Some(false) {
        return Err(StoreError::Fenced(format!(
            "instance {instance} was closed by another instance; restart it"
        )));
    }
    let mut seq: i64 = head.try_get(0)?;
    let head_hash: Vec<u8> = head.try_get(1)?;
    let mut prev: [u8; 32] = head_hash
        .try_into()
        .map_err(|_| StoreError::Corrupt("the chain head's hash is not 32 bytes".into()))?;
    // `cols.detail` has one text per entry, in order: hashed as written.
    for (e, detail) in entries.iter().zip(&cols.detail) {
        let hash = e.chain_hash_with_detail(&prev, detail.as_deref());
        seq += 1;
        cols.seq.push(seq);
        cols.hash.push(hash.to_vec());
        prev = hash;
    }
    if !cols.seq.is_empty() {
        sqlx::query(
            "WITH l AS (
               INSERT INTO ledger (seq, at_ms, kind, auth, tenant, key_id, held, cost, charge, model_req, model_used, price_version, in_tok, cached_tok, out_tok, quantity, latency_ms, flags, detail, idem, hash)
               SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::smallint[], $4::uuid[], $5::bigint[], $6::uuid[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[], $17::bigint[], $18::int[], $19::text[], $20::text[], $21::bytea[])
             )
             UPDATE chain_head SET seq = $22, hash = $23",
        )
        .bind(&cols.seq)
        .bind(&cols.at_ms)
        .bind(&cols.kind)
        .bind(&cols.auth)
        .bind(&cols.tenant)
        .bind(&cols.key_id)
        .bind(&cols.held)
        .bind(&cols.cost)
        .bind(&cols.charge)
        .bind(&cols.model_req)
        .bind(&cols.model_used)
        .bind(&cols.price_version)
        .bind(&cols.in_tok)
        .bind(&cols.cached_tok)
        .bind(&cols.out_tok)
        .bind(&cols.quantity)
        .bind(&cols.latency_ms)
        .bind(&cols.flags)
        .bind(&cols.detail)
        .bind(&cols.idem)
        .bind(&cols.hash)
        .bind(seq)
        .bind(prev.as_slice())
        .execute(&mut *conn)
        .await?;
        *mark = Some((seq, prev));
    }
    if batch.iter().any(|c| matches!(c, Command::Catalog { .. })) {
        // The other instances read the catalog again when this commits.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CATALOG_CHANGED)
            .bind(instance.to_string())
            .execute(&mut *conn)
            .await?;
    }
    // The writer's connection commits without waiting for the WAL flush
    // (`synchronous_commit = off`, see `connect_writer`), so the chain head's lock is
    // not held through one: the next batch, of any instance, goes on at once.
    // Durable before acknowledged: then one implicit transaction with an id of its own,
    // committed synchronously, flushes the WAL up to its commit record, which lies after
    // this batch's. Instances flushing at once share flushes (PostgreSQL's group
    // commit). A batch whose flush was not confirmed is checked for (`unlanded`) like
    // any other failed batch.
    sqlx::raw_sql("COMMIT; SET LOCAL synchronous_commit = on; SELECT txid_current()")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// What several instances on one database need beyond the ledger: leases of the
/// shared budgets, claims of holds, and the liveness of the other instances.
#[derive(Clone)]
pub struct Shared {
    pool: PgPool,
    instance: Uuid,
    claims: tokio::sync::mpsc::Sender<ClaimRequest>,
    /// Other instances seen without their lock, and since when.
    suspects: std::sync::Arc<parking_lot::Mutex<HashMap<Uuid, std::time::Instant>>>,
    /// When old idempotency claims were last deleted (ms).
    claims_swept_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// How long an instance's lock must stay free before it is closed: longer than any
/// instance takes to reconnect after PostgreSQL restarts (its writer checks the store
/// every second), so only a dead one is.
pub const DEAD_AFTER: Duration = Duration::from_secs(10);

/// A claim on an idempotency key older than this, whose hold never appeared, belonged
/// to an instance that died deciding: another may take it over.
pub const IDEMPOTENCY_CLAIM_STALE: Duration = Duration::from_secs(60);

/// Holds to claim, and where the ones claimed go.
type ClaimRequest = (
    Vec<Uuid>,
    tokio::sync::oneshot::Sender<Result<Vec<Uuid>, StoreError>>,
);

/// Claims waiting together go to PostgreSQL in one statement, as commits do: under load
/// one round trip serves many settles.
async fn claim_in_groups(
    pool: PgPool,
    instance: Uuid,
    mut requests: tokio::sync::mpsc::Receiver<ClaimRequest>,
) {
    while let Some(first) = requests.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_BATCH_COMMANDS {
            match requests.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let ids: Vec<Uuid> = group
            .iter()
            .flat_map(|(ids, _)| ids.iter().copied())
            .collect();
        // A hold this instance claimed already is its own: the holds it permitted
        // failing open land from its spool claimed by it (after a restart its engine
        // no longer knows them as such), and its engine finishes a hold once anyway.
        let claimed: Result<Vec<Uuid>, StoreError> = sqlx::query_scalar(
            "UPDATE open_holds SET claimed_by = $2 WHERE auth = ANY($1)
               AND (claimed_by IS NULL OR claimed_by = $2
                    OR claimed_by IN (SELECT id FROM instances WHERE closed))
             RETURNING auth",
        )
        .bind(&ids)
        .bind(instance)
        .fetch_all(&pool)
        .await
        .map_err(StoreError::from);
        match claimed {
            Ok(claimed) => {
                // Each hold claimed goes to one asker only (two may ask for the same).
                let mut left: std::collections::HashSet<Uuid> = claimed.into_iter().collect();
                for (wanted, done) in group {
                    let mine = wanted.into_iter().filter(|id| left.remove(id)).collect();
                    let _ = done.send(Ok(mine));
                }
            }
            Err(e) => {
                for (_, done) in group {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The channel on which an instance short of a lease asks the others for their spare.
pub const LEASE_WANTED: &str = "bursar_lease_wanted";
/// The channel on which a catalog change is announced, with the writer's instance id.
pub const CATALOG_CHANGED: &str = "bursar_catalog";

/// What a lease request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub bucket: BucketKey,
    pub amount: Money,
    /// What the other live instances may still add to the bucket: their unused leases
    /// and their holds not yet committed. A short grant may be worth waiting for only
    /// when this is not zero.
    pub others_outstanding: Money,
}

/// The room a lease grant gives beyond the shortfall: this share of what is left, so
/// instances ask rarely far from the limit and exactly near it.
const LEASE_CHUNK_DIVISOR: i64 = 8;

impl Shared {
    /// This instance's id.
    pub fn instance(&self) -> Uuid {
        self.instance
    }

    /// Grants what it can of each want, in one transaction (buckets locked in order):
    /// at most the room left once the committed use of the bucket (and of a rolling
    /// window's earlier slices) and what every live instance may still add to it
    /// (`amount − used`) are counted.
    pub async fn grant(&self, wants: &[LeaseWant]) -> Result<Vec<Grant>, StoreError> {
        let mut sorted: Vec<&LeaseWant> = wants.iter().collect();
        sorted.sort_by_key(|w| w.bucket.to_string());
        let mut tx = self.pool.begin().await?;
        let mut granted = Vec::with_capacity(sorted.len());
        for w in sorted {
            let bucket = w.bucket.to_string();
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))")
                .bind(&bucket)
                .execute(&mut *tx)
                .await?;
            let mut counted: Vec<String> = w.prior.iter().map(|b| b.to_string()).collect();
            counted.push(bucket.clone());
            // One statement, so one snapshot: a batch committed between two reads would
            // otherwise move its amounts from "outstanding" to "committed" unseen.
            let row = sqlx::query(
                "SELECT
                   (SELECT COALESCE(SUM(held + spent), 0) FROM counters WHERE bucket = ANY($1))::bigint,
                   (SELECT COALESCE(SUM(GREATEST(l.amount - COALESCE(u.held + u.spent, 0), 0)), 0)
                      FROM leases l JOIN instances i ON i.id = l.instance
                      LEFT JOIN counters u ON u.bucket = l.bucket AND u.instance = l.instance
                     WHERE l.bucket = $2 AND NOT i.closed)::bigint,
                   (SELECT COALESCE(SUM(GREATEST(l.amount - COALESCE(u.held + u.spent, 0), 0)), 0)
                      FROM leases l JOIN instances i ON i.id = l.instance
                      LEFT JOIN counters u ON u.bucket = l.bucket AND u.instance = l.instance
                     WHERE l.bucket = $2 AND NOT i.closed AND l.instance <> $3)::bigint,
                   (SELECT SUM(held + spent) FROM counters WHERE bucket = $4)::bigint",
            )
            .bind(&counted)
            .bind(&bucket)
            .bind(self.instance)
            .bind(w.rollover_from.as_ref().map(|b| b.to_string()))
            .fetch_one(&mut *tx)
            .await?;
            let committed: i64 = row.try_get(0)?;
            let outstanding: i64 = row.try_get(1)?;
            let others: i64 = row.try_get(2)?;
            let prev_used: Option<i64> = row.try_get(3)?;
            let mut limit = w.limit;
            if let (Some(_), Some(u)) = (&w.rollover_from, prev_used) {
                limit += w
                    .limit
                    .saturating_sub(Money::from_nanos(u))
                    .max(Money::ZERO);
            }
            let limit = limit.mul_div_floor(i64::from(w.percent), 100);
            let available = limit
                .saturating_sub(Money::from_nanos(committed))
                .saturating_sub(Money::from_nanos(outstanding))
                .max(Money::ZERO);
            let extra = Money::from_nanos(
                available
                    .saturating_sub(w.shortfall)
                    .max(Money::ZERO)
                    .nanos()
                    / LEASE_CHUNK_DIVISOR,
            );
            let grant = (w.shortfall + extra).min(available);
            if grant > Money::ZERO {
                sqlx::query(
                    "INSERT INTO leases (bucket, instance, amount) VALUES ($1, $2, $3)
                     ON CONFLICT (bucket, instance) DO UPDATE SET amount = leases.amount + EXCLUDED.amount",
                )
                .bind(&bucket)
                .bind(self.instance)
                .bind(grant.nanos())
                .execute(&mut *tx)
                .await?;
            }
            granted.push(Grant {
                bucket: w.bucket.clone(),
                amount: grant,
                others_outstanding: Money::from_nanos(others),
            });
        }
        tx.commit().await?;
        Ok(granted)
    }

    /// Lowers this instance's leases by what it took back (it lowered its own
    /// allowance first), each under its bucket's lock, in the grants' order.
    pub async fn give_back(&self, spare: &[(BucketKey, Money)]) -> Result<(), StoreError> {
        if spare.is_empty() {
            return Ok(());
        }
        let mut sorted: Vec<(String, Money)> =
            spare.iter().map(|(b, m)| (b.to_string(), *m)).collect();
        sorted.sort();
        let mut tx = self.pool.begin().await?;
        for (bucket, amount) in &sorted {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))")
                .bind(bucket)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE leases SET amount = amount - $3 WHERE bucket = $1 AND instance = $2",
            )
            .bind(bucket)
            .bind(self.instance)
            .bind(amount.nanos())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Asks the other instances to give back what they do not use of these buckets.
    pub async fn ask_for_spare(&self, buckets: &[BucketKey]) -> Result<(), StoreError> {
        let list: Vec<String> = buckets.iter().map(|b| b.to_string()).collect();
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(LEASE_WANTED)
            .bind(list.join("\n"))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Listens to the other instances: [`LEASE_WANTED`] (the buckets they are short
    /// of, a line each) and [`CATALOG_CHANGED`] (the id of the instance that changed it).
    pub async fn listen(&self) -> Result<sqlx::postgres::PgListener, StoreError> {
        let mut l = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        l.listen_all([LEASE_WANTED, CATALOG_CHANGED]).await?;
        Ok(l)
    }

    /// The catalog as stored.
    pub async fn catalog(&self) -> Result<Vec<CatalogRow>, StoreError> {
        sqlx::query("SELECT kind, id, body FROM catalog ORDER BY kind, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(CatalogRow {
                    kind: r.try_get(0)?,
                    id: r.try_get(1)?,
                    body: Some(r.try_get(2)?),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Claims holds before finishing them: returns those this instance may finish (no
    /// other instance finished them or holds a claim; a closed instance's claim is
    /// taken over).
    pub async fn claim(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (done, claimed) = tokio::sync::oneshot::channel();
        self.claims
            .send((ids.to_vec(), done))
            .await
            .map_err(|_| StoreError::Unavailable("the claim task stopped".into()))?;
        claimed
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the claim task stopped".into())))
    }

    /// Claims the first use of an idempotency key for this instance. `false`: another
    /// instance claimed it less than `IDEMPOTENCY_CLAIM_STALE` ago (its hold, if it makes
    /// one, is the answer). This instance's own claim, or a stale one, is taken again.
    pub async fn claim_idempotency_key(
        &self,
        tenant: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let stale_before =
            now_ms - i64::try_from(IDEMPOTENCY_CLAIM_STALE.as_millis()).unwrap_or(i64::MAX);
        let won: Option<i32> = sqlx::query_scalar(
            "INSERT INTO idempotency_claims (tenant, key, instance, claimed_at_ms)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant, key) DO UPDATE
               SET instance = EXCLUDED.instance, claimed_at_ms = EXCLUDED.claimed_at_ms
               WHERE idempotency_claims.instance = EXCLUDED.instance
                  OR idempotency_claims.claimed_at_ms < $5
             RETURNING 1",
        )
        .bind(tenant)
        .bind(key)
        .bind(self.instance)
        .bind(now_ms)
        .bind(stale_before)
        .fetch_optional(&self.pool)
        .await?;
        Ok(won.is_some())
    }

    /// Releases this instance's claim on a key whose call was denied (nothing was held:
    /// a retry may be decided anew, on any instance).
    pub async fn release_idempotency_key(&self, tenant: &str, key: &str) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM idempotency_claims WHERE tenant = $1 AND key = $2 AND instance = $3",
        )
        .bind(tenant)
        .bind(key)
        .bind(self.instance)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes claims old enough that their hold, if any, is long in the ledger (where a
    /// retry finds it first). At most once a minute.
    pub async fn forget_old_idempotency_claims(&self, now_ms: i64) -> Result<(), StoreError> {
        let last = self
            .claims_swept_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if now_ms - last < 60_000 {
            return Ok(());
        }
        self.claims_swept_ms
            .store(now_ms, std::sync::atomic::Ordering::Relaxed);
        let before = now_ms - 10 * i64::try_from(IDEMPOTENCY_CLAIM_STALE.as_millis()).unwrap_or(0);
        sqlx::query("DELETE FROM idempotency_claims WHERE claimed_at_ms < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Which of `ids` are holds still open (not finished by any instance yet).
    pub async fn still_open(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(
            sqlx::query_scalar("SELECT auth FROM open_holds WHERE auth = ANY($1)")
                .bind(ids)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Gives a claim back (the finish was refused, say for bad usage).
    pub async fn unclaim(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query("UPDATE open_holds SET claimed_by = NULL WHERE auth = $1 AND claimed_by = $2")
            .bind(id)
            .bind(self.instance)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The hold entry of an authorization of this tenant, to take it over.
    pub async fn hold_entry(&self, auth: Uuid, tenant: &str) -> Result<Option<Entry>, StoreError> {
        // The texts joined in place of their ids, so one row needs no dictionary.
        let row = sqlx::query(concat!(
            rows_with_texts!(),
            " WHERE l.auth = $1 AND l.kind = 1 AND t.text = $2"
        ))
        .bind(auth)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(crate::entry_of_row(stored_row(&r, |i| r.try_get(i))?))
    }

    /// The use (held + spent) of these buckets summed over every instance, as committed.
    pub async fn use_everywhere(
        &self,
        buckets: &[BucketKey],
    ) -> Result<Vec<(BucketKey, Money)>, StoreError> {
        if buckets.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = buckets.iter().map(ToString::to_string).collect();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT bucket, (SUM(held) + SUM(spent))::bigint FROM counters WHERE bucket = ANY($1) GROUP BY bucket",
        )
        .bind(&names)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(b, used)| Some((BucketKey::parse(&b)?, Money::from_nanos(used))))
            .collect())
    }

    /// Closes the instances that died (their lock has been free for [`DEAD_AFTER`]):
    /// what they had leased and not used goes back to everyone, and their claims may be
    /// taken. Returns how many were closed.
    pub async fn close_dead_instances(&self) -> Result<usize, StoreError> {
        let others: Vec<Uuid> =
            sqlx::query_scalar("SELECT id FROM instances WHERE NOT closed AND id <> $1")
                .bind(self.instance)
                .fetch_all(&self.pool)
                .await?;
        let mut closed = 0;
        for id in others {
            let mut conn = self.pool.acquire().await?;
            let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(instance_lock(id))
                .fetch_one(&mut *conn)
                .await?;
            let due = {
                let mut suspects = self.suspects.lock();
                if free {
                    suspects
                        .entry(id)
                        .or_insert_with(std::time::Instant::now)
                        .elapsed()
                        >= DEAD_AFTER
                } else {
                    suspects.remove(&id);
                    false
                }
            };
            if free && !due {
                // Not long enough: let it take its lock back if it is only reconnecting.
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(instance_lock(id))
                    .execute(&mut *conn)
                    .await?;
            } else if free {
                self.suspects.lock().remove(&id);
                // Under the chain head's lock: a batch of that instance is either
                // committed before (its entries count as committed) or refused after.
                let mut tx = conn.begin().await?;
                sqlx::query("SELECT seq FROM chain_head FOR UPDATE")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE instances SET closed = TRUE WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(instance_lock(id))
                    .execute(&mut *conn)
                    .await?;
                closed += 1;
            }
        }
        Ok(closed)
    }
}

/// Read-only queries for reports (see [`crate::Reader`]), on a small pool.
pub struct Reader {
    pool: PgPool,
}

impl Reader {
    pub async fn alerts(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AlertRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at_ms, tenant, bucket, level, reason, limit_nanos, used_nanos FROM alerts WHERE ($1::text IS NULL OR tenant = $1) ORDER BY id DESC LIMIT $2",
        )
        .bind(tenant)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AlertRow {
                    id: r.try_get(0)?,
                    at_ms: r.try_get(1)?,
                    tenant: r.try_get(2)?,
                    bucket: r.try_get(3)?,
                    level: r.try_get(4)?,
                    reason: r.try_get(5)?,
                    limit: Money::from_nanos(r.try_get(6)?),
                    used: Money::from_nanos(r.try_get(7)?),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// The first hold a tenant made with an idempotency key at or after `since_ms`.
    pub async fn hold_by_idempotency_key(
        &self,
        tenant: &str,
        key: &str,
        since_ms: i64,
    ) -> Result<Option<StoredHold>, StoreError> {
        let row = sqlx::query(
            "SELECT l.auth, l.held, mu.text, pv.text, l.detail FROM ledger l
             LEFT JOIN dict mu ON mu.id = l.model_used LEFT JOIN dict pv ON pv.id = l.price_version
             WHERE l.idem = $2 AND l.tenant = (SELECT id FROM dict WHERE text = $1)
               AND l.at_ms >= $3
             ORDER BY l.seq LIMIT 1",
        )
        .bind(tenant)
        .bind(key)
        .bind(since_ms)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let detail: String = r.try_get(4)?;
        let detail = parse_detail(&detail)?;
        Ok(Some(StoredHold {
            authorization: r.try_get(0)?,
            held: Money::from_nanos(r.try_get(1)?),
            model_used: r.try_get(2)?,
            price_version: r.try_get(3)?,
            detail,
        }))
    }

    pub async fn alerted_levels(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT DISTINCT bucket, level FROM alerts")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    pub async fn usage_by_model(
        &self,
        tenant: &str,
        since_ms: i64,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT COALESCE(d.text, ''), COUNT(*), SUM(l.in_tok)::bigint, SUM(l.out_tok)::bigint, SUM(l.cost)::bigint, SUM(l.charge)::bigint
             FROM ledger l LEFT JOIN dict d ON d.id = l.model_used
             WHERE l.tenant = (SELECT id FROM dict WHERE text = $1) AND l.at_ms >= $2 AND l.kind IN (2, 4, 5, 6)
             GROUP BY d.text ORDER BY SUM(l.cost) DESC",
        )
        .bind(tenant)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    group: r.try_get(0)?,
                    calls: r.try_get(1)?,
                    input_tokens: r.try_get(2)?,
                    output_tokens: r.try_get(3)?,
                    cost: Money::from_nanos(r.try_get(4)?),
                    charge: Money::from_nanos(r.try_get(5)?),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Entries of one authorization, in order: (seq, kind code, held, cost).
    /// The rows of one of a tenant's authorizations, in order, texts joined in.
    pub async fn authorization_rows(
        &self,
        auth: Uuid,
        tenant: &str,
    ) -> Result<Vec<StoredRow>, StoreError> {
        let rows = sqlx::query(concat!(
            rows_with_texts!(),
            " WHERE l.auth = $1 AND t.text = $2 ORDER BY l.seq"
        ))
        .bind(auth)
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| stored_row(r, |i| r.try_get(i)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    pub async fn entries_of(&self, auth: Uuid) -> Result<Vec<(i64, i64, i64, i64)>, StoreError> {
        let rows =
            sqlx::query("SELECT seq, kind, held, cost FROM ledger WHERE auth = $1 ORDER BY seq")
                .bind(auth)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    i64::from(r.try_get::<i16, _>(1)?),
                    r.try_get(2)?,
                    r.try_get(3)?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    pub async fn settle_entry_of(&self, auth: Uuid) -> Result<Option<SettleRow>, StoreError> {
        let row = sqlx::query(
            "SELECT l.in_tok, l.cached_tok, l.out_tok, l.quantity, l.cost, l.charge, l.held, m.text, p.text, l.flags
             FROM ledger l LEFT JOIN dict m ON m.id = l.model_used LEFT JOIN dict p ON p.id = l.price_version
             WHERE l.auth = $1 AND l.kind = 2 LIMIT 1",
        )
        .bind(auth)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(SettleRow {
            usage: TokenUsage {
                input_tokens: from_i64(r.try_get(0)?),
                cached_input_tokens: from_i64(r.try_get(1)?),
                output_tokens: from_i64(r.try_get(2)?),
            },
            quantity: from_i64(r.try_get(3)?),
            cost: Money::from_nanos(r.try_get(4)?),
            charge: Money::from_nanos(r.try_get(5)?),
            released: -Money::from_nanos(r.try_get(6)?),
            model_used: r.try_get(7)?,
            price_version: r.try_get::<Option<String>, _>(8)?.unwrap_or_default(),
            flags: r.try_get::<i32, _>(9)? as u32,
        }))
    }

    pub async fn exists(&self, auth: Uuid, tenant: &str) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT l.seq FROM ledger l JOIN dict t ON t.id = l.tenant WHERE l.auth = $1 AND t.text = $2 LIMIT 1",
        )
        .bind(auth)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }
}

/// Creates an empty database next to the one `admin_url` names and returns its URL:
/// each test gets its own. Databases of earlier test processes that have exited are
/// dropped first, so runs do not pile up.
pub async fn scratch_database(admin_url: &str) -> Result<String, StoreError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let mut admin = PgConnection::connect_with(&connect_options(admin_url)?).await?;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'bursar\\_test\\_%'",
    )
    .fetch_all(&mut admin)
    .await?;
    for name in names {
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        let plain = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !alive && plain {
            // Audited: `name` is only ASCII letters, digits and underscores.
            let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
                .execute(&mut admin)
                .await;
        }
    }
    let name = format!(
        "bursar_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    // Audited: the name is made of a fixed prefix and two numbers.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await?;
    let mut url = url::Url::parse(admin_url)
        .map_err(|e| StoreError::Database(format!("bad database URL: {e}")))?;
    url.set_path(&name);
    Ok(url.to_string())
}
