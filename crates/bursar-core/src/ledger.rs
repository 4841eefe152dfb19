//! Ledger entries and the hash chain.
//!
//! The ledger is append-only. Every change to money held or spent is one [`Entry`]; the
//! counters of every budget are a fold over the entries ([`Replay`]), so they can always
//! be rebuilt and compared. Each entry's hash covers the previous entry's hash and the
//! entry's canonical encoding ([`Entry::canonical`]), so editing, removing or reordering
//! any stored entry breaks the chain from that entry on.
//!
//! Architecture invariant: the canonical encoding names every value by its text (model
//! ids, tenant ids, price versions), never by a storage-local number, so a chain verifies
//! the same whatever backend or interning stored it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::budget::{BucketKey, Counter, Level};
use crate::money::Money;
use crate::pricebook::TokenUsage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Hold,
    /// Records the call's cost and, in the same entry (its negative `held_delta`),
    /// releases what its hold did not spend.
    Settle,
    /// A release on its own. Not written: a settle, void or expiry releases its hold in
    /// its own entry. Kept so that the kinds keep the numbers they are stored as.
    Release,
    Void,
    Expire,
    Adjustment,
}

impl EntryKind {
    pub fn code(self) -> i64 {
        match self {
            EntryKind::Hold => 1,
            EntryKind::Settle => 2,
            EntryKind::Release => 3,
            EntryKind::Void => 4,
            EntryKind::Expire => 5,
            EntryKind::Adjustment => 6,
        }
    }

    pub fn from_code(c: i64) -> Option<EntryKind> {
        Some(match c {
            1 => EntryKind::Hold,
            2 => EntryKind::Settle,
            3 => EntryKind::Release,
            4 => EntryKind::Void,
            5 => EntryKind::Expire,
            6 => EntryKind::Adjustment,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Hold => "hold",
            EntryKind::Settle => "settle",
            EntryKind::Release => "release",
            EntryKind::Void => "void",
            EntryKind::Expire => "expire",
            EntryKind::Adjustment => "adjustment",
        }
    }
}

/// Bit flags on an entry.
pub mod flags {
    /// The settled cost was larger than the hold.
    pub const OVERAGE: u32 = 1;
    /// Usage was counted by Bursar, not reported by the provider.
    pub const ESTIMATED: u32 = 2;
    /// The call would have been denied; permitted because the tenant is in shadow mode.
    pub const SHADOW_DENIED: u32 = 4;
    /// The model used differs from the model requested.
    pub const DRIFT: u32 = 8;
    /// A late settle of an expired hold, reconciling the expiry charge.
    pub const RECONCILED: u32 = 16;
    /// The model was downgraded by an emergency threshold.
    pub const DOWNGRADED: u32 = 32;
    /// Answered from Bursar's response cache: nothing held or spent; the entry's usage
    /// and price version give the cost saved.
    pub const CACHE_HIT: u32 = 64;
    /// Permitted while the store could not be reached, because the tenant fails open:
    /// decided on the instance's own accounting and written when the store returned.
    pub const FAIL_OPEN: u32 = 128;
}

/// Attribution of a call, recorded with its hold.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_user: Option<String>,
    /// Custom tags a budget can be scoped on (`env = "prod"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom: BTreeMap<String, String>,
    /// Free metadata, recorded and reported, never used for decisions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// What a hold entry carries beyond the numbers: where the money is held and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldDetail {
    /// The buckets the hold is on; settle, void and expire act on the same ones.
    /// Shared with the engine's hold (and the call that made it): one copy a hold.
    pub buckets: Arc<[BucketKey]>,
    pub tags: Tags,
    pub team: Option<Arc<str>>,
    pub user: Option<Arc<str>>,
    pub expires_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// SHA-256 (hex) of the authorize request, to tell a retry from a reuse of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    pub max_tokens: Option<u32>,
    pub prompt_tokens: u64,
    pub quantity: u64,
    /// A rate limit cost was taken for this many tokens (restored on recovery).
    pub rate_tokens: u64,
}

