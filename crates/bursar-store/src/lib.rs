//! Bursar's storage backends.
//!
//! The embedded default is one SQLite file ([`sqlite`]); several instances share one
//! PostgreSQL database ([`postgres`]). Both keep the same things: the hash-chained
//! ledger, the counters it derives, alerts and the catalog objects created through the
//! admin API. What they share lives here:
//!
//! - the writer ([`LedgerHandle`] and the batching loop): the engine appends entries
//!   under its lock, which only puts them on a bounded channel; one writer thread takes
//!   everything waiting (up to [`MAX_BATCH_COMMANDS`]), hands the batch to its backend
//!   to write in one transaction, and only then resolves the tickets. A caller
//!   acknowledges a request only after its ticket resolved, so nothing acknowledged is
//!   lost and many concurrent requests share one commit;
//! - reading the ledger back ([`ChainReader`]): the chain check and the decoding of
//!   stored rows into entries, the same for both backends;
//! - [`Reader`], the read-only queries of the HTTP edge, and [`Store`], which opens,
//!   verifies and reads whichever backend a [`Location`] names.
//!
//! With a journal ([`journal`]: the embedded store under `process` durability), an
//! append's ticket resolves once its record is written to the journal, before the commit;
//! the commit carries the journal's mark, and a start lands what a killed process left.
//! A reader of the store waits on [`LedgerHandle::barrier`] to see what was acknowledged.
//!
//! Failure behaviour: if a commit fails (and, on PostgreSQL, a retry on a new
//! connection fails too), the store turns unhealthy and the writer writes the same batch
//! again, with a growing pause, until it lands; what comes after waits behind it, in
//! order. Its tickets resolve only then, so a caller that cannot wait gives up on its
//! ticket, not on its entries: those land when the store returns (the HTTP edge refuses
//! new work meanwhile, fail closed, or, for tenants that fail open, goes on and lets
//! the queue carry it). Between batches the writer checks the store every second
//! ([`Backend::idle`]), so an outage is seen, and its end, without waiting for work.
//! Only a store that refuses this instance for good ([`StoreError::Fenced`],
//! [`StoreError::Corrupt`]) fails every ticket from then on, until a restart.

pub mod journal;
pub mod keys;
pub mod postgres;
mod record;
pub mod spool;
pub mod sqlite;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bursar_core::budget::{BucketKey, Counter};
pub use bursar_core::config::Durability;
use bursar_core::engine::LedgerSink;
use bursar_core::ledger::{AlertEvent, Entry, EntryKind, HoldDetail, Replay, GENESIS_HASH};
use bursar_core::pricebook::TokenUsage;
use bursar_core::{FastMap, Money};
use tokio::sync::oneshot;
use uuid::Uuid;

/// One error type for every backend; the HTTP edge maps all of them to 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    #[error("i/o error: {0}")]
    Io(String),
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("the stored data is inconsistent: {0}")]
    Corrupt(String),
    #[error("the database schema is not up to date: {0}")]
    Schema(String),
    /// Another instance found this one dead and closed it: it may not write again.
    #[error("{0}")]
    Fenced(String),
}

impl StoreError {
    /// Whether writing the same batch again can succeed once the store is back.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Database(_) | StoreError::Io(_) | StoreError::Unavailable(_)
        )
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

/// Commands waiting for the writer; past this, appends wait (backpressure) rather than
/// growing memory without bound.
pub const MAX_QUEUED_COMMANDS: usize = 65_536;
/// How long the writer waits for more work after the first command of a batch, when the
/// previous batch showed concurrent callers. A commit costs far more than the wait, so
/// under load this multiplies the work per commit; a lone caller never waits.
pub const GROUP_COMMIT_WINDOW: Duration = Duration::from_micros(100);
/// The same wait with a journal: callers are answered once their record is written, not
/// when the batch commits, so the writer gathers more per commit (fewer transactions,
/// less CPU); only barriers and replayed answers wait for it.
pub const JOURNALED_COMMIT_WINDOW: Duration = Duration::from_millis(2);
/// Commands written in one transaction, so one commit never grows without bound.
pub const MAX_BATCH_COMMANDS: usize = 4_096;

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The embedded store: one SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://…`), shared by any number of instances.
    Postgres(String),
}

impl Location {
    /// The embedded store in a data directory.
    pub fn data_dir(dir: &std::path::Path) -> Self {
        Location::Sqlite(sqlite::ledger_path(dir))
    }

    /// A printable form that never shows a password.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => format!("sqlite:{}", p.display()),
            Location::Postgres(url) => postgres::redact(url),
        }
    }
}

/// A catalog object kept by the store (keys, budgets, tenants created by the admin API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogRow {
    pub kind: String,
    pub id: String,
    /// JSON; `None` deletes the row.
    pub body: Option<String>,
}

/// Where a writer's commands were kept, once they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Committed to the store.
    Landed,
    /// In this instance's local spool, to land when the store returns ([`spool`]).
    Spooled,
}

type Done = oneshot::Sender<Result<Kept, StoreError>>;

/// What the writer is asked to do.
pub enum Command {
    Append {
        /// Shared with the journal record, which its ticket serializes and writes.
        entries: Arc<[Entry]>,
        alerts: Arc<[AlertEvent]>,
        done: Done,
        /// Its record in this process's journal, if it has one ([`journal`]).
        journal: Option<journal::JournalPos>,
    },
    Catalog {
        row: CatalogRow,
        done: Done,
    },
    /// Batch `through` of spool `spool` has landed (or, for a journal segment, every
    /// record up to sequence number `through`): written by the writer itself, in the
    /// same transaction as that batch.
    SpoolMark {
        spool: Uuid,
        through: u64,
    },
    /// The mark of a spool or journal segment whose file is gone: deleted.
    ForgetMark {
        spool: Uuid,
    },
    /// Resolves once everything sent before it has landed; writes nothing.
    Barrier {
        done: Done,
    },
    /// Every command of this journal segment was sent before this one: once this lands,
    /// its file is deleted. Writes nothing.
    Retire {
        segment: Arc<journal::Segment>,
    },
}

impl Command {
    fn resolve(self, result: Result<Kept, StoreError>) {
        match self {
            Command::Append { done, .. }
            | Command::Catalog { done, .. }
            | Command::Barrier { done } => {
                let _ = done.send(result);
            }
            Command::SpoolMark { .. } | Command::ForgetMark { .. } | Command::Retire { .. } => {}
        }
    }
}

/// Writes `batch` with the marks of the journal records in it (the last sequence number
/// of each segment), in the same transaction; the batch is given back as it was.
pub(crate) fn write_marked(
    backend: &mut impl Backend,
    batch: &mut Vec<Command>,
) -> Result<(), StoreError> {
    if writes_nothing(batch) {
        return Ok(());
    }
    let len = batch.len();
    let mut marks: Vec<journal::JournalPos> = Vec::new();
    for c in batch.iter() {
        if let Command::Append {
            journal: Some(pos), ..
        } = c
        {
            match marks.iter_mut().find(|m| m.segment == pos.segment) {
                Some(m) => m.seq = m.seq.max(pos.seq),
                None => marks.push(*pos),
            }
        }
    }
    batch.extend(marks.into_iter().map(|m| Command::SpoolMark {
        spool: m.segment,
        through: m.seq,
    }));
    let written = backend.write(batch);
    batch.truncate(len);
    written
}

/// How long an async caller waits for its commit before it gives up (fail closed):
/// longer than a lost connection takes to replace, far shorter than a client's timeout.
pub const COMMIT_WAIT: Duration = Duration::from_secs(3);

/// The ticket of an append: resolves when the entries are committed (or, for a ticket
/// that accepts it, kept in the local spool).
pub struct Ticket {
    rx: oneshot::Receiver<Result<Kept, StoreError>>,
    spooled_will_do: bool,
    /// The journal record that makes the entries durable, written by whoever waits.
    record: Option<journal::Record>,
}

impl Ticket {
    /// This ticket resolves once the entries are in the store or in the local spool:
    /// for a caller answered without the store (a tenant that fails open, while the
    /// store is away). Without a spool, only the store will do.
    pub fn or_spooled(self) -> Ticket {
        Ticket {
            spooled_will_do: true,
            ..self
        }
    }

    fn judge(
        spooled_will_do: bool,
        r: Result<Result<Kept, StoreError>, oneshot::error::RecvError>,
    ) -> Result<(), StoreError> {
        match r {
            Ok(Ok(Kept::Landed)) => Ok(()),
            Ok(Ok(Kept::Spooled)) if spooled_will_do => Ok(()),
            Ok(Ok(Kept::Spooled)) => Err(StoreError::Unavailable(
                "the store is away; the entries are kept in this instance's spool until it returns"
                    .into(),
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Unavailable("the ledger writer stopped".into())),
        }
    }

    /// Writes the journal record, if the entries have one: then they are durable now.
    fn journaled(&mut self) -> bool {
        self.record.take().is_some_and(journal::Record::write)
    }

    /// Waits until the entries are durable: their journal record written, or else their
    /// commit, at most [`COMMIT_WAIT`]. Giving up does not take the entries back: they
    /// stay queued and land when the store returns.
    pub async fn wait(mut self) -> Result<(), StoreError> {
        if self.journaled() {
            return Ok(());
        }
        match tokio::time::timeout(COMMIT_WAIT, &mut self.rx).await {
            Ok(r) => Self::judge(self.spooled_will_do, r),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no commit within {} s; the entries are queued until the store returns",
                COMMIT_WAIT.as_secs()
            ))),
        }
    }

    /// For synchronous callers (CLI tools, benchmarks).
    pub fn wait_blocking(mut self) -> Result<(), StoreError> {
        if self.journaled() {
            return Ok(());
        }
        Self::judge(self.spooled_will_do, self.rx.blocking_recv())
    }

    fn new(rx: oneshot::Receiver<Result<Kept, StoreError>>) -> Ticket {
        Ticket {
            rx,
            spooled_will_do: false,
            record: None,
        }
    }
}

/// A cheap, cloneable handle that appends to the ledger.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: Sender<Command>,
    status: Arc<WriterStatus>,
    journal: Option<Arc<journal::Journal>>,
}

/// What the writer tells its handles.
#[derive(Default)]
struct WriterStatus {
    /// Set while commits fail (or the store does not answer between batches).
    failing: AtomicBool,
    /// Set for good when the store refuses this instance.
    fenced: AtomicBool,
    /// Set while the store is away and the spool cannot take more (or there is none):
    /// what comes is kept in memory only.
    unspooled: AtomicBool,
    /// Batches in the spool, waiting for the store.
    spooled: std::sync::atomic::AtomicU64,
    /// Commands sent and not yet taken by the writer.
    queued: std::sync::atomic::AtomicUsize,
    /// Where senders wait while the queue is full.
    room: parking_lot::Condvar,
    room_lock: parking_lot::Mutex<()>,
}

impl LedgerHandle {
    fn send(&self, cmd: Command) {
        // A full queue means the store is behind: wait for room rather than drop. (The
        // channel itself is unbounded, so its memory grows with what is queued, not
        // with the bound; the count bounds it.)
        let before = self.status.queued.fetch_add(1, Ordering::SeqCst);
        if before >= MAX_QUEUED_COMMANDS {
            let mut g = self.status.room_lock.lock();
            while self.status.queued.load(Ordering::SeqCst) > MAX_QUEUED_COMMANDS
                && !self.status.fenced.load(Ordering::SeqCst)
            {
                self.status.room.wait_for(&mut g, Duration::from_millis(10));
            }
        }
        if self.tx.send(cmd).is_err() {
            // The writer is gone (its ticket resolves as "stopped").
            self.status.queued.fetch_sub(1, Ordering::SeqCst);
            self.status.fenced.store(true, Ordering::SeqCst);
        }
    }

