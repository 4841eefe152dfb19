//! The intent journal: how an append to the embedded ledger is made durable on the
//! caller's own thread, without waiting for the writer's transaction.
//!
//! With `process` durability (the embedded store's default), a commit in SQLite's WAL is
//! durable once its frames are in the operating system's page cache: a killed process
//! loses nothing, a power cut may. One `write` of the entry to a file of its own gives
//! the same guarantee, in a few microseconds, without handing the entry to the writer
//! thread and waiting for its transaction (the hand-off alone, two thread switches, cost
//! more than the rest of a decision). So with a journal:
//!
//! - the handle, under the journal's lock, gives the entries the next sequence number
//!   and sends their command to the writer: the channel's order is the sequence's
//!   order. The entries are shared between the command and the caller's record;
//! - the caller's ticket serializes the record (below), writes it with one `write` on
//!   the segment file (opened for appending) and resolves when it returns. A record cut
//!   by a crash was never acknowledged: its checksum fails, and reading goes on at the
//!   next record's mark, so the records after it stay whole. An entry that acts on a
//!   hold (a settle, say) names it by id only: landing finds it earlier in the journal
//!   or in the store;
//! - the writer commits the commands in batches as before, and writes in the same
//!   transaction the segment's mark: every record up to this sequence number has
//!   landed ([`Command::SpoolMark`], the spool's mark);
//! - a start lands what a killed process left after the mark, in sequence order, before
//!   it replays anything (after the spools: a spooled command carries its journal
//!   position, so landing it moves the journal's mark too).
//!
//! An empty append (a replayed answer, which must wait for the original's entries) and
//! appends while the store fails are not journaled: their tickets wait for the writer.
//! If a record cannot be written whole, the journal is switched off for good (the
//! ticket, and every later one, waits for the writer instead).
//!
//! A segment holds up to [`SEGMENT_BYTES`]; the next starts a new file, and the writer
//! deletes the old one once every command before the switch has landed, then forgets
//! its mark. A clean exit deletes the last one.
//!
//! A segment is a JSON header line (`{"journal":…,"store":…,"format":4}`), then records.
//! A record of format 4 is [`MARK`], the payload's length (u32, little-endian), the
//! CRC-32 of the sequence number and payload (u32), the sequence number (u64), then the
//! payload: the append's fields in a fixed order, written by hand ([`crate::record`]).
//! Format 3 (the same frame after the mark [`MARK_3`], the payload MessagePack with
//! named fields) and formats 1 and 2 (`\n<seq> <json>\n` records), written by earlier
//! versions, are still read. A binary record whose checksum holds but whose payload
//! cannot be read is not a crash's cut: the start stops, naming it, and the journal is
//! kept.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bursar_core::ledger::{AlertEvent, Entry, HoldDetail};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::spool::{self, Spooled};
use crate::{write_marked, Backend, Command, StoreError};

/// A segment's size before the next one is started.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Commands landed in one transaction at start.
const LAND_BATCH: usize = 1_024;
/// The record format written: 4 is binary, its payload written by hand (see the module's
/// documentation). Still read: 3, the same frame around MessagePack with named fields;
/// 2, `\n<seq> <json>\n` naming the hold an entry acts on by id only; and 1, the same
/// with the hold's whole detail.
const FORMAT: u32 = 4;
/// What starts each record of format 4: after a record cut by a crash, reading goes on
/// at the next one. A payload may hold the same four bytes; the checksum, not the mark,
/// tells a record from them.
pub(crate) const MARK: [u8; 4] = [0xB5, b'B', b'J', b'4'];
/// What started each record of format 3.
pub(crate) const MARK_3: [u8; 4] = [0xB5, b'B', b'J', b'3'];
/// A binary record's bytes before its payload: mark, length, checksum, sequence.
const RECORD_HEAD: usize = 4 + 4 + 4 + 8;

/// Where a command's record is: its segment and sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalPos {
    pub segment: Uuid,
    pub seq: u64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    journal: Uuid,
    store: String,
    format: u32,
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io(format!("journal: {e}"))
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("journal {}: {e}", path.display()))
}

/// One segment file, locked by this process while it lives.
pub struct Segment {
    pub(crate) id: Uuid,
    path: PathBuf,
    file: File,
    /// Bytes of records written so far: past [`Journal`]'s segment size, the next
    /// record starts a new segment.
    written: AtomicU64,
    broken: Arc<AtomicBool>,
}

