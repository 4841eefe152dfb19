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
    Settle,
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
    pub buckets: Vec<BucketKey>,
    pub tags: Tags,
    pub team: Option<String>,
    pub user: Option<String>,
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
    pub tenant: String,
    pub key_id: Option<Uuid>,
    /// Change to the money held on the entry's buckets.
    pub held_delta: Money,
    /// Change to the provider cost spent on the entry's buckets.
    pub cost_delta: Money,
    /// Change to what the tenant is charged (rate card).
    pub charge_delta: Money,
    pub model_requested: Option<String>,
    pub model_used: Option<String>,
    pub price_version: Option<String>,
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
            .map_or(&[], |d| d.buckets.as_slice())
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
        let opt = |o: &Option<String>| o.clone().unwrap_or_default();
        let detail = self
            .detail
            .as_ref()
            .and_then(|d| serde_json::to_string(d.as_ref()).ok())
            .unwrap_or_default();
        let fields: [String; 17] = [
            self.at_ms.to_string(),
            self.kind.as_str().to_string(),
            self.authorization.to_string(),
            self.tenant.clone(),
            self.key_id.map(|k| k.to_string()).unwrap_or_default(),
            self.held_delta.nanos().to_string(),
            self.cost_delta.nanos().to_string(),
            self.charge_delta.nanos().to_string(),
            opt(&self.model_requested),
            opt(&self.model_used),
            opt(&self.price_version),
            format!(
                "{},{},{}",
                self.usage.input_tokens, self.usage.cached_input_tokens, self.usage.output_tokens
            ),
            self.quantity.to_string(),
            self.latency_ms.map(|l| l.to_string()).unwrap_or_default(),
            self.flags.to_string(),
            detail,
            String::from("v1"),
        ];
        fields.join("\u{1f}").into_bytes()
    }

    /// The chain hash of this entry after `prev`.
    pub fn chain_hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(prev);
        h.update(self.canonical());
        h.finalize().into()
    }
}

/// A threshold crossing on one bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertEvent {
    pub at_ms: i64,
    pub tenant: Option<String>,
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
        for b in &detail.buckets {
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