    /// Writes a catalog change; resolves when committed.
    pub fn put_catalog(&self, row: CatalogRow) -> Ticket {
        let (done, rx) = oneshot::channel();
        self.send(Command::Catalog { row, done });
        Ticket::new(rx)
    }

    /// Resolves once everything appended before it has landed in the store: a reader
    /// of the store waits on it to see what was acknowledged (an acknowledged entry may
    /// be only in the journal for a moment).
    pub fn barrier(&self) -> Ticket {
        let (done, rx) = oneshot::channel();
        self.send(Command::Barrier { done });
        Ticket::new(rx)
    }

    /// Whether appends are made durable by this process's journal ([`journal`]).
    pub fn journaled(&self) -> bool {
        self.journal.as_ref().is_some_and(|j| j.works())
    }

    /// Whether the store takes commits now.
    pub fn is_healthy(&self) -> bool {
        !self.status.failing.load(Ordering::SeqCst) && !self.status.fenced.load(Ordering::SeqCst)
    }

    /// Batches in this instance's spool, waiting for the store to return.
    pub fn spooled(&self) -> u64 {
        self.status.spooled.load(Ordering::SeqCst)
    }

    /// Commands waiting for the writer (while the store is down: the queue that lands
    /// when it returns).
    pub fn queued(&self) -> usize {
        self.status.queued.load(Ordering::SeqCst)
    }

    /// Whether entries appended now are kept until the store returns, even if this
    /// process dies: the store is away for a while, not refusing this instance, and the
    /// local spool takes them.
    pub fn can_queue(&self) -> bool {
        !self.status.fenced.load(Ordering::SeqCst)
            && !self.status.unspooled.load(Ordering::SeqCst)
            && self.queued() < MAX_QUEUED_COMMANDS / 2
    }
}

impl LedgerSink for LedgerHandle {
    type Ticket = Ticket;

    fn append(&self, entries: Vec<Entry>, alerts: Vec<AlertEvent>) -> Ticket {
        let (done, rx) = oneshot::channel();
        if self.status.fenced.load(Ordering::SeqCst) {
            let _ = done.send(Err(StoreError::Fenced(
                "the ledger refuses this instance; restart it".into(),
            )));
        } else if let Some(j) = self.journal.as_ref().filter(|j| {
            // An empty append (a replayed answer) must wait for what came before it; while
            // the store fails, callers hear so from the writer (fail closed).
            j.works()
                && !(entries.is_empty() && alerts.is_empty())
                && !self.status.failing.load(Ordering::Relaxed)
        }) {
            let record = j.assign(entries, alerts, done, |c| self.send(c));
            return Ticket {
                record: Some(record),
                ..Ticket::new(rx)
            };
        } else {
            self.send(Command::Append {
                entries: entries.into(),
                alerts: alerts.into(),
                done,
                journal: None,
            });
        }
        Ticket::new(rx)
    }
}

/// What a backend's writer does with one batch.
pub trait Backend: Send + 'static {
    /// Writes the whole batch in one transaction: all of it is committed, or none.
    fn write(&mut self, batch: &[Command]) -> Result<(), StoreError>;
    /// Called after a failed write: forget whatever the rolled-back transaction taught
    /// the backend (interned texts, the chain head). The next `write` is of the same
    /// batch.
    fn forget(&mut self);
    /// Called every second without work: checks that the store answers (and keeps what
    /// the backend holds on it, such as PostgreSQL's instance lock).
    fn idle(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Called once when the writer ends (every handle dropped: a clean exit).
    fn close(&mut self) {}
    /// The store's identity, which a spool names so it lands nowhere else.
    fn identity(&mut self) -> Result<String, StoreError>;
    /// How many batches of spool `spool` have landed ([`Command::SpoolMark`]).
    fn spool_landed(&mut self, spool: Uuid) -> Result<u64, StoreError>;
    /// The detail of hold `auth` as stored (`None` if the store has no such hold): a
    /// journal record of a settle, void or expiry names its hold by id only.
    fn hold_detail(&mut self, auth: Uuid) -> Result<Option<HoldDetail>, StoreError> {
        Err(StoreError::Corrupt(format!(
            "hold `{auth}` cannot be looked up in this store"
        )))
    }
    /// After a failed write: the chain position it may have taken anyway, if the store
    /// cannot tell a failed commit from one whose answer was lost.
    fn in_doubt(&self) -> Option<spool::InDoubt> {
        None
    }
    /// Before the next write (of the same batch, read back from a spool): the position
    /// its earlier attempt may have taken.
    fn expect_in_doubt(&mut self, _: Option<spool::InDoubt>) {}
}

/// Starts the writer thread of a backend; with a spool, what cannot be written while the
/// store is away is kept in it ([`spool`]); with a journal, appends are durable once
/// their record is written ([`journal`]).
pub fn spawn_writer(
    backend: impl Backend,
    spool: Option<spool::SpoolConfig>,
    journal: Option<journal::Journal>,
) -> Result<(LedgerHandle, thread::JoinHandle<()>), StoreError> {
    let (tx, rx) = mpsc::channel();
    let status = Arc::new(WriterStatus::default());
    status.unspooled.store(spool.is_none(), Ordering::SeqCst);
    let s = status.clone();
    let journal = journal.map(Arc::new);
    let j = journal.clone();
    let join = thread::Builder::new()
        .name("bursar-ledger-writer".into())
        .spawn(move || run_writer(backend, rx, &s, spool, j))
        .map_err(|e| StoreError::Io(e.to_string()))?;
    Ok((
        LedgerHandle {
            tx,
            status,
            journal,
        },
        join,
    ))
}

/// The pause before a failed batch is written again: doubling from the first, up to
/// the longest.
const RETRY_PAUSE_FIRST: Duration = Duration::from_millis(50);
const RETRY_PAUSE_LONGEST: Duration = Duration::from_secs(2);
/// Spooled batches landed in one go before the writer looks at what came meanwhile.
const LAND_AT_ONCE: usize = 64;

/// Journal segments whose commands have all been sent, waiting for them to land; then
/// their files are deleted, and their marks with the next batch.
#[derive(Default)]
struct Retiring {
    segments: Vec<Arc<journal::Segment>>,
    forget: Vec<Uuid>,
}

impl Retiring {
    /// Notes the segments `batch` retires (kept, not yet landed).
    fn note(&mut self, batch: &[Command]) {
        for c in batch {
            if let Command::Retire { segment } = c {
                self.segments.push(segment.clone());
            }
        }
    }

    /// Everything noted has landed: the files go.
    fn landed(&mut self) {
        for s in self.segments.drain(..) {
            s.remove();
            self.forget.push(s.id);
        }
    }

    /// Adds the marks to forget to the next batch.
    fn forget_with(&mut self, batch: &mut Vec<Command>) {
        batch.extend(
            self.forget
                .drain(..)
                .map(|spool| Command::ForgetMark { spool }),
        );
    }
}

fn run_writer(
    mut backend: impl Backend,
    rx: Receiver<Command>,
    status: &WriterStatus,
    spool: Option<spool::SpoolConfig>,
    journal: Option<Arc<journal::Journal>>,
) {
    let mut last_batch = 0usize;
    let mut retiring = Retiring::default();
    // When the store was last written or checked: batches that write nothing (barriers)
    // do not count, so they cannot keep the idle check from running.
    let mut touched = Instant::now();
    loop {
        let first = match rx.recv_timeout(IDLE_CHECK_EVERY) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => {
                check_idle(&mut backend, status);
                touched = Instant::now();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Everything sent has landed: the journal's last segment goes too.
                if let Some(j) = journal.filter(|_| !status.failing.load(Ordering::SeqCst)) {
                    retiring.segments.push(j.segment());
                    retiring.landed();
                    let mut batch = Vec::new();
                    retiring.forget_with(&mut batch);
                    let _ = backend.write(&batch);
                }
                backend.close();
                return;
            }
        };
        // Wait for company only when the last batch had some: a lone caller is not made
        // to wait for others who are not coming.
        let gather = if journal.as_ref().is_some_and(|j| j.works()) {
            Gather::Sleep(JOURNALED_COMMIT_WINDOW)
        } else if last_batch > 1 {
            Gather::Wait(GROUP_COMMIT_WINDOW)
        } else {
            Gather::Wait(Duration::ZERO)
        };
        let mut batch = take_batch(first, &rx, gather, status);
        last_batch = batch.len();
        if status.fenced.load(Ordering::SeqCst) {
            resolve(batch, &Err(fenced()));
            continue;
        }
        retiring.forget_with(&mut batch);
        retiring.note(&batch);
        let writes = !writes_nothing(&batch);
        match write_marked(&mut backend, &mut batch) {
            Ok(()) => {
                if writes {
                    touched = Instant::now();
                    if status.failing.swap(false, Ordering::SeqCst) {
                        tracing::info!("the store is back");
                    }
                } else if touched.elapsed() >= IDLE_CHECK_EVERY {
                    check_idle(&mut backend, status);
                    touched = Instant::now();
                }
                retiring.landed();
                resolve(batch, &Ok(Kept::Landed));
            }
            Err(e) if e.is_transient() => {
                if !status.failing.swap(true, Ordering::SeqCst) {
                    tracing::error!(error = %e, "ledger commit failed; failing closed until the store returns");
                }
                metrics::counter!("bursar_ledger_commit_retries_total").increment(1);
                let in_doubt = backend.in_doubt();
                backend.forget();
                let spooled = spool.as_ref().map(|config| {
                    let mut s = spool::Spool::create(config)?;
                    match s.append(&batch, in_doubt) {
                        Ok(()) => Ok(s),
                        Err(e) => {
                            s.remove();
                            Err(e)
                        }
                    }
                });
                match spooled {
                    Some(Ok(s)) => {
                        status.spooled.store(s.waiting(), Ordering::SeqCst);
                        resolve(batch, &Ok(Kept::Spooled));
                        if ride_out(&mut backend, &rx, status, s, &mut retiring) {
                            backend.close();
                            return;
                        }
                    }
                    other => {
                        if let Some(Err(e)) = other {
                            tracing::error!(error = %e, "the spool cannot be written: what comes is kept in memory only until the store returns");
                        }
                        status.unspooled.store(true, Ordering::SeqCst);
                        let result = write_until_landed(&mut backend, &mut batch, status);
                        status.unspooled.store(spool.is_none(), Ordering::SeqCst);
                        if result.is_ok() {
                            retiring.landed();
                        }
                        resolve(batch, &result.map(|()| Kept::Landed));
                    }
                }
            }
            Err(e) => {
                refused(&mut backend, status, &e);
                resolve(batch, &Err(e));
            }
        }
    }
}

/// How often the writer checks the store while no batch writes to it.
const IDLE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Checks that the store answers ([`Backend::idle`]) and tells the handles.
fn check_idle(backend: &mut impl Backend, status: &WriterStatus) {
    if status.fenced.load(Ordering::SeqCst) {
        return;
    }
    let answered = backend.idle();
    if let Err(e) = &answered {
        if !status.failing.load(Ordering::SeqCst) {
            tracing::error!(error = %e, "the store does not answer; failing closed until it does");
        }
        backend.forget();
    } else if status.failing.load(Ordering::SeqCst) {
        tracing::info!("the store answers again");
    }
    status.failing.store(answered.is_err(), Ordering::SeqCst);
}

