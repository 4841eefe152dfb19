//! The local spool: what the ledger writer keeps on this machine's disk while the store
//! is away, and lands in the store, in order and once, when it returns — or at the next
//! start, if the process died meanwhile.
//!
//! A batch whose transaction fails (after the backend's own retry on a fresh
//! connection) starts a spool file, `spool-<id>.jsonl` in the data directory, locked by
//! this process. That batch and every command after it go to the file, in order, one
//! JSON line per batch, written through (and synced, with `power` durability) before
//! their tickets resolve as [`Kept::Spooled`](crate::Kept::Spooled). A caller that may be
//! answered without the store (a tenant that fails open) is answered then; the others
//! hear that the store is away (fail closed).
//!
//! Landing: the writer writes the file's batches in order, one transaction each, each
//! with a mark ("batch n of spool id has landed", [`Command::SpoolMark`]) in the same
//! transaction; when the last one has landed it deletes the file and writes directly
//! again. A start lands every spool file of its data directory that no live process
//! holds, after its mark, before it takes any call. So every batch lands exactly once,
//! whenever the process dies. A batch whose commit was in doubt when it failed
//! (PostgreSQL may have committed it just before its connection went) carries the
//! chain position it would have taken, and is not written again if it is there.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bursar_core::ledger::{AlertEvent, Entry, HoldDetail};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::journal::JournalPos;
use crate::{Backend, CatalogRow, Command, Durability, StoreError};

/// Where a writer spools, and for which store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// The data directory (the embedded store's, or the one given to an instance on
    /// PostgreSQL).
    pub dir: PathBuf,
    /// The store's identity ([`Backend::identity`]): a spool lands only where it was
    /// written for.
    pub store: String,
    pub durability: Durability,
}

/// The chain position a failed commit may have taken: the sequence number and hash of
/// its last entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InDoubt {
    pub seq: i64,
    pub hash: [u8; 32],
}

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Header {
    spool: Uuid,
    store: String,
    format: u32,
}

#[derive(Deserialize)]
struct Line {
    n: u64,
    #[serde(default)]
    in_doubt: Option<InDoubt>,
    commands: Vec<Spooled>,
}

/// One command as written to a spool (or, an append, to a journal record).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Spooled {
    Append {
        entries: Vec<SpooledEntry>,
        alerts: Vec<AlertEvent>,
        /// Its journal record, if it has one: landing it moves the journal's mark too.
        #[serde(default)]
        journal: Option<JournalPos>,
    },
    Catalog {
        kind: String,
        id: String,
        body: Option<String>,
    },
}

#[derive(Deserialize)]
pub(crate) struct SpooledEntry {
    entry: Entry,
    /// The hold an entry acts on (not part of an entry's own serialized form): its
    /// buckets are what a landed settle changes. Absent from a journal record.
    #[serde(default)]
    hold: Option<Arc<HoldDetail>>,
    /// In a journal record: the entry acts on the hold of its authorization, to be
    /// looked up when it lands.
    #[serde(default)]
    on_hold: bool,
}

impl SpooledEntry {
    /// An entry as a journal record of format 4 carries it: acting on a hold it names by
    /// its authorization (`on_hold`), or on none.
    pub(crate) fn named_hold(entry: Entry, on_hold: bool) -> SpooledEntry {
        SpooledEntry {
            entry,
            hold: None,
            on_hold,
        }
    }

    /// Whether it acts on a hold it does not carry (a journal record's).
    pub(crate) fn needs_hold(&self) -> bool {
        self.on_hold && self.hold.is_none()
    }

    pub(crate) fn into_entry(self) -> Entry {
        Entry {
            hold: self.hold,
            ..self.entry
        }
    }
}

// The same shapes, borrowed, for writing a batch without copying it.
#[derive(Serialize)]
struct LineRef<'a> {
    n: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_doubt: Option<InDoubt>,
    commands: Vec<SpooledRef<'a>>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum SpooledRef<'a> {
    Append {
        entries: Vec<SpooledEntryRef<'a>>,
        alerts: &'a [AlertEvent],
        #[serde(skip_serializing_if = "Option::is_none")]
        journal: Option<JournalPos>,
    },
    Catalog {
        kind: &'a str,
        id: &'a str,
        body: Option<&'a str>,
    },
}

