//! The payload of a journal record of format 4: an append's entries in a fixed field
//! order, written and read by hand ([`crate::journal`] frames it).
//!
//! A record is written on the request's path of every hold and settle, so its cost is
//! the caller's: through `serde` as MessagePack with named fields (format 3) the two
//! records of a proxied call cost about 25k instructions, most of it the field names and
//! `serde`'s visitors; written here, a tenth of that. The format is private to one
//! process's journal and read back only by a start after a crash, so it needs no schema:
//!
//! - unsigned numbers as LEB128 varints, signed ones zigzag-encoded first; ids as their
//!   16 bytes; texts as a varint length and UTF-8; an optional value as a byte 0 or 1,
//!   then the value; a map as a varint count, then its pairs in the map's order;
//! - the entries: a varint count, then each entry's fields in [`Entry`]'s order (money
//!   as its nano-dollars), then a byte telling whether it acts on a hold it does not
//!   carry (named by its authorization, as format 3), then its optional [`HoldDetail`];
//! - the alerts (rare: a threshold crossed, an overage, a drift): a varint length and
//!   their MessagePack with named fields, as format 3 wrote them.
//!
//! The encoder takes every struct apart by name without `..`, so a field added to an
//! entry, a hold's detail or its tags fails to compile here until the format carries it.
//! The decoder checks every length against the bytes left and never trusts a count for
//! an allocation: a record's checksum has held by then, but a bug must give an error
//! naming the record, never a panic or a wrong entry.

use std::collections::BTreeMap;
use std::sync::Arc;

use bursar_core::budget::BucketKey;
use bursar_core::ledger::{AlertEvent, Entry, EntryKind, HoldDetail, Tags};
use bursar_core::pricebook::TokenUsage;
use bursar_core::Money;
use uuid::Uuid;

use crate::spool::{Spooled, SpooledEntry};

/// Appends the payload of an append of `entries` and `alerts` to `out`. Entries that act
/// on a hold name it by their authorization only: landing finds it in the journal or in
/// the store.
pub(crate) fn encode(
    out: &mut Vec<u8>,
    entries: &[Entry],
    alerts: &[AlertEvent],
) -> Result<(), rmp_serde::encode::Error> {
    uint(out, entries.len() as u64);
    for e in entries {
        entry(out, e);
    }
    if alerts.is_empty() {
        uint(out, 0);
    } else {
        let packed = rmp_serde::to_vec_named(alerts)?;
        uint(out, packed.len() as u64);
        out.extend_from_slice(&packed);
    }
    Ok(())
}

/// Reads back what [`encode`] wrote.
pub(crate) fn decode(b: &[u8]) -> Result<Spooled, String> {
    let mut r = Reader { b, at: 0 };
    let n = r.uint()?;
    let mut entries = Vec::new();
    for _ in 0..n {
        entries.push(r.entry()?);
    }
    let packed = r.bytes()?;
    let alerts = if packed.is_empty() {
        Vec::new()
    } else {
        rmp_serde::from_slice(packed).map_err(|e| format!("alerts: {e}"))?
    };
    if r.at != b.len() {
        return Err(format!("{} bytes past the append", b.len() - r.at));
    }
    Ok(Spooled::Append {
        entries,
        alerts,
        journal: None,
    })
}

fn uint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn int(out: &mut Vec<u8>, v: i64) {
    uint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn text(out: &mut Vec<u8>, s: &str) {
    uint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn opt_text(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            text(out, s);
        }
        None => out.push(0),
    }
}

fn map(out: &mut Vec<u8>, m: &BTreeMap<String, String>) {
    uint(out, m.len() as u64);
    for (k, v) in m {
        text(out, k);
        text(out, v);
    }
}