impl Segment {
    fn create(dir: &Path, store: &str, broken: Arc<AtomicBool>) -> Result<Segment, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let id = Uuid::now_v7();
        let name = format!("journal-{id}.log");
        let path = dir.join(&name);
        let mut header = serde_json::to_vec(&Header {
            journal: id,
            store: store.to_string(),
            format: FORMAT,
        })
        .map_err(|e| corrupt(&path, e))?;
        header.push(b'\n');
        let file = spool::create_locked(dir, &name, &header).map_err(io)?;
        Ok(Segment {
            id,
            path,
            file,
            written: AtomicU64::new(0),
            broken,
        })
    }

    /// Writes one record with one `write`; whether all of it was written.
    fn write(&self, record: &[u8]) -> bool {
        match (&self.file).write(record) {
            Ok(n) if n == record.len() => {
                self.written.fetch_add(n as u64, Ordering::Relaxed);
                true
            }
            done => self.fail(&done.map_err(|e| e.to_string())),
        }
    }

    /// A record could not be written whole: the journal is off from now on.
    fn fail(&self, why: &dyn std::fmt::Debug) -> bool {
        if !self.broken.swap(true, Ordering::SeqCst) {
            tracing::error!(journal = %self.path.display(), result = ?why, "a journal record could not be written whole: appends wait for the ledger's commit from now on");
        }
        false
    }

    /// Deletes the file: every record in it has landed.
    pub(crate) fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::error!(journal = %self.path.display(), error = %e, "a landed journal segment could not be removed; the next start skips what it landed");
        }
    }
}

/// A record waiting to be written by the ticket of its command: its entries are shared
/// with the command, and serialized by whoever waits, outside every lock.
pub(crate) struct Record {
    segment: Arc<Segment>,
    seq: u64,
    entries: Arc<[Entry]>,
    alerts: Arc<[AlertEvent]>,
}

impl Record {
    /// The record, format 4: mark, length, checksum, sequence number, payload.
    pub(crate) fn bytes(&self) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        self.framed(MARK, |bytes| {
            crate::record::encode(bytes, &self.entries, &self.alerts)
        })
    }

    /// The record as format 3 wrote it: what an older version's journal holds.
    #[cfg(test)]
    pub(crate) fn format_3_bytes(&self) -> Vec<u8> {
        let framed = self.framed(MARK_3, |bytes| {
            spool::append_msgpack(bytes, &self.entries, &self.alerts)
        });
        match framed {
            Ok(bytes) => bytes,
            Err(e) => panic!("a test's record serializes: {e}"),
        }
    }

    /// `mark`, then the length and checksum of the payload `payload` writes, the
    /// sequence number, and the payload.
    fn framed(
        &self,
        mark: [u8; 4],
        payload: impl FnOnce(&mut Vec<u8>) -> Result<(), rmp_serde::encode::Error>,
    ) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&mark);
        // The length and checksum, once the payload is written.
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(&self.seq.to_le_bytes());
        payload(&mut bytes)?;
        let len = u32::try_from(bytes.len() - RECORD_HEAD)
            .map_err(|_| rmp_serde::encode::Error::Syntax("a journal record over 4 GiB".into()))?;
        let crc = crc32fast::hash(&bytes[12..]);
        bytes[4..8].copy_from_slice(&len.to_le_bytes());
        bytes[8..12].copy_from_slice(&crc.to_le_bytes());
        Ok(bytes)
    }

    /// The record as format 2 wrote it (`\n<seq> <json>\n`): what an older version's
    /// journal holds.
    #[cfg(test)]
    pub(crate) fn format_2_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![b'\n'];
        bytes.extend_from_slice(itoa::Buffer::new().format(self.seq).as_bytes());
        bytes.push(b' ');
        if let Err(e) = spool::append_json(&mut bytes, &self.entries, &self.alerts) {
            panic!("a test's record serializes: {e}");
        }
        bytes.push(b'\n');
        bytes
    }

    /// Writes it; whether the command may be acknowledged now.
    pub(crate) fn write(self) -> bool {
        match self.bytes() {
            Ok(bytes) => self.segment.write(&bytes),
            Err(e) => self.segment.fail(&e),
        }
    }
}

struct Current {
    segment: Arc<Segment>,
    next: u64,
}

/// This process's journal (one per writer).
pub struct Journal {
    dir: PathBuf,
    store: String,
    segment_bytes: u64,
    current: parking_lot::Mutex<Current>,
    broken: Arc<AtomicBool>,
    /// The alerts of the appends that have none (most): shared, not made for each.
    no_alerts: Arc<[AlertEvent]>,
}

impl Journal {
    /// Starts a journal in `dir` for the store `store`.
    pub(crate) fn start(dir: &Path, store: &str) -> Result<Journal, StoreError> {
        Self::start_with(dir, store, SEGMENT_BYTES)
    }