#[derive(Serialize)]
struct SpooledEntryRef<'a> {
    entry: &'a Entry,
    #[serde(skip_serializing_if = "Option::is_none")]
    hold: Option<&'a HoldDetail>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    on_hold: bool,
}

/// The entries as written: each with the hold it acts on, or (`hold_by_id`, a journal
/// record's form) only marked as acting on one.
fn entry_refs(entries: &[Entry], hold_by_id: bool) -> Vec<SpooledEntryRef<'_>> {
    entries
        .iter()
        .map(|e| SpooledEntryRef {
            entry: e,
            hold: e.hold.as_deref().filter(|_| !hold_by_id),
            on_hold: hold_by_id && e.hold.is_some(),
        })
        .collect()
}

/// Adds an append to `out` as one JSON object, the form a journal record of format 2
/// carries (still read; written now by tests only). Unlike a spooled one, an entry acting
/// on a hold names it by id only: the hold is in the store or earlier in the journal when
/// the record lands ([`crate::journal`]), and a record half the size costs half the
/// serializing and writing on the request's path.
#[cfg(test)]
pub(crate) fn append_json(
    out: &mut Vec<u8>,
    entries: &[Entry],
    alerts: &[AlertEvent],
) -> Result<(), serde_json::Error> {
    serde_json::to_writer(
        out,
        &SpooledRef::Append {
            entries: entry_refs(entries, true),
            alerts,
            journal: None,
        },
    )
}

/// An append as a journal record of format 3 carries it (still read; written now by tests
/// only): the fields of a format-2 record (an entry acting on a hold names it by id only),
/// as MessagePack with named fields, read back by the same types.
#[cfg(test)]
pub(crate) fn append_msgpack(
    out: &mut Vec<u8>,
    entries: &[Entry],
    alerts: &[AlertEvent],
) -> Result<(), rmp_serde::encode::Error> {
    rmp_serde::encode::write_named(
        out,
        &SpooledRef::Append {
            entries: entry_refs(entries, true),
            alerts,
            journal: None,
        },
    )
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io(format!("spool: {e}"))
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("spool {}: {e}", path.display()))
}

/// A batch read back, not landed yet.
struct Unlanded {
    n: u64,
    commands: Vec<Command>,
    in_doubt: Option<InDoubt>,
}

/// One spool file, held (locked) by this process.
pub(crate) struct Spool {
    id: Uuid,
    path: PathBuf,
    file: File,
    /// The file's length after the last whole batch written.
    len: u64,
    reader: BufReader<File>,
    durability: Durability,
    /// The number of the next batch written.
    next: u64,
    /// Batches landed (from the store's mark, for a spool found at start).
    landed: u64,
    unlanded: Option<Unlanded>,
}