fn entry(out: &mut Vec<u8>, e: &Entry) {
    let Entry {
        at_ms,
        kind,
        authorization,
        tenant,
        key_id,
        held_delta,
        cost_delta,
        charge_delta,
        model_requested,
        model_used,
        price_version,
        usage:
            TokenUsage {
                input_tokens,
                cached_input_tokens,
                output_tokens,
            },
        quantity,
        latency_ms,
        flags,
        detail,
        hold,
    } = e;
    int(out, *at_ms);
    out.push(kind.code() as u8);
    out.extend_from_slice(authorization.as_bytes());
    text(out, tenant);
    match key_id {
        Some(k) => {
            out.push(1);
            out.extend_from_slice(k.as_bytes());
        }
        None => out.push(0),
    }
    int(out, held_delta.nanos());
    int(out, cost_delta.nanos());
    int(out, charge_delta.nanos());
    opt_text(out, model_requested.as_deref());
    opt_text(out, model_used.as_deref());
    opt_text(out, price_version.as_deref());
    uint(out, *input_tokens);
    uint(out, *cached_input_tokens);
    uint(out, *output_tokens);
    uint(out, *quantity);
    match latency_ms {
        Some(l) => {
            out.push(1);
            uint(out, u64::from(*l));
        }
        None => out.push(0),
    }
    uint(out, u64::from(*flags));
    out.push(u8::from(hold.is_some()));
    match detail {
        Some(d) => {
            out.push(1);
            hold_detail(out, d);
        }
        None => out.push(0),
    }
}