/// Whether a batch has nothing for the store (barriers and retired segments only).
fn writes_nothing(batch: &[Command]) -> bool {
    batch
        .iter()
        .all(|c| matches!(c, Command::Barrier { .. } | Command::Retire { .. }))
}

/// How the writer gathers a batch after its first command.
#[derive(Debug, Clone, Copy)]
enum Gather {
    /// Callers wait for the commit: take commands as they come, up to this long, each
    /// one waking the writer.
    Wait(Duration),
    /// Callers were answered by the journal: sleep this long, then take what came. No
    /// append wakes the writer meanwhile (a wake-up is a futex call and a context switch
    /// per append, a third of the CPU of an authorize + settle pair when it did).
    Sleep(Duration),
}

/// `first` and whatever else is waiting (up to [`MAX_BATCH_COMMANDS`]), gathered as
/// `gather` says.
fn take_batch(
    first: Command,
    rx: &Receiver<Command>,
    gather: Gather,
    status: &WriterStatus,
) -> Vec<Command> {
    let mut batch = vec![first];
    match gather {
        Gather::Wait(window) => {
            let window_end = Instant::now() + window;
            while batch.len() < MAX_BATCH_COMMANDS {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => {
                        let left = window_end.saturating_duration_since(Instant::now());
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
        }
        Gather::Sleep(window) => {
            std::thread::sleep(window);
            while batch.len() < MAX_BATCH_COMMANDS {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
        }
    }
    if status.queued.fetch_sub(batch.len(), Ordering::SeqCst) > MAX_QUEUED_COMMANDS {
        status.room.notify_all();
    }
    batch
}

fn resolve(batch: Vec<Command>, result: &Result<Kept, StoreError>) {
    for cmd in batch {
        cmd.resolve(result.clone());
    }
}

fn fenced() -> StoreError {
    StoreError::Fenced("the ledger refuses this instance; restart it".into())
}

/// The store refused this instance for good: every write fails from now on.
fn refused(backend: &mut impl Backend, status: &WriterStatus, e: &StoreError) {
    tracing::error!(error = %e, "the store refuses this instance; every write fails until a restart");
    status.fenced.store(true, Ordering::SeqCst);
    status.failing.store(true, Ordering::SeqCst);
    backend.forget();
}

/// While the store is away: spools what comes, and tries to land the spool, with a
/// growing pause, until all of it has landed (then deletes it). Returns whether every
/// handle is gone (the process is ending): the spool is then left for the next start.
fn ride_out(
    backend: &mut impl Backend,
    rx: &Receiver<Command>,
    status: &WriterStatus,
    mut spool: spool::Spool,
    retiring: &mut Retiring,
) -> bool {
    let mut pause = RETRY_PAUSE_FIRST;
    // Batches the spool could not take (its disk failed): landed after it, in order,
    // their callers answered then.
    let mut unspooled: VecDeque<Vec<Command>> = VecDeque::new();
    let mut closed = false;
    loop {
        let until = Instant::now() + pause;
        while !closed {
            let first = match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(c) => c,
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            };
            let batch = take_batch(first, rx, Gather::Wait(Duration::ZERO), status);
            retiring.note(&batch);
            if unspooled.is_empty() {
                match spool.append(&batch, None) {
                    Ok(()) => {
                        status.spooled.store(spool.waiting(), Ordering::SeqCst);
                        resolve(batch, &Ok(Kept::Spooled));
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the spool cannot be written: what comes is kept in memory only until the store returns");
                        status.unspooled.store(true, Ordering::SeqCst);
                    }
                }
            }
            unspooled.push_back(batch);
        }
        status.spooled.store(spool.waiting(), Ordering::SeqCst);
        metrics::gauge!("bursar_spool_batches").set(spool.waiting() as f64);
        let landed = spool.land(backend, LAND_AT_ONCE).and_then(|all| {
            if !all {
                return Ok(false);
            }
            while let Some(batch) = unspooled.front_mut() {
                write_marked(backend, batch)?;
                if let Some(batch) = unspooled.pop_front() {
                    resolve(batch, &Ok(Kept::Landed));
                }
            }
            Ok(true)
        });
        match landed {
            Ok(true) => {
                tracing::info!(
                    batches = spool.landed(),
                    "the store is back: the spool has landed"
                );
                spool.remove();
                retiring.landed();
                metrics::gauge!("bursar_spool_batches").set(0.0);
                status.spooled.store(0, Ordering::SeqCst);
                status.unspooled.store(false, Ordering::SeqCst);
                status.failing.store(false, Ordering::SeqCst);
                return closed;
            }
            // More to land: look at what came meanwhile first, without a pause.
            Ok(false) => pause = Duration::ZERO,
            Err(e) if e.is_transient() => {
                backend.forget();
                metrics::counter!("bursar_ledger_commit_retries_total").increment(1);
                if closed {
                    tracing::error!(error = %e, "the store is still away at exit: the spool lands at the next start");
                    return true;
                }
                pause = (pause * 2).clamp(RETRY_PAUSE_FIRST, RETRY_PAUSE_LONGEST);
            }
            Err(e) => {
                refused(backend, status, &e);
                tracing::error!("the spool lands at the next start");
                for batch in unspooled {
                    resolve(batch, &Err(e.clone()));
                }
                return closed;
            }
        }
    }
}

/// Writes `batch`, again and again while the store is away; gives up only when the store
/// refuses this instance for good.
fn write_until_landed(
    backend: &mut impl Backend,
    batch: &mut Vec<Command>,
    status: &WriterStatus,
) -> Result<(), StoreError> {
    let mut pause = RETRY_PAUSE_FIRST;
    loop {
        match write_marked(backend, batch) {
            Ok(()) => {
                if status.failing.swap(false, Ordering::SeqCst) {
                    tracing::info!("the store is back: the queued entries are being written");
                }
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                backend.forget();
                metrics::counter!("bursar_ledger_commit_retries_total").increment(1);
                thread::sleep(pause);
                pause = (pause * 2).min(RETRY_PAUSE_LONGEST);
            }
            Err(e) => {
                refused(backend, status, &e);
                return Err(e);
            }
        }
    }
}

/// The counter deltas of a batch, per bucket: what the backend adds to its counters.
pub fn counter_deltas(batch: &[Command]) -> FastMap<&BucketKey, Counter> {
    let mut deltas: FastMap<&BucketKey, Counter> = FastMap::default();
    for cmd in batch {
        if let Command::Append { entries, .. } = cmd {
            for e in entries.iter() {
                for b in e.buckets() {
                    let c = deltas.entry(b).or_default();
                    c.held += e.held_delta;
                    c.spent += e.cost_delta;
                }
            }
        }
    }
    deltas
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A hold detail as stored.
pub(crate) fn parse_detail(text: &str) -> Result<HoldDetail, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("unreadable hold detail: {e}")))
}

/// One ledger row as a backend reads it, texts already looked up.
pub struct StoredRow {
    pub seq: i64,
    pub at_ms: i64,
    pub kind: i64,
    pub auth: Uuid,
    pub tenant: Option<String>,
    pub key_id: Option<Uuid>,
    pub held: i64,
    pub cost: i64,
    pub charge: i64,
    pub model_requested: Option<String>,
    pub model_used: Option<String>,
    pub price_version: Option<String>,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub quantity: i64,
    pub latency_ms: Option<i64>,
    pub flags: u32,
    pub detail: Option<String>,
    pub hash: Vec<u8>,
}

/// The entry a stored row holds, without its chain check or the buckets of a hold it
/// refers to (for reading one entry on its own).
pub(crate) fn entry_of_row(r: StoredRow) -> Option<Entry> {
    let kind = EntryKind::from_code(r.kind)?;
    let detail = match &r.detail {
        Some(d) => Some(Arc::new(serde_json::from_str::<HoldDetail>(d).ok()?)),
        None => None,
    };
    Some(build_entry(r, kind, detail, None))
}

fn build_entry(
    r: StoredRow,
    kind: EntryKind,
    detail: Option<Arc<HoldDetail>>,
    hold: Option<Arc<HoldDetail>>,
) -> Entry {
    Entry {
        at_ms: r.at_ms,
        kind,
        authorization: r.auth,
        tenant: r.tenant.unwrap_or_default().into(),
        key_id: r.key_id,
        held_delta: Money::from_nanos(r.held),
        cost_delta: Money::from_nanos(r.cost),
        charge_delta: Money::from_nanos(r.charge),
        model_requested: r.model_requested.map(Into::into),
        model_used: r.model_used.map(Into::into),
        price_version: r.price_version.map(Into::into),
        usage: TokenUsage {
            input_tokens: from_i64(r.input_tokens),
            cached_input_tokens: from_i64(r.cached_input_tokens),
            output_tokens: from_i64(r.output_tokens),
        },
        quantity: from_i64(r.quantity),
        latency_ms: r.latency_ms.and_then(|v| u32::try_from(v).ok()),
        flags: r.flags,
        hold,
        detail,
    }
}

/// Reads the ledger in order, row by row, checking the chain and turning rows into
/// entries. It streams: only open and expired holds are remembered (to attach their
/// buckets to the entries that follow), so memory does not grow with the ledger.
pub struct ChainReader {
    entries: usize,
    prev: [u8; 32],
    expected_seq: i64,
    holds: HashMap<Uuid, Arc<HoldDetail>>,
    problems: Vec<String>,
}

impl Default for ChainReader {
    fn default() -> Self {
        ChainReader {
            entries: 0,
            prev: GENESIS_HASH,
            expected_seq: 1,
            holds: HashMap::new(),
            problems: Vec::new(),
        }
    }
}

impl ChainReader {
    /// A reader of the ledger's tail from entry `seq`, whose previous entry's hash is
    /// `prev`.
    pub fn starting_at(seq: i64, prev: [u8; 32]) -> Self {
        ChainReader {
            prev,
            expected_seq: seq,
            ..ChainReader::default()
        }
    }

    /// The next row; `None` when it cannot be an entry (the problem is recorded).
    pub fn push(&mut self, mut r: StoredRow) -> Option<Entry> {
        let seq = r.seq;
        if seq != self.expected_seq {
            self.problems.push(format!(
                "entry {} is missing (next entry is {seq})",
                self.expected_seq
            ));
        }
        self.expected_seq = seq + 1;
        let Some(kind) = EntryKind::from_code(r.kind) else {
            self.problems
                .push(format!("entry {seq}: unknown kind {}", r.kind));
            return None;
        };
        let detail = match &r.detail {
            Some(d) => match serde_json::from_str::<HoldDetail>(d) {
                Ok(d) => Some(Arc::new(d)),
                Err(e) => {
                    self.problems
                        .push(format!("entry {seq}: unreadable hold detail: {e}"));
                    None
                }
            },
            None => None,
        };
        let authorization = r.auth;
        if let Some(d) = &detail {
            self.holds.insert(authorization, d.clone());
        }
        let hold = if detail.is_some() {
            None
        } else {
            self.holds.get(&authorization).cloned()
        };
        let stored_hash = std::mem::take(&mut r.hash);
        // The hash covers the detail's stored text: hashed as read, not serialized again.
        let detail_text = r.detail.take();
        let e = build_entry(r, kind, detail, hold);
        let h = e.chain_hash_with_detail(&self.prev, detail_text.as_deref());
        if h.as_slice() != stored_hash.as_slice() {
            self.problems.push(format!(
                "entry {seq} ({} of authorization {}): hash does not match its content and the previous hash",
                kind.as_str(),
                e.authorization
            ));
        }
        self.prev = stored_hash.try_into().unwrap_or(h);
        // A settled or voided hold is done; an expired one may still be reconciled.
        if matches!(
            kind,
            EntryKind::Settle | EntryKind::Void | EntryKind::Adjustment
        ) {
            self.holds.remove(&authorization);
        }
        self.entries += 1;
        Some(e)
    }