impl Spool {
    /// Starts a new spool file.
    pub(crate) fn create(config: &SpoolConfig) -> Result<Spool, StoreError> {
        std::fs::create_dir_all(&config.dir).map_err(io)?;
        let id = Uuid::now_v7();
        let path = config.dir.join(format!("spool-{id}.jsonl"));
        let mut header = serde_json::to_vec(&Header {
            spool: id,
            store: config.store.clone(),
            format: FORMAT,
        })
        .map_err(|e| corrupt(&path, e))?;
        header.push(b'\n');
        let file = create_locked(&config.dir, &format!("spool-{id}.jsonl"), &header).map_err(io)?;
        if config.durability == Durability::Power {
            file.sync_all().map_err(io)?;
            // The file's name must outlive a power cut too.
            File::open(&config.dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        let mut reader = BufReader::new(File::open(&path).map_err(io)?);
        reader
            .seek(SeekFrom::Start(header.len() as u64))
            .map_err(io)?;
        tracing::warn!(spool = %path.display(), "the store is away: the ledger's entries go to a local spool until it returns");
        Ok(Spool {
            id,
            path,
            file,
            len: header.len() as u64,
            reader,
            durability: config.durability,
            next: 1,
            landed: 0,
            unlanded: None,
        })
    }

    /// A spool file left by an earlier run, unless a live process holds it or it was
    /// written for another store.
    fn open_left(path: &Path, config: &SpoolConfig) -> Result<Option<Spool>, StoreError> {
        let Some(file) = lock_left(path).map_err(io)? else {
            return Ok(None);
        };
        let mut reader = BufReader::new(File::open(path).map_err(io)?);
        let mut first = String::new();
        reader.read_line(&mut first).map_err(io)?;
        if !first.ends_with('\n') {
            // Cut while its header was written: nothing in it was ever acknowledged.
            tracing::warn!(spool = %path.display(), "an empty spool is removed");
            std::fs::remove_file(path).map_err(io)?;
            return Ok(None);
        }
        let header: Header = serde_json::from_str(&first).map_err(|e| corrupt(path, e))?;
        if header.format != FORMAT {
            return Err(corrupt(
                path,
                format!("format {} is not known to this version", header.format),
            ));
        }
        if header.store != config.store {
            tracing::error!(spool = %path.display(), "this spool was written for another store; it is left as it is");
            return Ok(None);
        }
        Ok(Some(Spool {
            id: header.spool,
            path: path.to_path_buf(),
            len: 0,
            file,
            reader,
            durability: config.durability,
            next: u64::MAX,
            landed: 0,
            unlanded: None,
        }))
    }

    /// Adds a batch at the end. On an error the file is as it was before.
    pub(crate) fn append(
        &mut self,
        batch: &[Command],
        in_doubt: Option<InDoubt>,
    ) -> Result<(), StoreError> {
        let commands = batch
            .iter()
            .filter_map(|c| match c {
                Command::Append {
                    entries,
                    alerts,
                    journal,
                    ..
                } => Some(SpooledRef::Append {
                    entries: entry_refs(entries, false),
                    alerts,
                    journal: *journal,
                }),
                Command::Catalog { row, .. } => Some(SpooledRef::Catalog {
                    kind: &row.kind,
                    id: &row.id,
                    body: row.body.as_deref(),
                }),
                Command::SpoolMark { .. }
                | Command::ForgetMark { .. }
                | Command::Barrier { .. }
                | Command::Retire { .. } => None,
            })
            .collect();
        let mut line = serde_json::to_vec(&LineRef {
            n: self.next,
            in_doubt,
            commands,
        })
        .map_err(|e| corrupt(&self.path, e))?;
        line.push(b'\n');
        let written = self.file.write_all(&line).and_then(|()| {
            if self.durability == Durability::Power {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // A torn line would hide every batch after it: cut it off.
            let _ = self.file.set_len(self.len);
            return Err(io(e));
        }
        self.len += line.len() as u64;
        self.next += 1;
        Ok(())
    }

    /// Reads the next whole batch; `None` at the end (or at a line cut by a crash,
    /// which no caller was told about).
    fn read_next(&mut self) -> Result<Option<Unlanded>, StoreError> {
        let mut text = String::new();
        let read = self.reader.read_line(&mut text).map_err(io)?;
        if read == 0 {
            return Ok(None);
        }
        if !text.ends_with('\n') {
            tracing::warn!(spool = %self.path.display(), "a batch cut by a crash is left out: nobody was told it was kept");
            return Ok(None);
        }
        let line: Line = serde_json::from_str(&text).map_err(|e| corrupt(&self.path, e))?;
        let commands = line
            .commands
            .into_iter()
            .map(|c| match c {
                Spooled::Append {
                    entries,
                    alerts,
                    journal,
                } => Command::Append {
                    entries: entries.into_iter().map(SpooledEntry::into_entry).collect(),
                    alerts: alerts.into(),
                    // Nobody waits on a batch read back.
                    done: oneshot::channel().0,
                    journal,
                },
                Spooled::Catalog { kind, id, body } => Command::Catalog {
                    row: CatalogRow { kind, id, body },
                    done: oneshot::channel().0,
                },
            })
            .collect();
        Ok(Some(Unlanded {
            n: line.n,
            commands,
            in_doubt: line.in_doubt,
        }))
    }

    /// Lands batches in order, one transaction each with its mark, at most `most` of
    /// them; `Ok(true)` once every batch written has landed.
    pub(crate) fn land(
        &mut self,
        backend: &mut impl Backend,
        most: usize,
    ) -> Result<bool, StoreError> {
        for _ in 0..most {
            let mut batch = match self.unlanded.take() {
                Some(b) => b,
                None => match self.read_next()? {
                    Some(b) => b,
                    None => return Ok(true),
                },
            };
            if batch.n <= self.landed {
                continue;
            }
            if let Some(d) = batch.in_doubt.take() {
                backend.expect_in_doubt(Some(d));
            }
            batch.commands.push(Command::SpoolMark {
                spool: self.id,
                through: batch.n,
            });
            let written = crate::write_marked(backend, &mut batch.commands);
            batch.commands.pop();
            match written {
                Ok(()) => self.landed = batch.n,
                Err(e) => {
                    self.unlanded = Some(batch);
                    return Err(e);
                }
            }
        }
        Ok(false)
    }

    /// Batches landed so far.
    pub(crate) fn landed(&self) -> u64 {
        self.landed
    }

    /// Batches written and not landed yet (the `bursar_spool_batches` gauge).
    pub(crate) fn waiting(&self) -> u64 {
        (self.next - 1).saturating_sub(self.landed)
    }

    /// Deletes the file, every batch of it landed.
    pub(crate) fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::error!(spool = %self.path.display(), error = %e, "a landed spool could not be removed; the next start skips what it landed");
        }
    }
}

/// The spool files in `dir`: entries kept while the store was away, not in the ledger
/// until a start (or the process that holds one) lands them.
pub fn waiting(dir: &Path) -> Vec<PathBuf> {
    spool_files(dir).unwrap_or_default()
}

/// The spool files in `dir`, oldest first; none when there is no such directory yet.
fn spool_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    files_named(dir, "spool-", ".jsonl")
}

/// The files in `dir` named `<prefix>…<suffix>`, oldest first (spool and journal ids are
/// time-ordered UUID v7); none when there is no such directory yet.
pub(crate) fn files_named(dir: &Path, prefix: &str, suffix: &str) -> std::io::Result<Vec<PathBuf>> {
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found: Vec<PathBuf> = listing
        .filter_map(Result::ok)
        .map(|d| d.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Opens and locks a file an earlier run left (a spool or a journal segment); `None` if a
/// live process holds it.
pub(crate) fn lock_left(path: &Path) -> std::io::Result<Option<File>> {
    let file = OpenOptions::new().append(true).open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => {
            tracing::info!(file = %path.display(), "a file held by a live process is left to it");
            Ok(None)
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Creates the file `name` in `dir`, locked by this process, with `header` in it. It is
/// made under another name and named only once locked with its header written: a start
/// of another instance on this directory never takes it for one left behind.
pub(crate) fn create_locked(dir: &Path, name: &str, header: &[u8]) -> std::io::Result<File> {
    let making = dir.join(format!(".{name}.new"));
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&making)?;
    if let Err(std::fs::TryLockError::Error(e)) = file.try_lock() {
        return Err(e);
    }
    file.write_all(header)?;
    std::fs::rename(&making, dir.join(name))?;
    Ok(file)
}

/// Deletes the files a process died making ([`create_locked`]) whose names start with
/// `prefix`: they hold a header at most, nothing acknowledged.
pub(crate) fn remove_unfinished(dir: &Path, prefix: &str) {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return;
    };
    for path in listing.filter_map(Result::ok).map(|d| d.path()) {
        let making = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!(".{prefix}")) && n.ends_with(".new"));
        if making && File::open(&path).is_ok_and(|f| f.try_lock().is_ok()) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Lands every spool file an earlier run left in the data directory (oldest first),
/// before a start replays anything.
pub(crate) fn land_left_spools(
    config: &SpoolConfig,
    backend: &mut impl Backend,
) -> Result<(), StoreError> {
    remove_unfinished(&config.dir, "spool-");
    for path in spool_files(&config.dir).map_err(io)? {
        let Some(mut spool) = Spool::open_left(&path, config)? else {
            continue;
        };
        spool.landed = backend.spool_landed(spool.id)?;
        spool.land(backend, usize::MAX)?;
        tracing::info!(spool = %path.display(), batches = spool.landed, "a spool left by an earlier run has landed");
        spool.remove();
    }
    Ok(())
}