/// One ledger entry. `seq` and the hashes are set by the store when it is appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub at_ms: i64,
    pub kind: EntryKind,
    pub authorization: Uuid,
    pub tenant: Arc<str>,
    pub key_id: Option<Uuid>,
    /// Change to the money held on the entry's buckets.
    pub held_delta: Money,
    /// Change to the provider cost spent on the entry's buckets.
    pub cost_delta: Money,
    /// Change to what the tenant is charged (rate card).
    pub charge_delta: Money,
    pub model_requested: Option<Arc<str>>,
    pub model_used: Option<Arc<str>>,
    pub price_version: Option<Arc<str>>,
    pub usage: TokenUsage,
    pub quantity: u64,
    pub latency_ms: Option<u32>,
    pub flags: u32,
    /// Present on hold entries only.
    pub detail: Option<Arc<HoldDetail>>,
    /// The hold this entry acts on, for every kind; not stored (the hold entry has it),
    /// so a store can update its counters without looking the hold up.
    #[serde(skip)]
    pub hold: Option<Arc<HoldDetail>>,
}

impl Entry {
    /// The buckets this entry changes.
    pub fn buckets(&self) -> &[BucketKey] {
        self.detail
            .as_ref()
            .or(self.hold.as_ref())
            .map_or(&[], |d| &d.buckets[..])
    }
}

/// SHA-256 (hex) of a request body: tells a retry from a reuse of an idempotency key.
pub fn fingerprint(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The hash before the first entry.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

impl Entry {
    /// The canonical bytes an entry's hash covers; see the module documentation.
    pub fn canonical(&self) -> Vec<u8> {
        let detail = self.detail_text();
        let mut out = Vec::with_capacity(256 + detail.as_deref().map_or(0, str::len));
        self.write_canonical(&mut out, detail.as_deref());
        out
    }

    /// The hold detail as the ledger stores it (and the hash covers it): compact JSON,
    /// as `serde_json` writes it, written by hand ([`crate::json`]).
    pub fn detail_text(&self) -> Option<String> {
        use crate::json::ToJson;
        // Always UTF-8: texts are copied whole from `&str`, everything else is ASCII.
        self.detail
            .as_ref()
            .and_then(|d| String::from_utf8(d.to_json()).ok())
    }

    /// The canonical encoding: the fields as text, joined by U+001F, then `v1`. Written
    /// straight into `out`, without a string per field nor `core::fmt` (this runs for
    /// every entry written and every entry read back on start and by `ledger verify`).
    /// Held equal to the `format!` reading of the format by
    /// `tests::the_canonical_encoding_is_what_format_writes`.
    fn write_canonical(&self, out: &mut Vec<u8>, detail: Option<&str>) {
        const SEP: u8 = 0x1f;
        fn text(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(s.as_bytes());
        }
        fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        }
        fn uuid(out: &mut Vec<u8>, u: &Uuid) {
            let mut buf = Uuid::encode_buffer();
            out.extend_from_slice(u.hyphenated().encode_lower(&mut buf).as_bytes());
        }
        int(out, self.at_ms);
        out.push(SEP);
        text(out, self.kind.as_str());
        out.push(SEP);
        uuid(out, &self.authorization);
        out.push(SEP);
        text(out, &self.tenant);
        out.push(SEP);
        if let Some(k) = &self.key_id {
            uuid(out, k);
        }
        out.push(SEP);
        for m in [self.held_delta, self.cost_delta, self.charge_delta] {
            int(out, m.nanos());
            out.push(SEP);
        }
        for t in [
            self.model_requested.as_deref(),
            self.model_used.as_deref(),
            self.price_version.as_deref(),
        ] {
            text(out, t.unwrap_or_default());
            out.push(SEP);
        }
        int(out, self.usage.input_tokens);
        out.push(b',');
        int(out, self.usage.cached_input_tokens);
        out.push(b',');
        int(out, self.usage.output_tokens);
        out.push(SEP);
        int(out, self.quantity);
        out.push(SEP);
        if let Some(l) = self.latency_ms {
            int(out, l);
        }
        out.push(SEP);
        int(out, self.flags);
        out.push(SEP);
        text(out, detail.unwrap_or_default());
        out.push(SEP);
        out.extend_from_slice(b"v1");
    }

    /// The chain hash of this entry after `prev`.
    pub fn chain_hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        self.chain_hash_with_detail(prev, self.detail_text().as_deref())
    }

    /// The chain hash, with the hold detail given as the text the ledger stores: a store
    /// writing an entry serializes its detail once for both, and one reading it back
    /// hashes the text it read instead of serializing what it parsed again.
    pub fn chain_hash_with_detail(&self, prev: &[u8; 32], detail: Option<&str>) -> [u8; 32] {
        let mut out = Vec::with_capacity(256 + detail.map_or(0, str::len));
        self.write_canonical(&mut out, detail);
        let mut h = Sha256::new();
        h.update(prev);
        h.update(&out);
        h.finalize().into()
    }
}