    /// [`Journal::start`], with segments of `segment_bytes`.
    pub(crate) fn start_with(
        dir: &Path,
        store: &str,
        segment_bytes: u64,
    ) -> Result<Journal, StoreError> {
        let broken = Arc::new(AtomicBool::new(false));
        let segment = Arc::new(Segment::create(dir, store, broken.clone())?);
        Ok(Journal {
            dir: dir.to_path_buf(),
            store: store.to_string(),
            segment_bytes,
            no_alerts: Arc::new([]),
            current: parking_lot::Mutex::new(Current { segment, next: 1 }),
            broken,
        })
    }

    /// Whether records are written (no record has failed).
    pub(crate) fn works(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
    }

    /// The segment written now.
    pub(crate) fn segment(&self) -> Arc<Segment> {
        self.current.lock().segment.clone()
    }

    /// Gives the entries the next sequence number and hands their command to `send`
    /// under the journal's lock (so the writer sees them in sequence order); returns the
    /// record for the caller's ticket to write.
    pub(crate) fn assign(
        &self,
        entries: Vec<Entry>,
        alerts: Vec<AlertEvent>,
        done: oneshot::Sender<Result<crate::Kept, StoreError>>,
        mut send: impl FnMut(Command),
    ) -> Record {
        let entries: Arc<[Entry]> = entries.into();
        let alerts: Arc<[AlertEvent]> = if alerts.is_empty() {
            self.no_alerts.clone()
        } else {
            alerts.into()
        };
        let mut c = self.current.lock();
        if c.segment.written.load(Ordering::Relaxed) >= self.segment_bytes {
            match Segment::create(&self.dir, &self.store, self.broken.clone()) {
                Ok(s) => {
                    let old = std::mem::replace(&mut c.segment, Arc::new(s));
                    // Every command of the old segment is before this in the channel.
                    send(Command::Retire { segment: old });
                    c.next = 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "a new journal segment could not be started; the current one grows");
                }
            }
        }
        let seq = c.next;
        c.next += 1;
        let segment = c.segment.clone();
        send(Command::Append {
            entries: entries.clone(),
            alerts: alerts.clone(),
            done,
            journal: Some(JournalPos {
                segment: segment.id,
                seq,
            }),
        });
        drop(c);
        Record {
            segment,
            seq,
            entries,
            alerts,
        }
    }
}

/// The journal segment files in `dir`, oldest first.
pub fn waiting(dir: &Path) -> Vec<PathBuf> {
    segment_files(dir).unwrap_or_default()
}

fn segment_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    spool::files_named(dir, "journal-", ".log")
}