    /// Entries read, the last hash, and the chain's problems.
    pub fn finish(self) -> (usize, [u8; 32], Vec<String>) {
        (self.entries, self.prev, self.problems)
    }
}

/// The ledger read back, with what the chain check found.
pub struct LedgerReport {
    pub entries: Vec<Entry>,
    pub last_hash: [u8; 32],
    /// Chain breaks, each naming the entry (`seq`).
    pub chain_problems: Vec<String>,
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

/// Replays entries as they are read and, at the end, compares the rebuilt counters
/// with the stored ones: the heart of `bursar ledger verify` on every backend.
#[derive(Default)]
pub(crate) struct Verifier {
    replay: Replay,
    n: u64,
}

impl Verifier {
    pub(crate) fn apply(&mut self, e: &Entry) {
        self.n += 1;
        self.replay.apply(self.n, e);
    }

    pub(crate) fn finish(
        mut self,
        entries: usize,
        mut problems: Vec<String>,
        stored: &HashMap<BucketKey, Counter>,
    ) -> Verification {
        problems.append(&mut self.replay.problems);
        for (bucket, c) in &self.replay.counters {
            let s = stored.get(bucket).copied().unwrap_or_default();
            if s != *c {
                problems.push(format!(
                    "counter {bucket}: stored held {} spent {}, rebuilt from the ledger held {} spent {}",
                    s.held, s.spent, c.held, c.spent
                ));
            }
        }
        for (bucket, s) in stored {
            if !self.replay.counters.contains_key(bucket) && *s != Counter::default() {
                problems.push(format!("counter {bucket}: stored but no entry touches it"));
            }
        }
        Verification {
            entries,
            buckets: self.replay.counters.len(),
            problems,
        }
    }
}

/// Parses a stored counters table.
pub(crate) fn parse_counters(
    rows: impl IntoIterator<Item = (String, i64, i64)>,
) -> Result<HashMap<BucketKey, Counter>, StoreError> {
    let mut out = HashMap::new();
    for (b, held, spent) in rows {
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

/// Read-only queries for the HTTP edge and reports, on whichever backend is in use.
///
/// PostgreSQL's queries are boxed where awaited, so a query on SQLite (answered on the
/// caller's thread) does not carry the size of a network query's future.
pub enum Reader {
    Sqlite(sqlite::Reader),
    Postgres(postgres::Reader),
}

impl Reader {
    pub async fn alerts(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AlertRow>, StoreError> {
        match self {
            Reader::Sqlite(r) => r.alerts(tenant, limit),
            Reader::Postgres(r) => Box::pin(r.alerts(tenant, limit)).await,
        }
    }

    /// How many idempotency keys of the window the embedded store keeps in memory (its
    /// filter of stored keys); `None` on PostgreSQL, which keeps none.
    pub fn idempotency_keys_remembered(&self) -> Option<usize> {
        match self {
            Reader::Sqlite(r) => r.idempotency_keys_remembered(),
            Reader::Postgres(_) => None,
        }
    }

    /// The first hold a tenant made with an idempotency key at or after `since_ms` (the
    /// start of the idempotency window), if any.
    pub async fn hold_by_idempotency_key(
        &self,
        tenant: &str,
        key: &str,
        since_ms: i64,
    ) -> Result<Option<StoredHold>, StoreError> {
        match self {
            Reader::Sqlite(r) => r.hold_by_idempotency_key(tenant, key, since_ms),
            Reader::Postgres(r) => Box::pin(r.hold_by_idempotency_key(tenant, key, since_ms)).await,
        }
    }

    /// Every (bucket, level) ever alerted, once each: what recovery restores so that a
    /// threshold of a period alerts once, across restarts.
    pub async fn alerted_levels(&self) -> Result<Vec<(String, String)>, StoreError> {
        match self {
            Reader::Sqlite(r) => r.alerted_levels(),
            Reader::Postgres(r) => Box::pin(r.alerted_levels()).await,
        }
    }

    /// Every entry of one of a tenant's authorizations, whole, in order (the hold with
    /// its detail): what reconciling a late report needs once the engine forgot it.
    pub async fn authorization_entries(
        &self,
        auth: Uuid,
        tenant: &str,
    ) -> Result<Vec<Entry>, StoreError> {
        let rows = match self {
            Reader::Sqlite(r) => r.authorization_rows(auth, tenant)?,
            Reader::Postgres(r) => Box::pin(r.authorization_rows(auth, tenant)).await?,
        };
        rows.into_iter()
            .map(|r| {
                let seq = r.seq;
                entry_of_row(r)
                    .ok_or_else(|| StoreError::Corrupt(format!("entry {seq} cannot be read")))
            })
            .collect()
    }

    /// Settled spend of a tenant since `since_ms`, by model used.
    pub async fn usage_by_model(
        &self,
        tenant: &str,
        since_ms: i64,
    ) -> Result<Vec<UsageRow>, StoreError> {
        match self {
            Reader::Sqlite(r) => r.usage_by_model(tenant, since_ms),
            Reader::Postgres(r) => Box::pin(r.usage_by_model(tenant, since_ms)).await,
        }
    }

    /// Entries of one authorization, in order: (seq, kind, held delta, cost delta).
    pub async fn entries_of(
        &self,
        auth: Uuid,
    ) -> Result<Vec<(i64, EntryKind, Money, Money)>, StoreError> {
        let rows = match self {
            Reader::Sqlite(r) => r.entries_of(auth)?,
            Reader::Postgres(r) => Box::pin(r.entries_of(auth)).await?,
        };
        Ok(rows
            .into_iter()
            .filter_map(|(seq, kind, held, cost)| {
                Some((
                    seq,
                    EntryKind::from_code(kind)?,
                    Money::from_nanos(held),
                    Money::from_nanos(cost),
                ))
            })
            .collect())
    }

    /// The settle entry of an authorization, if it was settled: for answering a retried
    /// settle after the engine forgot it.
    pub async fn settle_entry_of(&self, auth: Uuid) -> Result<Option<SettleRow>, StoreError> {
        match self {
            Reader::Sqlite(r) => r.settle_entry_of(auth),
            Reader::Postgres(r) => Box::pin(r.settle_entry_of(auth)).await,
        }
    }

    /// Whether an authorization id was ever recorded for this tenant.
    pub async fn exists(&self, auth: Uuid, tenant: &str) -> Result<bool, StoreError> {
        match self {
            Reader::Sqlite(r) => r.exists(auth, tenant),
            Reader::Postgres(r) => Box::pin(r.exists(auth, tenant)).await,
        }
    }
}

/// An opened store: the writer, a reader, and what recovery found.
pub struct Opened {
    pub handle: LedgerHandle,
    pub reader: Reader,
    /// With PostgreSQL: leases, claims and liveness shared with the other instances.
    pub shared: Option<postgres::Shared>,
    /// How many entries were replayed.
    pub entries: usize,
    /// The check of the whole hash chain: done during recovery, or running in the
    /// background when only the ledger's tail was replayed.
    pub chain: Arc<ChainCheck>,
    pub writer: thread::JoinHandle<()>,
}

/// Where the check of the whole ledger (chain and counters) stands.
#[derive(Debug, Default)]
pub struct ChainCheck(AtomicU8);

const CHECKING: u8 = 0;
const VERIFIED: u8 = 1;
const BROKEN: u8 = 2;

impl ChainCheck {
    /// A check already passed (recovery read and checked the whole chain).
    pub fn verified() -> Arc<Self> {
        Arc::new(ChainCheck(AtomicU8::new(VERIFIED)))
    }

    /// `checking`, `verified` or `broken`.
    pub fn state(&self) -> &'static str {
        match self.0.load(Ordering::SeqCst) {
            CHECKING => "checking",
            VERIFIED => "verified",
            _ => "broken",
        }
    }

    pub fn is_broken(&self) -> bool {
        self.0.load(Ordering::SeqCst) == BROKEN
    }

    fn set(&self, ok: bool) {
        self.0
            .store(if ok { VERIFIED } else { BROKEN }, Ordering::SeqCst);
    }

    /// Records and logs what a background check found.
    fn report(&self, found: Result<Verification, StoreError>, started: Instant) {
        match found {
            Ok(v) if v.ok() => {
                self.set(true);
                tracing::info!(
                    entries = v.entries,
                    seconds = started.elapsed().as_secs_f64(),
                    "whole ledger checked: hash chain intact, counters equal to a rebuild"
                );
            }
            Ok(v) => {
                self.set(false);
                tracing::error!(
                    problems = v.problems.len(),
                    first = ?v.problems.iter().take(5).collect::<Vec<_>>(),
                    "THE LEDGER DOES NOT VERIFY; /readyz fails; run `bursar ledger verify`"
                );
            }
            Err(e) => {
                self.set(false);
                tracing::error!(error = %e, "the ledger could not be checked; /readyz fails");
            }
        }
    }
}

/// Entries of the recent past replayed at start beside every open hold: outcomes and
/// idempotency records a retry may still ask for (older ones are answered from the
/// ledger).
pub const RECENT_REPLAY_MS: i64 = 10 * 60 * 1000;

/// What the embedded writer keeps to know where the next start may begin replaying:
/// the open holds (by sequence number) and one mark per second of entry time over the
/// recent past. Fed every entry, in order, by recovery and then by the writer.
#[derive(Debug)]
pub struct ReplayMarks {
    open: HashMap<Uuid, i64>,
    /// (entry time, first sequence number at or after it), oldest first.
    marks: VecDeque<(i64, i64)>,
    /// Where this process's own replay began: nothing before it is recent or open.
    floor: i64,
    /// The last entry noted.
    last_seq: i64,
    /// The replay start last stored.
    stored: i64,
}

impl ReplayMarks {
    pub fn new(floor: i64) -> Self {
        ReplayMarks {
            open: HashMap::new(),
            marks: VecDeque::new(),
            floor,
            last_seq: floor - 1,
            stored: floor,
        }
    }

    /// Notes one entry.
    pub fn note(&mut self, seq: i64, at_ms: i64, kind: EntryKind, auth: Uuid) {
        self.last_seq = seq;
        match kind {
            EntryKind::Hold => {
                self.open.insert(auth, seq);
            }
            EntryKind::Adjustment => {}
            // Every other entry ends its hold (as recovery in the engine reads it).
            _ => {
                self.open.remove(&auth);
            }
        }
        if self.marks.back().is_none_or(|(t, _)| at_ms >= t + 1000) {
            self.marks.push_back((at_ms, seq));
            // Keep one mark at or before the window's start, and those after it.
            while self.marks.len() > 1 && self.marks[1].0 <= at_ms - RECENT_REPLAY_MS {
                self.marks.pop_front();
            }
        }
    }

    /// Where a start may begin replaying: the first open hold, or the first entry of
    /// the recent past, whichever is earlier.
    pub fn replay_from(&self) -> i64 {
        let newest = self.marks.back().map_or(i64::MIN, |m| m.0);
        let recent = match self.marks.front() {
            Some(&(t, seq)) if t <= newest - RECENT_REPLAY_MS => seq,
            _ => self.floor,
        };
        let open = self
            .open
            .values()
            .copied()
            .min()
            .unwrap_or(self.last_seq + 1);
        recent.min(open).max(1)
    }

    /// The replay start to store, when it moved since it was last stored.
    pub fn to_store(&mut self) -> Option<i64> {
        let from = self.replay_from();
        (from != self.stored).then(|| {
            self.stored = from;
            from
        })
    }
}

/// How a store is opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenOptions {
    pub durability: Durability,
    /// Apply pending PostgreSQL migrations first (otherwise a database that is behind
    /// is refused, naming `bursar migrate`). The embedded store always creates its
    /// schema.
    pub migrate: bool,
    /// Where an instance on PostgreSQL keeps its spool while the store is away
    /// ([`spool`]); without one, what it cannot write waits in memory only. The
    /// embedded store spools in its own directory.
    pub spool_dir: Option<PathBuf>,
    /// How long an Idempotency-Key is honoured (the engine's `idempotency_window`;
    /// `None`: [`bursar_core::engine::DEFAULT_IDEMPOTENCY_WINDOW`]). The embedded store
    /// keeps the keys of the window in memory.
    pub idempotency_window: Option<Duration>,
}

/// What recovery is handed, row by row: nothing of it is kept in a list first (a
/// catalog of 100k keys would otherwise sit in memory twice at start).
pub struct Recovery<E: FnMut(Entry), C: FnMut(CatalogRow), K: FnOnce(HashMap<BucketKey, Counter>)> {
    /// Every ledger entry, in order (or, after `on_counters`, the ledger's tail).
    pub on_entry: E,
    /// Every stored catalog row, in no particular order.
    pub on_catalog: C,
    /// The stored counters (those at the ledger's head), when the store replays only
    /// the ledger's tail: every open hold and the recent past. Called before any entry.
    pub on_counters: K,
}

/// Opens (or creates) the store, streams the ledger and the catalog to `recovery`, and
/// starts the writer thread. Refuses a ledger whose chain does not verify.
pub async fn open<E: FnMut(Entry), C: FnMut(CatalogRow), K: FnOnce(HashMap<BucketKey, Counter>)>(
    location: &Location,
    options: OpenOptions,
    recovery: Recovery<E, C, K>,
) -> Result<Opened, StoreError> {
    match location {
        Location::Sqlite(path) => sqlite::open(
            path,
            options.durability,
            options
                .idempotency_window
                .unwrap_or(bursar_core::engine::DEFAULT_IDEMPOTENCY_WINDOW),
            recovery,
        ),
        Location::Postgres(url) => postgres::open(url, options, recovery).await,
    }
}

/// Recomputes the hash chain and rebuilds every counter from the entries, and compares
/// them with the stored counters, in one consistent snapshot; safe while servers run.
pub async fn verify(location: &Location) -> Result<Verification, StoreError> {
    match location {
        Location::Sqlite(path) => sqlite::verify(path),
        Location::Postgres(url) => postgres::verify(url).await,
    }
}

/// Every entry of the ledger in order, read-only (audits, tests, exports).
pub async fn read_entries(location: &Location) -> Result<LedgerReport, StoreError> {
    match location {
        Location::Sqlite(path) => sqlite::read_entries(path),
        Location::Postgres(url) => postgres::read_entries(url).await,
    }
}

/// Applies the pending migrations of a PostgreSQL database; returns how many ran.
pub async fn migrate(location: &Location) -> Result<usize, StoreError> {
    match location {
        // The embedded store creates its schema when it opens.
        Location::Sqlite(_) => Ok(0),
        Location::Postgres(url) => postgres::migrate(url).await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use std::io::Write as _;
    use std::sync::atomic::AtomicUsize;

    /// A backend that writes nothing until the test lets it, and then counts commands:
    /// it is the writer loop's queue that is under test here, not a store.
    struct Gate {
        open: Arc<AtomicBool>,
        written: Arc<AtomicUsize>,
    }

    impl Backend for Gate {
        fn write(&mut self, batch: &[Command]) -> Result<(), StoreError> {
            if !self.open.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("closed gate".into()));
            }
            self.written.fetch_add(batch.len(), Ordering::SeqCst);
            Ok(())
        }
        fn forget(&mut self) {}
        fn identity(&mut self) -> Result<String, StoreError> {
            Ok("gate".into())
        }
        fn spool_landed(&mut self, _: Uuid) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    /// A backend that refuses every write until the test lets it, then logs what it
    /// is given: the writer loop and its spool are under test here, not a store.
    struct Recorder {
        open: Arc<AtomicBool>,
        log: Arc<parking_lot::Mutex<Vec<String>>>,
    }

    impl Backend for Recorder {
        fn write(&mut self, batch: &[Command]) -> Result<(), StoreError> {
            if !self.open.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("closed".into()));
            }
            let mut log = self.log.lock();
            for c in batch {
                log.push(match c {
                    Command::Append { entries, .. } => match entries.first() {
                        Some(e) => format!("entry {}", e.quantity),
                        None => "empty".to_string(),
                    },
                    Command::Catalog { row, .. } => format!("catalog {}", row.id),
                    Command::SpoolMark { through, spool } => format!("mark {spool} {through}"),
                    Command::ForgetMark { spool } => format!("forget {spool}"),
                    Command::Barrier { .. } => "barrier".to_string(),
                    Command::Retire { .. } => "retire".to_string(),
                });
            }
            Ok(())
        }
        fn forget(&mut self) {}
        fn identity(&mut self) -> Result<String, StoreError> {
            Ok("recorder".into())
        }
        fn spool_landed(&mut self, _: Uuid) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    /// Entry `n` (its quantity), a hold on one bucket when `held` is not zero.
    fn entry(n: u64, held: i64) -> Entry {
        let detail = (held != 0).then(|| {
            Arc::new(HoldDetail {
                buckets: Arc::new([BucketKey {
                    budget: "b".into(),
                    value: "t".into(),
                    period_start: 0,
                }]),
                tags: Default::default(),
                team: None,
                user: None,
                expires_at_ms: i64::MAX,
                idempotency_key: None,
                fingerprint: None,
                max_tokens: None,
                prompt_tokens: 0,
                quantity: n,
                rate_tokens: 0,
            })
        });
        Entry {
            at_ms: 1_700_000_000_000 + n as i64,
            kind: if held != 0 {
                EntryKind::Hold
            } else {
                EntryKind::Adjustment
            },
            authorization: Uuid::now_v7(),
            tenant: "t".into(),
            key_id: None,
            held_delta: Money::from_nanos(held),
            cost_delta: Money::ZERO,
            charge_delta: Money::ZERO,
            model_requested: None,
            model_used: None,
            price_version: None,
            usage: TokenUsage::default(),
            quantity: n,
            latency_ms: None,
            flags: 0,
            detail,
            hold: None,
        }
    }

    /// Opens the embedded store at `path`, as a start does; the quantities of the entries
    /// it recovers go to `seen`.
    fn start_sqlite(
        path: &std::path::Path,
        seen: &mut Vec<u64>,
    ) -> (LedgerHandle, thread::JoinHandle<()>) {
        let opened = open_sqlite(path, |e| seen.push(e.quantity)).unwrap();
        (opened.handle, opened.writer)
    }

    /// Opens the embedded store at `path`, handing each recovered entry to `on_entry`.
    fn open_sqlite(
        path: &std::path::Path,
        on_entry: impl FnMut(Entry),
    ) -> Result<Opened, StoreError> {
        sqlite::open(
            path,
            Durability::Process,
            bursar_core::engine::DEFAULT_IDEMPOTENCY_WINDOW,
            Recovery {
                on_entry,
                on_catalog: |_| {},
                on_counters: |_| {},
            },
        )
    }

    fn spool_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("spool-"))
            .collect()
    }

    #[test]
    fn a_store_away_spools_what_comes_and_lands_it_in_order_once_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let open = Arc::new(AtomicBool::new(false));
        let log: Arc<parking_lot::Mutex<Vec<String>>> = Arc::default();
        let spool = spool::SpoolConfig {
            dir: dir.path().to_path_buf(),
            store: "recorder".into(),
            durability: Durability::Process,
        };
        let (handle, _join) = spawn_writer(
            Recorder {
                open: open.clone(),
                log: log.clone(),
            },
            Some(spool),
            None,
        )
        .unwrap();
        // The first batch fails: it starts the spool. Its caller, who may not be answered
        // without the store, hears that it is away.
        let first = handle.append(vec![entry(1, 0)], Vec::new()).wait_blocking();
        match first {
            Err(StoreError::Unavailable(m)) => assert!(m.contains("spool"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(!handle.is_healthy());
        assert!(handle.can_queue(), "the spool takes what comes");
        // Callers answered without the store are answered once their entries are spooled.
        let kept: Vec<_> = (2..=50)
            .map(|n| handle.append(vec![entry(n, 0)], Vec::new()).or_spooled())
            .collect();
        for t in kept {
            t.wait_blocking().unwrap();
        }
        let files = spool_files(dir.path());
        assert_eq!(files.len(), 1);
        let text = std::fs::read_to_string(&files[0]).unwrap();
        assert!(text.contains("\"quantity\":50"), "entry 50 is on disk");
        assert!(log.lock().is_empty());

        // The store returns: the spool lands, batch by batch with its mark, and goes.
        open.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !handle.is_healthy() || !spool_files(dir.path()).is_empty() {
            assert!(Instant::now() < deadline, "the spool never landed");
            thread::sleep(Duration::from_millis(10));
        }
        let batches = text.lines().count() - 1;
        let log = log.lock().clone();
        let entries: Vec<String> = log
            .iter()
            .filter(|l| l.starts_with("entry"))
            .cloned()
            .collect();
        let expected: Vec<String> = (1..=50).map(|n| format!("entry {n}")).collect();
        assert_eq!(entries, expected, "every entry once, in order");
        let marks: Vec<String> = log
            .iter()
            .filter(|l| l.starts_with("mark"))
            .filter_map(|l| l.rsplit(' ').next().map(str::to_string))
            .collect();
        let expected: Vec<String> = (1..=batches).map(|n| n.to_string()).collect();
        assert_eq!(marks, expected, "each batch with its mark");
        assert!(log.last().unwrap().ends_with(&format!(" {batches}")));
        // Then the writer writes straight to the store again.
        handle
            .append(vec![entry(51, 0)], Vec::new())
            .wait_blocking()
            .unwrap();
        assert!(spool_files(dir.path()).is_empty());
    }

    /// A start lands only whole batches of spools written for its own store: a line a
    /// crash cut short was never acknowledged, and another store's spool is left as it
    /// is.
    #[test]
    fn a_start_lands_whole_batches_of_its_own_stores_spools_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = sqlite::ledger_path(dir.path());
        let start = || {
            let mut seen = Vec::new();
            let (handle, writer) = start_sqlite(&path, &mut seen);
            drop(handle);
            writer.join().unwrap();
            seen
        };
        assert!(start().is_empty());
        let store = store_id(&path);
        let spool_of = |store: &str, entries: std::ops::RangeInclusive<u64>| {
            let config = spool::SpoolConfig {
                dir: dir.path().to_path_buf(),
                store: store.to_string(),
                durability: Durability::Process,
            };
            let mut s = spool::Spool::create(&config).unwrap();
            for n in entries {
                let batch = [Command::Append {
                    entries: vec![entry(n, 1_000)].into(),
                    alerts: Vec::new().into(),
                    done: oneshot::channel().0,
                    journal: None,
                }];
                s.append(&batch, None).unwrap();
            }
        };
        spool_of("another store", 1..=2);
        let foreign = spool_files(dir.path());
        spool_of(&store, 3..=5);
        let own = spool_files(dir.path())
            .into_iter()
            .find(|p| !foreign.contains(p))
            .unwrap();
        // The last batch cut short, as by a crash in the middle of its line.
        let text = std::fs::read(&own).unwrap();
        let cut = text.len() - 10;
        std::fs::write(&own, &text[..cut]).unwrap();

        assert_eq!(start(), vec![3, 4], "the whole batches of its own spool");
        assert_eq!(
            spool_files(dir.path()),
            foreign,
            "the other store's is left"
        );
        assert_eq!(start(), vec![3, 4], "and nothing lands twice");
        let v = sqlite::verify(&path).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
    }

    /// Reading the ledger while it is written sees one snapshot: every entry verifies,
    /// also those whose texts (a new tenant) were interned in the same commit.
    #[test]
    fn the_ledger_read_while_it_is_written_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = sqlite::ledger_path(dir.path());
        let (ledger, store_writer) = start_sqlite(&path, &mut Vec::new());
        let handle = ledger.clone();
        let writer = thread::spawn(move || {
            for n in 1..=1_500u64 {
                let mut e = entry(n, 0);
                e.tenant = format!("tenant-{n}").into();
                handle.append(vec![e], Vec::new()).wait_blocking().unwrap();
            }
        });
        let mut reads = 0;
        while !writer.is_finished() {
            let report = sqlite::read_entries(&path).unwrap();
            assert!(
                report.chain_problems.is_empty(),
                "read {reads}: {:?}",
                report.chain_problems
            );
            reads += 1;
        }
        writer.join().unwrap();
        assert!(reads > 1, "the reads overlapped the writes");
        drop(ledger);
        store_writer.join().unwrap();
    }

    /// What a process killed during an outage leaves is landed by the next start, after
    /// what its mark says had landed, and only once.
    #[test]
    fn a_spool_left_by_a_killed_process_lands_at_the_next_start_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = sqlite::ledger_path(dir.path());
        let start = |seen: &mut Vec<u64>| start_sqlite(&path, seen);
        let mut seen = Vec::new();
        let (handle, writer) = start(&mut seen);
        handle
            .append(vec![entry(1, 1_000)], Vec::new())
            .wait_blocking()
            .unwrap();
        drop(handle);
        writer.join().unwrap();

        // The spool of three batches a killed process left (its lock went with it). The
        // first had landed: its mark says so.
        let store = store_id(&path);
        let config = spool::SpoolConfig {
            dir: dir.path().to_path_buf(),
            store,
            durability: Durability::Process,
        };
        let mut left = spool::Spool::create(&config).unwrap();
        for n in 2..=4 {
            let batch = [Command::Append {
                entries: vec![entry(n, 1_000 * n as i64)].into(),
                alerts: Vec::new().into(),
                done: oneshot::channel().0,
                journal: None,
            }];
            left.append(&batch, None).unwrap();
        }
        drop(left);
        let file = spool_files(dir.path()).pop().unwrap();
        let id = id_in_name(&file);
        mark_landed(&path, &id, 1);

        let mut seen = Vec::new();
        let (handle, writer) = start(&mut seen);
        assert_eq!(seen, vec![1, 3, 4], "replayed, then landed after the mark");
        assert!(spool_files(dir.path()).is_empty());
        drop(handle);
        writer.join().unwrap();
        let mut seen = Vec::new();
        let (handle, writer) = start(&mut seen);
        assert_eq!(seen, vec![1, 3, 4], "nothing lands twice");
        drop(handle);
        writer.join().unwrap();
        let v = sqlite::verify(&path).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        let stored: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT held FROM counters", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            stored,
            1_000 + 3_000 + 4_000,
            "the landed holds are counted"
        );
    }

    /// The embedded store's identity, which spools and journals name.
    fn store_id(path: &std::path::Path) -> String {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row("SELECT v FROM meta WHERE k = 'store_id'", [], |r| r.get(0))
            .unwrap()
    }

    /// Marks the first `n` batches (or records) of spool (or journal segment) `id`
    /// landed, as the writer's commit does.
    fn mark_landed(path: &std::path::Path, id: &str, n: u64) {
        rusqlite::Connection::open(path)
            .unwrap()
            .execute(
                "INSERT INTO meta (k, v) VALUES (?1, ?2)",
                [format!("spool:{id}"), n.to_string()],
            )
            .unwrap();
    }

    /// The id in a spool's or journal segment's file name.
    fn id_in_name(file: &std::path::Path) -> String {
        let name = file.file_name().unwrap().to_string_lossy();
        let stem = name.split_once('-').unwrap().1;
        stem.rsplit_once('.').unwrap().0.to_string()
    }

    fn meta_marks(path: &std::path::Path) -> Vec<(String, String)> {
        let conn = rusqlite::Connection::open(path).unwrap();
        let mut q = conn
            .prepare("SELECT k, v FROM meta WHERE k LIKE 'spool:%' ORDER BY k")
            .unwrap();
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// An embedded store answers an append once its journal record is written; the
    /// writer's commit carries the journal's mark; a clean exit deletes the journal and
    /// its mark. What a killed process left in its journal lands at the next start, in
    /// sequence order, after the mark, without the record a crash cut, and only once.
    #[test]
    fn a_journal_left_by_a_killed_process_lands_after_its_mark_in_sequence_order_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = sqlite::ledger_path(dir.path());
        let start = |seen: &mut Vec<u64>| start_sqlite(&path, seen);
        let mut seen = Vec::new();
        let (handle, writer) = start(&mut seen);
        assert!(handle.journaled(), "process durability journals appends");
        let ticket = handle.append(vec![entry(1, 1_000)], Vec::new());
        assert!(ticket.record.is_some(), "the append has a journal record");
        ticket.wait_blocking().unwrap();
        handle.barrier().wait_blocking().unwrap();
        let segment = journal::waiting(dir.path());
        assert_eq!(segment.len(), 1, "one live segment");
        let id = id_in_name(&segment[0]);
        assert_eq!(
            meta_marks(&path),
            vec![(format!("spool:{id}"), "1".to_string())],
            "the commit marked the record landed"
        );
        drop(handle);
        writer.join().unwrap();
        assert!(
            journal::waiting(dir.path()).is_empty(),
            "a clean exit deletes it"
        );
        assert!(meta_marks(&path).is_empty(), "and forgets its mark");

        // A killed process's journal: five appends (entries 2 to 6, records 1 to 5) given
        // to a writer that never wrote them; the records written in another order than
        // their numbers (threads race to write), entry 5's cut by the crash, the first
        // marked landed.
        let store = store_id(&path);
        let killed = journal::Journal::start(dir.path(), &store).unwrap();
        let mut records: Vec<journal::Record> = (2..=6)
            .map(|n| {
                killed.assign(
                    vec![entry(n, 1_000 * n as i64)],
                    Vec::new(),
                    oneshot::channel().0,
                    |_| {},
                )
            })
            .collect();
        let segment = journal::waiting(dir.path()).pop().unwrap();
        let r6 = records.pop().unwrap();
        let r5 = records.pop().unwrap();
        let r4 = records.pop().unwrap();
        assert!(r4.write());
        for r in records {
            assert!(r.write());
        }
        let r5_bytes = r5.bytes().unwrap();
        let cut = &r5_bytes[..r5_bytes.len() / 2];
        std::fs::OpenOptions::new()
            .append(true)
            .open(&segment)
            .unwrap()
            .write_all(cut)
            .unwrap();
        assert!(r6.write());
        // The process dies: its file (and lock) with it.
        drop((r5, killed));
        let id = id_in_name(&segment);
        mark_landed(&path, &id, 1);

        let mut seen = Vec::new();
        let (handle, writer) = start(&mut seen);
        assert_eq!(
            seen,
            vec![1, 3, 4, 6],
            "replayed, then landed after the mark in sequence order, the cut record left out"
        );
        assert_eq!(
            journal::waiting(dir.path()).len(),
            1,
            "only the new run's own"
        );
        assert!(
            meta_marks(&path).is_empty(),
            "the landed journal's mark is forgotten"
        );
        drop(handle);
        writer.join().unwrap();
        let mut seen = Vec::new();
        let (handle, writer) = start(&mut seen);
        assert_eq!(seen, vec![1, 3, 4, 6], "nothing lands twice");
        drop(handle);
        writer.join().unwrap();
        let v = sqlite::verify(&path).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        let stored: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT held FROM counters", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 1_000 + 3_000 + 4_000 + 6_000);
    }

    /// A record of `format` (3 or 4) as [`journal::Record`] writes it.
    fn record_bytes(record: &journal::Record, format: u32) -> Vec<u8> {
        match format {
            3 => record.format_3_bytes(),
            _ => record.bytes().unwrap(),
        }
    }

    /// The binary formats' reading (3, which older versions wrote, and 4): a record cut
    /// by a crash, or bytes that are no record, are skipped up to the next mark, and
    /// every whole record after them is read; a whole record (its checksum holds) that
    /// cannot be read stops the start instead of being taken for a cut one. Cut at every
    /// byte, a journal reads a prefix of its records.
    #[test]
    fn a_binary_journal_reads_on_past_cut_records_and_stray_bytes() {
        for format in [3, 4] {
            a_binary_journal_of_format_reads_on_past_cut_records(format);
        }
    }

    fn a_binary_journal_of_format_reads_on_past_cut_records(format: u32) {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal::Journal::start(dir.path(), "s").unwrap();
        let records: Vec<Vec<u8>> = (1..=4)
            .map(|n| {
                let record = journal.assign(
                    vec![entry(n, 1_000 * n as i64)],
                    Vec::new(),
                    oneshot::channel().0,
                    |_| {},
                );
                record_bytes(&record, format)
            })
            .collect();
        let read = |body: &[u8]| -> Vec<Option<u64>> {
            journal::binary_records(body, format)
                .unwrap()
                .into_iter()
                .map(|r| {
                    r.map(|(seq, command)| {
                        let spool::Spooled::Append { mut entries, .. } = command else {
                            panic!("an append")
                        };
                        assert_eq!(entries.len(), 1);
                        assert_eq!(entries.remove(0).into_entry().quantity, seq);
                        seq
                    })
                })
                .collect()
        };
        let whole: Vec<u8> = records.concat();
        assert_eq!(
            read(&whole),
            vec![Some(1), Some(2), Some(3), Some(4)],
            "format {format}"
        );
        for cut in 0..whole.len() {
            let seqs: Vec<u64> = read(&whole[..cut]).into_iter().flatten().collect();
            let whole_before = records
                .iter()
                .scan(0, |end, r| {
                    *end += r.len();
                    Some(*end)
                })
                .filter(|end| *end <= cut)
                .count() as u64;
            assert_eq!(
                seqs,
                (1..=whole_before).collect::<Vec<_>>(),
                "format {format}, cut at {cut}"
            );
        }
        let mut mixed = records[0].clone();
        mixed.extend_from_slice(b"stray \xB5B bytes");
        mixed.extend_from_slice(&records[1][..records[1].len() / 2]);
        mixed.extend_from_slice(&records[2]);
        mixed.extend_from_slice(&records[3][..records[3].len() - 1]);
        let got = read(&mixed);
        assert_eq!(
            got.iter().flatten().copied().collect::<Vec<_>>(),
            vec![1, 3],
            "{got:?}"
        );
        assert!(got.iter().filter(|r| r.is_none()).count() >= 2, "{got:?}");
        // A record whose checksum holds over a payload that is no append.
        let mut unreadable = records[0][..4].to_vec();
        let payload = [0xc1u8, 0x00];
        let mut summed = 9u64.to_le_bytes().to_vec();
        summed.extend_from_slice(&payload);
        unreadable.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        unreadable.extend_from_slice(&crc32fast::hash(&summed).to_le_bytes());
        unreadable.extend_from_slice(&summed);
        let err = journal::binary_records(&[records[0].clone(), unreadable].concat(), format)
            .err()
            .unwrap();
        assert!(
            err.contains("record 9 is whole but cannot be read"),
            "{err}"
        );
    }

    /// A binary record (format 4, and 3 as older versions wrote it) gives back every
    /// field it was given: every optional field set, tags and metadata, ids (which
    /// MessagePack writes as bytes), the largest and smallest numbers, an alert; and an
    /// entry acting on a hold, marked as such.
    #[test]
    fn a_binary_journal_record_gives_back_every_field() {
        let mut hold = entry(7, i64::MAX);
        hold.key_id = Some(Uuid::now_v7());
        hold.cost_delta = Money::from_nanos(-123_456_789);
        hold.charge_delta = Money::from_nanos(i64::MIN + 1);
        hold.model_requested = Some("gpt-4o-mini".into());
        hold.model_used = Some("gpt-4o-mini-2024-07-18".into());
        hold.price_version = Some("2026-11-01".into());
        hold.usage = TokenUsage {
            input_tokens: u64::MAX,
            cached_input_tokens: 1,
            output_tokens: 0,
        };
        hold.latency_ms = Some(u32::MAX);
        hold.flags = u32::MAX;
        hold.at_ms = i64::MIN;
        if let Some(d) = hold.detail.as_mut() {
            let d = Arc::make_mut(d);
            d.tags.workflow = Some("run-1".into());
            d.tags.campaign = Some("spring".into());
            d.tags.agent = Some("SEO".into());
            d.tags.feature = Some("chat".into());
            d.tags.task = Some("summary".into());
            d.tags.end_user = Some("user \u{b5} \"q\"".into());
            d.tags.custom.insert("env".into(), "prod".into());
            d.tags
                .metadata
                .insert("trace".into(), "\u{0}\n\u{1f600}".into());
            d.team = Some("core".into());
            d.user = Some("ann".into());
            d.idempotency_key = Some("k-1".into());
            d.fingerprint = Some("ab".repeat(32));
            d.max_tokens = Some(u32::MAX);
            d.prompt_tokens = u64::MAX;
            d.rate_tokens = 3;
        }
        let mut settle = settle_of(&hold, 5, 8);
        settle.hold = hold.detail.clone();
        let alert = AlertEvent {
            at_ms: 1,
            tenant: Some("t".into()),
            bucket: BucketKey {
                budget: "b".into(),
                value: "t".into(),
                period_start: -1,
            },
            level: bursar_core::budget::Level::Emergency,
            limit: Money::from_nanos(10),
            used: Money::from_nanos(9),
            reason: "threshold".into(),
        };
        let mut void = settle_of(&hold, 0, 9);
        void.hold = None;
        void.kind = EntryKind::Void;
        void.key_id = None;
        void.model_requested = None;
        void.latency_ms = Some(0);
        let dir = tempfile::tempdir().unwrap();
        let journal = journal::Journal::start(dir.path(), "s").unwrap();
        for format in [3, 4] {
            let record = journal.assign(
                vec![hold.clone(), settle.clone(), void.clone()],
                vec![alert.clone()],
                oneshot::channel().0,
                |_| {},
            );
            let seq = format as u64 - 2;
            let mut read = journal::binary_records(&record_bytes(&record, format), format).unwrap();
            let Some(Some((
                got_seq,
                spool::Spooled::Append {
                    entries, alerts, ..
                },
            ))) = read.pop()
            else {
                panic!("one whole append")
            };
            assert_eq!(got_seq, seq);
            let needs: Vec<bool> = entries.iter().map(|e| e.needs_hold()).collect();
            assert_eq!(
                needs,
                vec![false, true, false],
                "format {format}: the settle names its hold by id"
            );
            let entries: Vec<Entry> = entries.into_iter().map(|e| e.into_entry()).collect();
            let mut settle = settle.clone();
            settle.hold = None;
            assert_eq!(
                entries,
                vec![hold.clone(), settle, void.clone()],
                "format {format}"
            );
            assert_eq!(alerts, vec![alert.clone()], "format {format}");
        }
    }

    /// A journal an older version left (format 2: `\n<seq> <json>\n` records; format 3:
    /// MessagePack records) lands as it did, its cut record left out.
    #[test]
    fn a_journal_of_formats_2_and_3_left_by_an_older_version_lands() {
        for format in [2, 3] {
            a_journal_of_format_left_by_an_older_version_lands(format);
        }
    }

    fn a_journal_of_format_left_by_an_older_version_lands(format: u32) {
        let dir = tempfile::tempdir().unwrap();
        let path = sqlite::ledger_path(dir.path());
        let mut seen = Vec::new();
        let (handle, writer) = start_sqlite(&path, &mut seen);
        handle
            .append(vec![entry(1, 1_000)], Vec::new())
            .wait_blocking()
            .unwrap();
        drop(handle);
        writer.join().unwrap();

        // Its records, numbered by a journal of this version elsewhere.
        let elsewhere = tempfile::tempdir().unwrap();
        let numbering = journal::Journal::start(elsewhere.path(), "elsewhere").unwrap();
        let id = Uuid::now_v7();
        let mut text = format!(
            "{{\"journal\":\"{id}\",\"store\":\"{}\",\"format\":{format}}}\n",
            store_id(&path)
        )
        .into_bytes();
        for n in 2..=4 {
            let record = numbering.assign(
                vec![entry(n, 1_000 * n as i64)],
                Vec::new(),
                oneshot::channel().0,
                |_| {},
            );
            let bytes = match format {
                2 => record.format_2_bytes(),
                _ => record.format_3_bytes(),
            };
            if n == 3 {
                text.extend_from_slice(&bytes[..bytes.len() / 2]);
            } else {
                text.extend_from_slice(&bytes);
            }
        }
        std::fs::write(dir.path().join(format!("journal-{id}.log")), text).unwrap();

        let mut seen = Vec::new();
        let (handle, writer) = start_sqlite(&path, &mut seen);
        assert_eq!(
            seen,
            vec![1, 2, 4],
            "format {format}: landed, the cut record left out"
        );
        drop(handle);
        writer.join().unwrap();
        let v = sqlite::verify(&path).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
    }

    /// The settle of hold entry `hold` at `cost`, numbered `n`.
    fn settle_of(hold: &Entry, cost: i64, n: u64) -> Entry {
        Entry {
            kind: EntryKind::Settle,
            at_ms: hold.at_ms + 1,
            held_delta: -hold.held_delta,
            cost_delta: Money::from_nanos(cost),
            quantity: n,
            detail: None,
            hold: hold.detail.clone(),
            ..hold.clone()
        }
    }

    /// A journal record of an entry that acts on a hold names the hold by id only. When
    /// a killed process's journal lands, each such entry finds its hold (earlier in the
    /// journal, or in the store) and changes the hold's buckets; a record whose hold is
    /// nowhere stops the start, naming it, and the journal is kept.
    #[test]
    fn a_journaled_settle_lands_on_the_buckets_of_its_hold_found_in_the_journal_or_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = sqlite::ledger_path(dir.path());
        let mut seen = Vec::new();
        let (handle, writer) = start_sqlite(&path, &mut seen);
        let landed_hold = entry(1, 1_000);
        handle
            .append(vec![landed_hold.clone()], Vec::new())
            .wait_blocking()
            .unwrap();
        drop(handle);
        writer.join().unwrap();

        let killed = journal::Journal::start(dir.path(), &store_id(&path)).unwrap();
        let journaled_hold = entry(3, 3_000);
        let appends = vec![
            settle_of(&landed_hold, 700, 2),
            journaled_hold.clone(),
            settle_of(&journaled_hold, 2_500, 4),
        ];
        for e in appends {
            let settles = e.kind == EntryKind::Settle;
            let record = killed.assign(vec![e], Vec::new(), oneshot::channel().0, |_| {});
            let bytes = record.bytes().unwrap();
            let mut read = journal::binary_records(&bytes, 4).unwrap();
            assert_eq!(read.len(), 1);
            let Some(Some((_, spool::Spooled::Append { mut entries, .. }))) = read.pop() else {
                panic!("one whole append")
            };
            assert_eq!(entries.len(), 1);
            let e = entries.remove(0);
            assert_eq!(
                (e.needs_hold(), e.into_entry().detail.is_some()),
                (settles, !settles),
                "only a hold's own record carries its detail; a settle names it"
            );
            assert!(record.write());
        }
        drop(killed);

        let mut seen = Vec::new();
        let (handle, writer) = start_sqlite(&path, &mut seen);
        assert_eq!(seen, vec![1, 2, 3, 4]);
        drop(handle);
        writer.join().unwrap();
        let v = sqlite::verify(&path).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        let (held, spent): (i64, i64) = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT held, spent FROM counters", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(
            (held, spent),
            (0, 700 + 2_500),
            "both settles released their holds and spent on the same bucket"
        );

        // A settle of a hold that is nowhere.
        let killed = journal::Journal::start(dir.path(), &store_id(&path)).unwrap();
        let nowhere = entry(5, 5_000);
        let record = killed.assign(
            vec![settle_of(&nowhere, 1, 6)],
            Vec::new(),
            oneshot::channel().0,
            |_| {},
        );
        assert!(record.write());
        drop(killed);
        let refused = sqlite::open(
            &path,
            Durability::Process,
            bursar_core::engine::DEFAULT_IDEMPOTENCY_WINDOW,
            Recovery {
                on_entry: |_| {},
                on_catalog: |_| {},
                on_counters: |_| {},
            },
        );
        let Err(e) = refused else {
            panic!("a start with a settle of an unknown hold goes on")
        };
        assert!(
            e.to_string().contains(&nowhere.authorization.to_string()),
            "{e}"
        );
        assert_eq!(journal::waiting(dir.path()).len(), 1, "the journal is kept");
    }

    /// A backend whose writes wait until the test lets them through, then logs them.
    struct Stalled {
        open: Arc<AtomicBool>,
        log: Arc<parking_lot::Mutex<Vec<String>>>,
    }

    impl Backend for Stalled {
        fn write(&mut self, batch: &[Command]) -> Result<(), StoreError> {
            while !self.open.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
            Recorder {
                open: self.open.clone(),
                log: self.log.clone(),
            }
            .write(batch)
        }
        fn forget(&mut self) {}
        fn identity(&mut self) -> Result<String, StoreError> {
            Ok("stalled".into())
        }
        fn spool_landed(&mut self, _: Uuid) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    /// Journaled appends are answered while the writer is stuck in a commit; an empty
    /// append (a replayed answer) is not, it waits for what came before it. Segments
    /// rotate; each is deleted, and its mark forgotten, once all its commands landed.
    #[test]
    fn journaled_appends_are_answered_before_their_commit_and_land_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let open = Arc::new(AtomicBool::new(false));
        let log: Arc<parking_lot::Mutex<Vec<String>>> = Arc::default();
        // Segments of about two records each.
        let journal = journal::Journal::start_with(dir.path(), "stalled", 250).unwrap();
        let (handle, writer) = spawn_writer(
            Stalled {
                open: open.clone(),
                log: log.clone(),
            },
            None,
            Some(journal),
        )
        .unwrap();
        for n in 1..=10 {
            handle
                .append(vec![entry(n, 1_000)], Vec::new())
                .wait_blocking()
                .unwrap();
        }
        assert!(log.lock().is_empty(), "answered, nothing committed yet");
        let segments = journal::waiting(dir.path()).len();
        assert!(segments > 2, "segments rotated: {segments}");
        let (replayed, mut replayed_rx) = {
            let t = handle.append(Vec::new(), Vec::new());
            assert!(t.record.is_none(), "an empty append is not journaled");
            let (tx, rx) = std::sync::mpsc::channel();
            (
                thread::spawn(move || {
                    let r = t.wait_blocking();
                    let _ = tx.send(());
                    r
                }),
                rx,
            )
        };
        thread::sleep(Duration::from_millis(50));
        assert!(replayed_rx.try_recv().is_err(), "it waits for the commit");
        open.store(true, Ordering::SeqCst);
        replayed.join().unwrap().unwrap();
        let _ = &mut replayed_rx;
        handle.barrier().wait_blocking().unwrap();
        // Another batch, so the retired segments' marks are forgotten.
        handle
            .append(vec![entry(11, 1_000)], Vec::new())
            .wait_blocking()
            .unwrap();
        handle.barrier().wait_blocking().unwrap();
        // The marks of segments deleted by a batch are forgotten by the next one.
        handle.barrier().wait_blocking().unwrap();
        let live = journal::waiting(dir.path());
        assert_eq!(live.len(), 1, "the retired segments are deleted");
        let live = live[0].to_string_lossy().to_string();
        let log = log.lock().clone();
        let entries: Vec<&String> = log.iter().filter(|l| l.starts_with("entry")).collect();
        let expected: Vec<String> = (1..=11).map(|n| format!("entry {n}")).collect();
        assert_eq!(entries, expected.iter().collect::<Vec<_>>());
        // Every segment marked, every one but the live one forgotten.
        let id_of = |l: &String| l.split(' ').nth(1).unwrap_or_default().to_string();
        let mut marked: Vec<String> = log
            .iter()
            .filter(|l| l.starts_with("mark"))
            .map(id_of)
            .filter(|id| !live.contains(id.as_str()))
            .collect();
        marked.dedup();
        let forgotten: Vec<String> = log
            .iter()
            .filter(|l| l.starts_with("forget"))
            .map(id_of)
            .collect();
        assert!(marked.len() >= segments - 1, "{log:?}");
        assert_eq!(marked, forgotten, "{log:?}");
        drop(handle);
        writer.join().unwrap();
        assert!(
            journal::waiting(dir.path()).is_empty(),
            "a clean exit deletes the last"
        );
    }

    /// A backend whose store answers the idle check only while the test says it is up.
    struct Checked {
        up: Arc<AtomicBool>,
    }

    impl Backend for Checked {
        fn write(&mut self, _: &[Command]) -> Result<(), StoreError> {
            Ok(())
        }
        fn forget(&mut self) {}
        fn idle(&mut self) -> Result<(), StoreError> {
            if self.up.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(StoreError::Unavailable("down".into()))
            }
        }
        fn identity(&mut self) -> Result<String, StoreError> {
            Ok("checked".into())
        }
        fn spool_landed(&mut self, _: Uuid) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    /// Barriers (readers, the sweeper) come more often than the idle check's second; they
    /// write nothing, so they must not keep the writer from checking the store.
    #[test]
    fn barriers_do_not_hide_a_store_that_went_away() {
        let up = Arc::new(AtomicBool::new(true));
        let (handle, _join) = spawn_writer(Checked { up: up.clone() }, None, None).unwrap();
        up.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while handle.is_healthy() {
            assert!(Instant::now() < deadline, "the outage never showed");
            handle.barrier().wait_blocking().unwrap();
            thread::sleep(Duration::from_millis(200));
        }
        up.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !handle.is_healthy() {
            assert!(Instant::now() < deadline, "the return never showed");
            handle.barrier().wait_blocking().unwrap();
            thread::sleep(Duration::from_millis(200));
        }
    }

    #[test]
    fn a_store_away_fills_the_queue_to_its_bound_then_everything_lands_in_order() {
        let open = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicUsize::new(0));
        // Without a spool: the queue in memory is all there is.
        let (handle, _join) = spawn_writer(
            Gate {
                open: open.clone(),
                written: written.clone(),
            },
            None,
            None,
        )
        .unwrap();
        // The writer takes up to one batch out before the store fails it.
        let total = MAX_QUEUED_COMMANDS + MAX_BATCH_COMMANDS + 100;
        let h = handle.clone();
        let sender = thread::spawn(move || {
            (0..total)
                .map(|_| h.append(Vec::new(), Vec::new()))
                .collect::<Vec<_>>()
        });
        // The first batch fails and is retried; the rest queue up to the bound, and the
        // sender waits there.
        let deadline = Instant::now() + Duration::from_secs(20);
        while handle.queued() < MAX_QUEUED_COMMANDS {
            assert!(Instant::now() < deadline, "the queue never filled");
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(100));
        assert!(!handle.is_healthy());
        assert!(!sender.is_finished(), "the sender waits for room");
        assert!(handle.queued() <= MAX_QUEUED_COMMANDS + 1);
        assert!(
            !handle.can_queue(),
            "without a spool, fail-open tenants are refused"
        );
        assert_eq!(written.load(Ordering::SeqCst), 0);
        // The store returns: everything lands, and every ticket resolves.
        open.store(true, Ordering::SeqCst);
        let tickets = sender.join().unwrap();
        for t in tickets {
            t.wait_blocking().unwrap();
        }
        assert_eq!(written.load(Ordering::SeqCst), total);
        assert!(handle.is_healthy());
        assert_eq!(handle.queued(), 0);
    }

    /// A second start on a data directory a running process holds is refused, naming
    /// it; once that process's writer has ended, the directory opens again.
    #[test]
    fn one_process_at_a_time_holds_a_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = sqlite::ledger_path(dir.path());
        let (handle, writer) = start_sqlite(&path, &mut Vec::new());
        let Err(StoreError::Unavailable(why)) = open_sqlite(&path, |_| {}) else {
            panic!("a held directory was opened again");
        };
        assert!(why.contains("in use by another running bursar"), "{why}");
        assert!(why.contains(&dir.path().display().to_string()), "{why}");
        handle
            .append(vec![entry(1, 0)], Vec::new())
            .wait_blocking()
            .unwrap();
        drop(handle);
        writer.join().unwrap();
        let mut seen = Vec::new();
        let (handle, writer) = start_sqlite(&path, &mut seen);
        assert_eq!(seen, vec![1], "the first process's entry is there");
        drop(handle);
        writer.join().unwrap();
    }

    /// The embedded reader skips the query for an idempotency key no hold has, through a
    /// filter of the stored keys: so the filter must know every stored key of the
    /// idempotency window, those from before a restart (loaded at start) and those
    /// written since (added by the writer). A key older than the window is not found.
    #[test]
    fn every_stored_idempotency_key_of_the_window_is_found_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = sqlite::ledger_path(dir.path());
        let day_ms = 24 * 3_600_000;
        let window_ms = 7 * day_ms;
        let keyed = |n: u64, key: &str, days_ago: i64| {
            let mut e = entry(n, 1_000);
            e.at_ms -= days_ago * day_ms;
            if let Some(d) = e.detail.as_mut() {
                Arc::make_mut(d).idempotency_key = Some(key.to_string());
            }
            e
        };
        // What the server asks: holds since the window's start (the entries' "now" is
        // `entry`'s time base).
        let since = entry(0, 0).at_ms - window_ms;
        let held = |reader: &Reader, tenant: &str, key: &str, since: i64| {
            let Reader::Sqlite(r) = reader else {
                panic!("the embedded store has the embedded reader")
            };
            r.hold_by_idempotency_key(tenant, key, since)
                .unwrap()
                .map(|h| h.detail.quantity)
        };
        let open = || open_sqlite(&path, |_| {}).unwrap();
        let first = open();
        first
            .handle
            .append(
                vec![
                    keyed(1, "k-old", 30),
                    keyed(2, "k-1", 6),
                    keyed(3, "k-2", 0),
                ],
                Vec::new(),
            )
            .wait_blocking()
            .unwrap();
        first.handle.barrier().wait_blocking().unwrap();
        assert_eq!(held(&first.reader, "t", "k-1", since), Some(2));
        assert_eq!(
            held(&first.reader, "t", "k-old", since),
            None,
            "past the window"
        );
        drop(first.handle);
        first.writer.join().unwrap();

        let again = open();
        assert_eq!(
            held(&again.reader, "t", "k-1", since),
            Some(2),
            "stored before"
        );
        assert_eq!(
            held(&again.reader, "t", "k-2", since),
            Some(3),
            "stored before"
        );
        assert_eq!(held(&again.reader, "t", "k-3", since), None);
        assert_eq!(
            held(&again.reader, "other", "k-1", since),
            None,
            "keys are per tenant"
        );
        assert_eq!(
            held(&again.reader, "t", "k-old", since),
            None,
            "past the window"
        );
        assert_eq!(
            held(&again.reader, "t", "k-old", 0),
            Some(1),
            "the ledger keeps it: a look-up from before the window is asked of the ledger"
        );
        again
            .handle
            .append(vec![keyed(4, "k-3", 0)], Vec::new())
            .wait_blocking()
            .unwrap();
        again.handle.barrier().wait_blocking().unwrap();
        assert_eq!(
            held(&again.reader, "t", "k-3", since),
            Some(4),
            "written since"
        );
        drop(again.handle);
        again.writer.join().unwrap();
    }

    /// The plan SQLite makes for `sql` on the ledger at `path`, its steps joined.
    fn query_plan(path: &std::path::Path, sql: &str, params: impl rusqlite::Params) -> String {
        let conn = rusqlite::Connection::open(path).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(params, |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        plan.join("; ")
    }

    /// A start reads the keys of the window through the index of keyed holds by time,
    /// not by a scan of every keyed hold the ledger ever had; a forgotten key is looked
    /// up through the index by tenant and key.
    #[test]
    fn keyed_holds_are_read_through_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let path = sqlite::ledger_path(dir.path());
        let opened = open_sqlite(&path, |_| {}).unwrap();
        drop(opened.handle);
        opened.writer.join().unwrap();
        let plan = query_plan(&path, sqlite::KEYS_OF_THE_WINDOW, [0i64]);
        assert!(
            plan.contains("USING INDEX ledger_idempotency_time"),
            "the plan: {plan}"
        );
        let plan = query_plan(
            &path,
            sqlite::HOLD_BY_IDEMPOTENCY_KEY,
            rusqlite::params!["t", "k", 0i64],
        );
        assert!(
            plan.contains("USING INDEX ledger_idempotency (tenant=? AND <expr>=?)"),
            "the plan: {plan}"
        );
    }
}