/// A threshold crossing on one bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertEvent {
    pub at_ms: i64,
    pub tenant: Option<Arc<str>>,
    pub bucket: BucketKey,
    pub level: Level,
    pub limit: Money,
    pub used: Money,
    /// Why: `threshold`, `overage` or `drift`.
    pub reason: String,
}

/// Rebuilds counters from entries in ledger order; used by recovery and `ledger verify`.
#[derive(Debug, Default)]
pub struct Replay {
    pub counters: HashMap<BucketKey, Counter>,
    buckets_of: HashMap<Uuid, Arc<HoldDetail>>,
    pub problems: Vec<String>,
}

impl Replay {
    pub fn apply(&mut self, seq: u64, e: &Entry) {
        if let Some(d) = &e.detail {
            self.buckets_of.insert(e.authorization, d.clone());
        }
        let Some(detail) = self.buckets_of.get(&e.authorization).cloned() else {
            if e.held_delta != Money::ZERO || e.cost_delta != Money::ZERO {
                self.problems.push(format!(
                    "entry {seq}: {} for authorization {} that has no hold",
                    e.kind.as_str(),
                    e.authorization
                ));
            }
            return;
        };
        for b in detail.buckets.iter() {
            let c = self.counters.entry(b.clone()).or_default();
            c.held += e.held_delta;
            c.spent += e.cost_delta;
            if c.held.is_negative() {
                self.problems.push(format!(
                    "entry {seq}: held on {b} goes negative ({})",
                    c.held
                ));
            }
        }
        // Settled and voided holds are done; an expired one may still be reconciled.
        if matches!(
            e.kind,
            EntryKind::Settle | EntryKind::Void | EntryKind::Adjustment
        ) {
            self.buckets_of.remove(&e.authorization);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> Entry {
        Entry {
            at_ms: 1,
            kind: EntryKind::Settle,
            authorization: Uuid::nil(),
            tenant: "acme".into(),
            key_id: None,
            held_delta: Money::from_nanos(-10),
            cost_delta: Money::from_nanos(7),
            charge_delta: Money::from_nanos(8),
            model_requested: Some("gpt-4o-mini".into()),
            model_used: Some("gpt-4o-mini".into()),
            price_version: Some("gpt-4o-mini@2024-07-18".into()),
            usage: TokenUsage::default(),
            quantity: 0,
            latency_ms: Some(3),
            flags: 0,
            detail: None,
            hold: None,
        }
    }

    #[test]
    fn any_field_change_changes_the_hash() {
        let e = entry();
        let h = e.chain_hash(&GENESIS_HASH);
        let mut f = e.clone();
        f.cost_delta = Money::from_nanos(6);
        assert_ne!(f.chain_hash(&GENESIS_HASH), h);
        let mut g = e.clone();
        g.tenant = "acme2".into();
        assert_ne!(g.chain_hash(&GENESIS_HASH), h);
        assert_ne!(e.chain_hash(&[1; 32]), h);
        assert_eq!(e.clone().chain_hash(&GENESIS_HASH), h);
    }

    /// The canonical encoding is a format: ledgers written by earlier versions must still
    /// verify. These hashes were computed by the first implementation.
    #[test]
    fn the_canonical_encoding_does_not_change() {
        let e = entry();
        assert_eq!(
            hex::encode(e.chain_hash(&GENESIS_HASH)),
            "a759ce29719c74aeb82610d48180e8bdfe0210f5c8e7bcc0c8852925e83b2ac6"
        );
        let mut h = entry();
        h.kind = EntryKind::Hold;
        h.key_id = Some(Uuid::from_u128(7));
        h.usage = TokenUsage {
            input_tokens: 1_200,
            cached_input_tokens: 100,
            output_tokens: 300,
        };
        h.quantity = 2;
        h.latency_ms = None;
        h.flags = 3;
        h.model_used = None;
        let mut tags = Tags {
            campaign: Some("launch".into()),
            ..Tags::default()
        };
        tags.custom.insert("env".into(), "prod".into());
        h.detail = Some(Arc::new(HoldDetail {
            buckets: Arc::new([]),
            tags,
            team: Some("core".into()),
            user: None,
            expires_at_ms: 900_001,
            idempotency_key: Some("k1".into()),
            fingerprint: None,
            max_tokens: Some(300),
            prompt_tokens: 1_200,
            quantity: 0,
            rate_tokens: 1_500,
        }));
        assert_eq!(
            hex::encode(h.chain_hash(&[9; 32])),
            "bafaadd48e5049ad02d34dffb210c8199cd923b48b29d9011021cd93f1abcdcd"
        );
        let text = serde_json::to_string(h.detail.as_deref().unwrap()).unwrap();
        assert_eq!(
            h.chain_hash_with_detail(&[9; 32], Some(&text)),
            h.chain_hash(&[9; 32])
        );
    }

    /// The canonical encoding as the first implementation wrote it, with `format!`.
    fn canonical_by_format(e: &Entry, detail: Option<&str>) -> Vec<u8> {
        let key = e.key_id.map(|k| k.to_string()).unwrap_or_default();
        let latency = e.latency_ms.map(|l| l.to_string()).unwrap_or_default();
        format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{key}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{},{},{}\u{1f}{}\u{1f}{latency}\u{1f}{}\u{1f}{}\u{1f}v1",
            e.at_ms,
            e.kind.as_str(),
            e.authorization,
            e.tenant,
            e.held_delta.nanos(),
            e.cost_delta.nanos(),
            e.charge_delta.nanos(),
            e.model_requested.as_deref().unwrap_or_default(),
            e.model_used.as_deref().unwrap_or_default(),
            e.price_version.as_deref().unwrap_or_default(),
            e.usage.input_tokens,
            e.usage.cached_input_tokens,
            e.usage.output_tokens,
            e.quantity,
            e.flags,
            detail.unwrap_or_default(),
        )
        .into_bytes()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// The canonical encoding written by hand is the one `format!` wrote, for any
        /// entry: numbers at their extremes and of either sign, any text, fields absent.
        #[test]
        fn the_canonical_encoding_is_what_format_writes(
            e in crate::testing::entry(".{0,12}"),
            detail in proptest::option::of(".{0,40}"),
        ) {
            let mut out = Vec::new();
            e.write_canonical(&mut out, detail.as_deref());
            let by_format = canonical_by_format(&e, detail.as_deref());
            prop_assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&by_format));
        }
    }

    #[test]
    fn kind_codes_round_trip() {
        for k in [
            EntryKind::Hold,
            EntryKind::Settle,
            EntryKind::Release,
            EntryKind::Void,
            EntryKind::Expire,
            EntryKind::Adjustment,
        ] {
            assert_eq!(EntryKind::from_code(k.code()), Some(k));
        }
        assert_eq!(EntryKind::from_code(0), None);
    }
}