/// Lands what earlier runs left in their journals, after their marks and in sequence
/// order, then deletes the files and forgets their marks. Segments a live process holds,
/// and segments of another store, are left alone.
pub(crate) fn land_left(
    dir: &Path,
    store: &str,
    backend: &mut impl Backend,
) -> Result<(), StoreError> {
    spool::remove_unfinished(dir, "journal-");
    for path in segment_files(dir).map_err(io)? {
        // Held (locked) while the text is read and the file deleted.
        let Some(_held) = spool::lock_left(&path).map_err(io)? else {
            continue;
        };
        let text = std::fs::read(&path).map_err(io)?;
        let (first, body) = match text.iter().position(|b| *b == b'\n') {
            Some(at) => (&text[..at], &text[at + 1..]),
            None => (&text[..], &[][..]),
        };
        let Ok(header) = serde_json::from_slice::<Header>(first) else {
            // Cut while its header was written: nothing in it was acknowledged.
            tracing::warn!(journal = %path.display(), "a journal without a whole header is removed");
            std::fs::remove_file(&path).map_err(io)?;
            continue;
        };
        if !(1..=FORMAT).contains(&header.format) {
            return Err(corrupt(
                &path,
                format!("format {} is not known to this version", header.format),
            ));
        }
        if header.store != store {
            tracing::error!(journal = %path.display(), "this journal was written for another store; it is left as it is");
            continue;
        }
        let read = if header.format >= 3 {
            binary_records(body, header.format).map_err(|e| corrupt(&path, e))?
        } else {
            body.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(parse_line)
                .collect()
        };
        let mark = backend.spool_landed(header.journal)?;
        let mut records = Vec::new();
        let mut cut = 0usize;
        for record in read {
            match record {
                Some((seq, _)) if seq <= mark => {}
                Some((
                    seq,
                    Spooled::Append {
                        entries, alerts, ..
                    },
                )) => records.push((seq, entries, alerts)),
                Some((_, Spooled::Catalog { .. })) | None => cut += 1,
            }
        }
        if cut > 0 {
            tracing::warn!(journal = %path.display(), records = cut, "records cut by a crash are left out: nobody was told they were kept");
        }
        records.sort_by_key(|(seq, ..)| *seq);
        let landing = records.len();
        // The holds that entries act on: earlier in this journal, or in the store (an
        // older segment, or a spool, landed before this one).
        let mut holds: HashMap<Uuid, Arc<HoldDetail>> = HashMap::new();
        let mut commands = Vec::with_capacity(records.len());
        for (seq, spooled, alerts) in records {
            let mut entries = Vec::with_capacity(spooled.len());
            for s in spooled {
                let needs_hold = s.needs_hold();
                let mut e = s.into_entry();
                if let Some(d) = &e.detail {
                    holds.insert(e.authorization, d.clone());
                } else if needs_hold {
                    let hold = match holds.get(&e.authorization) {
                        Some(d) => d.clone(),
                        None => {
                            let d = backend.hold_detail(e.authorization)?.ok_or_else(|| {
                                corrupt(
                                    &path,
                                    format!(
                                        "record {seq} acts on hold `{}`, which is neither in the store nor earlier in the journal",
                                        e.authorization
                                    ),
                                )
                            })?;
                            let d = Arc::new(d);
                            holds.insert(e.authorization, d.clone());
                            d
                        }
                    };
                    e.hold = Some(hold);
                }
                entries.push(e);
            }
            commands.push(Command::Append {
                entries: entries.into(),
                alerts: alerts.into(),
                done: oneshot::channel().0,
                journal: Some(JournalPos {
                    segment: header.journal,
                    seq,
                }),
            });
        }
        let mut records = commands.into_iter().peekable();
        while records.peek().is_some() {
            let mut batch: Vec<Command> = records.by_ref().take(LAND_BATCH).collect();
            write_marked(backend, &mut batch)?;
        }
        std::fs::remove_file(&path).map_err(io)?;
        write_marked(
            backend,
            &mut vec![Command::ForgetMark {
                spool: header.journal,
            }],
        )?;
        tracing::info!(journal = %path.display(), records = landing, "a journal left by an earlier run has landed");
    }
    Ok(())
}

/// A record read back: its sequence number and its command.
type Numbered = (u64, Spooled);

/// The records of a segment of format 3 or 4 (after its header), in file order: `None`
/// for bytes that are no whole record (one cut by a crash), after which reading goes on
/// at the next mark. An error for a whole record (its checksum holds) that cannot be read.
pub(crate) fn binary_records(body: &[u8], format: u32) -> Result<Vec<Option<Numbered>>, String> {
    let mark = if format == 3 { MARK_3 } else { MARK };
    let mut records = Vec::new();
    let mut at = 0;
    while at < body.len() {
        match binary_record(&body[at..], mark)? {
            Some((len, record)) => {
                records.push(Some(record));
                at += len;
            }
            None => {
                records.push(None);
                match body[at + 1..].windows(mark.len()).position(|w| w == mark) {
                    Some(next) => at += 1 + next,
                    None => break,
                }
            }
        }
    }
    Ok(records)
}

/// The record at the start of `b` and its length; `None` if it is not whole.
fn binary_record(b: &[u8], mark: [u8; 4]) -> Result<Option<(usize, Numbered)>, String> {
    let Some(head) = b.get(..RECORD_HEAD) else {
        return Ok(None);
    };
    let word = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    if head[..4] != mark {
        return Ok(None);
    }
    let Some(whole) = usize::try_from(word(4))
        .ok()
        .and_then(|len| len.checked_add(RECORD_HEAD))
        .and_then(|end| b.get(..end))
    else {
        return Ok(None);
    };
    if crc32fast::hash(&whole[12..]) != word(8) {
        return Ok(None);
    }
    let mut seq = [0; 8];
    seq.copy_from_slice(&head[12..RECORD_HEAD]);
    let seq = u64::from_le_bytes(seq);
    let payload = &whole[RECORD_HEAD..];
    let command = if mark == MARK_3 {
        rmp_serde::from_slice(payload).map_err(|e| e.to_string())
    } else {
        crate::record::decode(payload)
    }
    .map_err(|e| format!("record {seq} is whole but cannot be read: {e}"))?;
    Ok(Some((whole.len(), (seq, command))))
}

/// `<seq> <json>` (formats 1 and 2); `None` for a record cut by a crash.
fn parse_line(line: &[u8]) -> Option<Numbered> {
    let space = line.iter().position(|b| *b == b' ')?;
    let seq = std::str::from_utf8(&line[..space]).ok()?.parse().ok()?;
    let command = serde_json::from_slice(&line[space + 1..]).ok()?;
    Some((seq, command))
}