fn hold_detail(out: &mut Vec<u8>, d: &HoldDetail) {
    let HoldDetail {
        buckets,
        tags:
            Tags {
                workflow,
                campaign,
                agent,
                feature,
                task,
                end_user,
                custom,
                metadata,
            },
        team,
        user,
        expires_at_ms,
        idempotency_key,
        fingerprint,
        max_tokens,
        prompt_tokens,
        quantity,
        rate_tokens,
    } = d;
    uint(out, buckets.len() as u64);
    for BucketKey {
        budget,
        value,
        period_start,
    } in buckets.iter()
    {
        text(out, budget);
        text(out, value);
        int(out, *period_start);
    }
    for tag in [workflow, campaign, agent, feature, task, end_user] {
        opt_text(out, tag.as_deref());
    }
    map(out, custom);
    map(out, metadata);
    opt_text(out, team.as_deref());
    opt_text(out, user.as_deref());
    int(out, *expires_at_ms);
    opt_text(out, idempotency_key.as_deref());
    opt_text(out, fingerprint.as_deref());
    match max_tokens {
        Some(m) => {
            out.push(1);
            uint(out, u64::from(*m));
        }
        None => out.push(0),
    }
    uint(out, *prompt_tokens);
    uint(out, *quantity);
    uint(out, *rate_tokens);
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn cut(&self, what: &str) -> String {
        format!("{what} at byte {} runs past the payload", self.at)
    }

    fn byte(&mut self) -> Result<u8, String> {
        let v = *self.b.get(self.at).ok_or_else(|| self.cut("a byte"))?;
        self.at += 1;
        Ok(v)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|end| *end <= self.b.len())
            .ok_or_else(|| self.cut(&format!("{n} bytes")))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn flag(&mut self) -> Result<bool, String> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("byte {} is {b}, not 0 or 1", self.at - 1)),
        }
    }

    fn uint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("a number before byte {} is over 64 bits", self.at))
    }

    fn int(&mut self) -> Result<i64, String> {
        let z = self.uint()?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let v = self.uint()?;
        u32::try_from(v).map_err(|_| format!("{v} before byte {} is over 32 bits", self.at))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.uint()?;
        self.take(n)
    }

    fn text(&mut self) -> Result<String, String> {
        let at = self.at;
        let s = self.bytes()?;
        String::from_utf8(s.to_vec()).map_err(|_| format!("the text at byte {at} is not UTF-8"))
    }

    fn opt_text(&mut self) -> Result<Option<String>, String> {
        self.flag()?.then(|| self.text()).transpose()
    }

    fn uuid(&mut self) -> Result<Uuid, String> {
        let b = self.take(16)?;
        Uuid::from_slice(b).map_err(|e| e.to_string())
    }

    fn map(&mut self) -> Result<BTreeMap<String, String>, String> {
        let n = self.uint()?;
        let mut m = BTreeMap::new();
        for _ in 0..n {
            let k = self.text()?;
            let v = self.text()?;
            m.insert(k, v);
        }
        Ok(m)
    }

    fn entry(&mut self) -> Result<SpooledEntry, String> {
        let at_ms = self.int()?;
        let code = self.byte()?;
        let kind = EntryKind::from_code(i64::from(code))
            .ok_or_else(|| format!("entry kind {code} before byte {}", self.at))?;
        let authorization = self.uuid()?;
        let tenant = self.text()?;
        let key_id = self.flag()?.then(|| self.uuid()).transpose()?;
        let held_delta = Money::from_nanos(self.int()?);
        let cost_delta = Money::from_nanos(self.int()?);
        let charge_delta = Money::from_nanos(self.int()?);
        let model_requested = self.opt_text()?;
        let model_used = self.opt_text()?;
        let price_version = self.opt_text()?;
        let usage = TokenUsage {
            input_tokens: self.uint()?,
            cached_input_tokens: self.uint()?,
            output_tokens: self.uint()?,
        };
        let quantity = self.uint()?;
        let latency_ms = self.flag()?.then(|| self.u32()).transpose()?;
        let flags = self.u32()?;
        let on_hold = self.flag()?;
        let detail = self
            .flag()?
            .then(|| self.hold_detail().map(Arc::new))
            .transpose()?;
        let entry = Entry {
            at_ms,
            kind,
            authorization,
            tenant: tenant.into(),
            key_id,
            held_delta,
            cost_delta,
            charge_delta,
            model_requested: model_requested.map(Into::into),
            model_used: model_used.map(Into::into),
            price_version: price_version.map(Into::into),
            usage,
            quantity,
            latency_ms,
            flags,
            detail,
            hold: None,
        };
        Ok(SpooledEntry::named_hold(entry, on_hold))
    }

    fn hold_detail(&mut self) -> Result<HoldDetail, String> {
        let n = self.uint()?;
        let mut buckets = Vec::new();
        for _ in 0..n {
            buckets.push(BucketKey {
                budget: self.text()?.into(),
                value: self.text()?.into(),
                period_start: self.int()?,
            });
        }
        let tags = Tags {
            workflow: self.opt_text()?,
            campaign: self.opt_text()?,
            agent: self.opt_text()?,
            feature: self.opt_text()?,
            task: self.opt_text()?,
            end_user: self.opt_text()?,
            custom: self.map()?,
            metadata: self.map()?,
        };
        Ok(HoldDetail {
            buckets: buckets.into(),
            tags,
            team: self.opt_text()?.map(Into::into),
            user: self.opt_text()?.map(Into::into),
            expires_at_ms: self.int()?,
            idempotency_key: self.opt_text()?,
            fingerprint: self.opt_text()?,
            max_tokens: self.flag()?.then(|| self.u32()).transpose()?,
            prompt_tokens: self.uint()?,
            quantity: self.uint()?,
            rate_tokens: self.uint()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any append reads back as it was written: every entry field for field, which
        /// entries name a hold, and the alerts.
        #[test]
        fn an_append_reads_back_as_written(
            appended in proptest::collection::vec(
                (bursar_core::testing::entry(".{0,12}"), any::<bool>()),
                0..4,
            ),
            alert_at in proptest::option::of(any::<i64>()),
        ) {
            let entries: Vec<Entry> = appended
                .iter()
                .map(|(e, on_hold)| Entry {
                    // What the record notes of a hold it acts on: that there is one.
                    hold: on_hold.then(|| Arc::new(HoldDetail {
                        buckets: Arc::new([]),
                        tags: Tags::default(),
                        team: None,
                        user: None,
                        expires_at_ms: 0,
                        idempotency_key: None,
                        fingerprint: None,
                        max_tokens: None,
                        prompt_tokens: 0,
                        quantity: 0,
                        rate_tokens: 0,
                    })),
                    ..e.clone()
                })
                .collect();
            let alerts: Vec<AlertEvent> = alert_at
                .map(|at_ms| AlertEvent {
                    at_ms,
                    tenant: Some("acme".into()),
                    bucket: BucketKey {
                        budget: "b".into(),
                        value: "v".into(),
                        period_start: at_ms / 2,
                    },
                    level: bursar_core::budget::Level::Warn,
                    limit: Money::from_nanos(at_ms),
                    used: Money::from_nanos(at_ms / 3),
                    reason: "threshold".into(),
                })
                .into_iter()
                .collect();
            let mut payload = Vec::new();
            encode(&mut payload, &entries, &alerts).unwrap();
            let Ok(Spooled::Append { entries: read, alerts: read_alerts, .. }) = decode(&payload) else {
                panic!("the payload reads")
            };
            prop_assert_eq!(read.len(), appended.len());
            for (got, (want, on_hold)) in read.into_iter().zip(&appended) {
                prop_assert_eq!(got.needs_hold(), *on_hold);
                prop_assert_eq!(&got.into_entry(), want);
            }
            prop_assert_eq!(read_alerts, alerts);
        }
    }

    fn varint_round_trip(v: u64) -> u64 {
        let mut out = Vec::new();
        uint(&mut out, v);
        let mut r = Reader { b: &out, at: 0 };
        let got = r.uint().unwrap();
        assert_eq!(r.at, out.len());
        got
    }

    #[test]
    fn numbers_round_trip_at_their_edges() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            assert_eq!(varint_round_trip(v), v);
        }
        for v in [0, 1, -1, 63, -64, 64, -65, i64::MAX, i64::MIN, i64::MIN + 1] {
            let mut out = Vec::new();
            int(&mut out, v);
            assert_eq!(Reader { b: &out, at: 0 }.int().unwrap(), v);
        }
        // Eleven bytes of continuation, and a tenth byte carrying more than bit 63.
        assert!(Reader {
            b: &[0xff; 11],
            at: 0
        }
        .uint()
        .is_err());
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert!(Reader { b: &over, at: 0 }.uint().is_err());
    }

    /// Every prefix of a payload, and every payload with one byte changed, gives an
    /// error or an append, never a panic; a prefix never passes for the whole.
    #[test]
    fn a_damaged_payload_is_an_error_not_a_panic() {
        let e = Entry {
            at_ms: 1_795_993_200_000,
            kind: EntryKind::Hold,
            authorization: Uuid::now_v7(),
            tenant: "acme".into(),
            key_id: Some(Uuid::now_v7()),
            held_delta: Money::from_nanos(360_000),
            cost_delta: Money::ZERO,
            charge_delta: Money::ZERO,
            model_requested: Some("gpt-4o-mini".into()),
            model_used: None,
            price_version: Some("gpt-4o-mini@2024-07-18".into()),
            usage: TokenUsage::default(),
            quantity: 0,
            latency_ms: None,
            flags: 0,
            detail: Some(Arc::new(HoldDetail {
                buckets: Arc::new([BucketKey {
                    budget: "team-day".into(),
                    value: "growth".into(),
                    period_start: 1_795_993_200,
                }]),
                tags: Tags::default(),
                team: Some("growth".into()),
                user: None,
                expires_at_ms: 1_795_993_500_000,
                idempotency_key: None,
                fingerprint: None,
                max_tokens: Some(300),
                prompt_tokens: 1_200,
                quantity: 0,
                rate_tokens: 1_500,
            })),
            hold: None,
        };
        let mut payload = Vec::new();
        encode(&mut payload, std::slice::from_ref(&e), &[]).unwrap();
        let Ok(Spooled::Append { entries, .. }) = decode(&payload) else {
            panic!("the whole payload reads")
        };
        assert_eq!(entries.len(), 1);
        for cut in 0..payload.len() {
            assert!(decode(&payload[..cut]).is_err(), "cut at {cut}");
        }
        for at in 0..payload.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut changed = payload.clone();
                changed[at] ^= flip;
                let _ = decode(&changed);
            }
        }
        let mut longer = payload.clone();
        longer.push(0);
        match decode(&longer) {
            Err(e) => assert!(e.contains("past the append"), "{e}"),
            Ok(_) => panic!("a byte past the append is an error"),
        }
    }
}
