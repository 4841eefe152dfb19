//! Tenants, teams, users, API keys and plans: who may spend, on what, and how fast.
//!
//! These are plain values. They come from the declarative configuration file and from
//! the admin API, and the engine reads them through [`Directory`], which is swapped
//! whole (copy-on-write) when an admin changes it, so a decision never sees half an
//! update. API keys live in their own map because there can be 100k of them.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use hashbrown::HashTable;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::budget::BudgetSpec;
use crate::money::Money;
use crate::FastMap;

/// How strictly a tenant's calls are governed; for gradual rollout.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnforcementMode {
    /// Denials are enforced.
    #[default]
    Enforce,
    /// Every check runs and would-be denials are recorded, but the call is permitted.
    Shadow,
    /// No check runs; spend is still recorded.
    Off,
}

/// What a tenant's calls do while a part shared by the instances (the PostgreSQL store
/// of shared budgets, Redis for rate limits) cannot be reached.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Calls are refused with a 503 until the part returns.
    #[default]
    FailClosed,
    /// Calls go on under this instance's own accounting: rate limits are counted per
    /// instance until Redis returns.
    FailOpen,
}

/// What an API key may do.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// Manages every tenant, plans included; spends nothing itself.
    PlatformAdmin,
    /// Manages its own tenant (budgets, teams, users, keys); cannot change the plan.
    TenantAdmin,
    /// Spends within its tenant; reads its own usage; changes nothing.
    Member,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: Arc<str>,
    pub name: String,
    pub plan: String,
    pub timezone: Tz,
    pub mode: EnforcementMode,
    /// Proxy mode's response cache, opt-in: how long an identical non-streamed request
    /// is answered from the cache (at $0, recorded with the cost saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_ttl_secs: Option<u64>,
    /// Platform admins only: fail-open trades strictness for availability.
    #[serde(default, skip_serializing_if = "is_default")]
    pub failure_policy: FailurePolicy,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Team {
    pub tenant: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub tenant: String,
    pub id: String,
    pub team: Option<Arc<str>>,
    pub role: Arc<str>,
}

/// The SHA-256 of an API key's secret; the secret itself is never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(secret: &str) -> Self {
        KeyHash(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s).ok()?;
        bytes.try_into().ok().map(KeyHash)
    }
}

/// The prefix every Bursar key secret starts with, so leaked keys are easy to scan for.
pub const KEY_SECRET_PREFIX: &str = "bsr_";

/// An API key as the engine keeps it. A deployment holds many (100k keys is a
/// benchmarked case), so it is compact: fixed strings boxed without spare capacity, and
/// the owner names, repeated across a tenant's keys, shared through [`KeyRing`]'s pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: Box<str>,
    #[serde(skip)]
    pub hash: KeyHash,
    /// The first characters of the secret, to recognise a key in a list.
    pub prefix: Box<str>,
    /// `None` only for platform admin keys.
    pub tenant: Option<Arc<str>>,
    pub team: Option<Arc<str>>,
    pub user: Option<Arc<str>>,
    pub kind: KeyKind,
    /// Overrides the user's role for rate limits.
    pub role: Option<Arc<str>>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The response cache for this key's calls, with this TTL (seconds), whether or not
    /// its tenant has one (the key's TTL wins).
    pub cache_ttl_secs: Option<u32>,
}

impl ApiKey {
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// What a plan allows for one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskPolicy {
    /// Model classes allowed for this task.
    pub classes: Vec<String>,
    /// The class used when a caller asks for a class rather than a model.
    pub default_class: String,
    /// The most output tokens one call of this task may ask for.
    pub max_tokens: u32,
}

/// Rate limits for one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleLimits {
    pub requests_per_minute: Option<NonZeroU32>,
    pub tokens_per_minute: Option<NonZeroU32>,
}

/// Who shares a rate limit of a plan's `limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitPer {
    /// Each API key has its own.
    Key,
    /// All keys of one user share it (keys without a user: each its own).
    User,
    /// All keys of the tenant share it.
    Tenant,
    /// The tenant's calls of one model share it (each model its own).
    Model,
}

/// A rate limit shared by a group of callers: a tenant-wide cap, a per-model cap…
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedLimit {
    pub per: LimitPer,
    /// Only callers with this role.
    pub role: Option<String>,
    /// Only calls of this model (canonical id).
    pub model: Option<String>,
    pub requests_per_minute: Option<NonZeroU32>,
    pub tokens_per_minute: Option<NonZeroU32>,
}

/// How a call's provider cost turns into the charge to the tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateCard {
    /// Charge = cost × markup_bps / 10,000 (10,000 = at cost), rounded up.
    #[serde(default = "default_markup_bps")]
    pub markup_bps: u32,
    /// Fixed rates per agent type per 1,000 tokens (e.g. `CONTENT = "0.04"`); a call
    /// tagged with one of these agents is charged by tokens instead of by markup.
    #[serde(default)]
    pub agent_per_1k_tokens: BTreeMap<String, Money>,
}

/// Charging at cost, so a plan without a rate card shows a zero margin, not a made-up one.
pub const DEFAULT_MARKUP_BPS: u32 = 10_000;

fn default_markup_bps() -> u32 {
    DEFAULT_MARKUP_BPS
}

impl Default for RateCard {
    fn default() -> Self {
        RateCard {
            markup_bps: DEFAULT_MARKUP_BPS,
            agent_per_1k_tokens: BTreeMap::new(),
        }
    }
}

impl RateCard {
    /// The charge for a call; one rounding, up, as for costs.
    pub fn charge(&self, cost: Money, agent: Option<&str>, tokens: u64, quantity: u64) -> Money {
        if let Some(rate) = agent.and_then(|a| self.agent_per_1k_tokens.get(a)) {
            let units = if tokens > 0 {
                tokens
            } else {
                quantity.saturating_mul(1000)
            };
            // rate nano-USD per 1,000 tokens = rate pico-USD per token.
            return Money::from_pico_ceil(i128::from(rate.nanos()) * i128::from(units));
        }
        Money::from_pico_ceil(
            i128::from(cost.nanos()) * i128::from(self.markup_bps) * crate::money::PICOS_PER_NANO
                / 10_000,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub id: String,
    pub features: BTreeSet<String>,
    pub tasks: BTreeMap<String, TaskPolicy>,
    /// The task of a call that names none.
    pub default_task: String,
    /// Per-key limits by role (shorthand for `limits` with `per = "key"`).
    pub rate_limits: BTreeMap<String, RoleLimits>,
    /// Limits shared by a user's keys, a tenant, or a tenant's calls of a model.
    pub limits: Vec<SharedLimit>,
    /// Budgets every tenant on this plan gets.
    pub default_budgets: Vec<BudgetSpec>,
    pub rate_card: RateCard,
    /// What the tenant pays for the plan per month; for margin reports.
    pub price_per_month: Money,
}

/// The catalog the engine decides against, swapped whole on change.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    pub tenants: FastMap<String, Tenant>,
    pub teams: FastMap<(String, String), Team>,
    /// By tenant and user id; looked up on every call by [`UserRef`], without copying
    /// the two names into a key.
    pub users: hashbrown::HashMap<(String, String), User, foldhash::fast::RandomState>,
    pub plans: FastMap<String, Plan>,
}

/// A user's key in [`Directory::users`], borrowed: a tenant id and a user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRef<'a>(pub &'a str, pub &'a str);

impl std::hash::Hash for UserRef<'_> {
    /// As the owned key `(String, String)` hashes: each string in turn.
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h);
        self.1.hash(h);
    }
}

impl hashbrown::Equivalent<(String, String)> for UserRef<'_> {
    fn equivalent(&self, key: &(String, String)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

/// API keys by hash, and by id for admin operations.
///
/// Both indexes are bare tables of pointers to the one `Arc<ApiKey>` (8 bytes a slot,
/// each looked up by the key's own field), not maps holding a copy of the lookup key:
/// with 100k keys, two `HashMap`s cost 12 MB, these cost 2.4 MB.
#[derive(Debug, Default)]
pub struct KeyRing {
    by_hash: HashTable<Arc<ApiKey>>,
    by_id: HashTable<Arc<ApiKey>>,
    /// Hashes ids, seeded per process like the engine's maps.
    state: foldhash::fast::RandomState,
    /// Owner names (tenant, team, user, role), one allocation each however many keys
    /// name them. Never shrunk: a name outlives its keys only until the next restart.
    names: HashSet<Arc<str>, foldhash::fast::RandomState>,
}

impl KeyRing {
    /// The secret's SHA-256 is already uniform: its first eight bytes are the slot hash.
    fn slot_of_hash(hash: &KeyHash) -> u64 {
        let [a, b, c, d, e, f, g, h, ..] = hash.0;
        u64::from_le_bytes([a, b, c, d, e, f, g, h])
    }

    fn slot_of_id(&self, id: &Uuid) -> u64 {
        self.state.hash_one(id)
    }

    fn intern(&mut self, name: &mut Option<Arc<str>>) {
        if let Some(n) = name {
            match self.names.get(n) {
                Some(shared) => *n = Arc::clone(shared),
                None => {
                    self.names.insert(Arc::clone(n));
                }
            }
        }
    }

    pub fn insert(&mut self, mut key: ApiKey) {
        self.intern(&mut key.tenant);
        self.intern(&mut key.team);
        self.intern(&mut key.user);
        self.intern(&mut key.role);
        let key = Arc::new(key);
        let id_slot = self.slot_of_id(&key.id);
        let state = self.state.clone();
        let replaced = match self
            .by_id
            .entry(id_slot, |k| k.id == key.id, |k| state.hash_one(k.id))
        {
            hashbrown::hash_table::Entry::Occupied(mut o) => {
                Some(std::mem::replace(o.get_mut(), Arc::clone(&key)))
            }
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(Arc::clone(&key));
                None
            }
        };
        if let Some(old) = replaced {
            if let Ok(o) = self
                .by_hash
                .find_entry(Self::slot_of_hash(&old.hash), |k| k.hash == old.hash)
            {
                o.remove();
            }
        }
        let hash_slot = Self::slot_of_hash(&key.hash);
        match self.by_hash.entry(
            hash_slot,
            |k| k.hash == key.hash,
            |k| Self::slot_of_hash(&k.hash),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut o) => {
                // Another id with the same secret: the newer key wins the secret, and
                // the older one is no longer reachable by id either.
                let old = std::mem::replace(o.get_mut(), key);
                if old.id != o.get().id {
                    if let Ok(e) = self
                        .by_id
                        .find_entry(self.state.hash_one(old.id), |k| k.id == old.id)
                    {
                        e.remove();
                    }
                }
            }
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(key);
            }
        }
    }

    pub fn by_hash(&self, hash: &KeyHash) -> Option<&Arc<ApiKey>> {
        self.by_hash
            .find(Self::slot_of_hash(hash), |k| k.hash == *hash)
    }

    pub fn by_id(&self, id: &Uuid) -> Option<&Arc<ApiKey>> {
        self.by_id.find(self.slot_of_id(id), |k| k.id == *id)
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ApiKey>> {
        self.by_hash.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_found_by_its_borrowed_names_and_only_in_its_tenant() {
        let mut dir = Directory::default();
        for (tenant, id, role) in [("acme", "ann", "admin"), ("beta", "ann", "viewer")] {
            let user = User {
                tenant: tenant.into(),
                id: id.into(),
                team: None,
                role: role.into(),
            };
            dir.users.insert((tenant.into(), id.into()), user);
        }
        let role = |t: &str, u: &str| dir.users.get(&UserRef(t, u)).map(|u| &*u.role);
        assert_eq!(role("acme", "ann"), Some("admin"));
        assert_eq!(role("beta", "ann"), Some("viewer"));
        assert_eq!(role("acme", "bob"), None);
        // The names are not run together: ("ac", "meann") is no key of ("acme", "ann").
        assert_eq!(role("ac", "meann"), None);
        assert_eq!(role("acmeann", ""), None);
    }

    fn key(id: u128, secret: &str, tenant: &str) -> ApiKey {
        ApiKey {
            id: Uuid::from_u128(id),
            name: format!("key {id}").into(),
            hash: KeyHash::of(secret),
            prefix: secret.chars().take(8).collect::<String>().into(),
            tenant: Some(tenant.into()),
            team: None,
            user: None,
            kind: KeyKind::Member,
            role: Some("default".into()),
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            expires_at: None,
            revoked_at: None,
            cache_ttl_secs: None,
        }
    }

    #[test]
    fn the_key_ring_finds_keys_by_secret_and_id_and_replaces_them_whole() {
        let mut ring = KeyRing::default();
        for i in 0..1_000u128 {
            ring.insert(key(i, &format!("bsr_secret_{i}"), &format!("t{}", i % 10)));
        }
        assert_eq!(ring.len(), 1_000);
        let k = ring.by_hash(&KeyHash::of("bsr_secret_417")).unwrap();
        assert_eq!(k.id, Uuid::from_u128(417));
        assert_eq!(ring.by_id(&Uuid::from_u128(417)).unwrap().hash, k.hash);
        assert!(ring.by_hash(&KeyHash::of("bsr_secret_1000")).is_none());
        assert!(ring.by_id(&Uuid::from_u128(1_000)).is_none());

        // Revoking re-inserts the key under its id: the new version is found both ways.
        let mut revoked = key(417, "bsr_secret_417", "t7");
        revoked.revoked_at = Some(DateTime::<Utc>::UNIX_EPOCH);
        ring.insert(revoked);
        assert_eq!(ring.len(), 1_000);
        assert!(ring
            .by_id(&Uuid::from_u128(417))
            .unwrap()
            .revoked_at
            .is_some());
        assert!(ring
            .by_hash(&KeyHash::of("bsr_secret_417"))
            .unwrap()
            .revoked_at
            .is_some());

        // A key whose secret changes under the same id is no longer found by the old one.
        ring.insert(key(418, "bsr_rotated_418", "t8"));
        assert!(ring.by_hash(&KeyHash::of("bsr_secret_418")).is_none());
        assert_eq!(
            ring.by_hash(&KeyHash::of("bsr_rotated_418")).unwrap().id,
            Uuid::from_u128(418)
        );
        assert_eq!(ring.len(), 1_000);

        // The same secret under another id: the newer key takes it, the older is gone.
        ring.insert(key(5_000, "bsr_secret_419", "t9"));
        assert_eq!(
            ring.by_hash(&KeyHash::of("bsr_secret_419")).unwrap().id,
            Uuid::from_u128(5_000)
        );
        assert!(ring.by_id(&Uuid::from_u128(419)).is_none());
        assert_eq!(ring.len(), 1_000);
        assert_eq!(ring.iter().count(), 1_000);
    }

    #[test]
    fn keys_of_one_tenant_share_its_name() {
        let mut ring = KeyRing::default();
        ring.insert(key(1, "bsr_a", "acme"));
        ring.insert(key(2, "bsr_b", "acme"));
        ring.insert(key(3, "bsr_c", "globex"));
        let a = ring.by_id(&Uuid::from_u128(1)).unwrap();
        let b = ring.by_id(&Uuid::from_u128(2)).unwrap();
        let c = ring.by_id(&Uuid::from_u128(3)).unwrap();
        assert!(Arc::ptr_eq(
            a.tenant.as_ref().unwrap(),
            b.tenant.as_ref().unwrap()
        ));
        assert!(!Arc::ptr_eq(
            a.tenant.as_ref().unwrap(),
            c.tenant.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(
            a.role.as_ref().unwrap(),
            c.role.as_ref().unwrap()
        ));
        assert_eq!(c.tenant.as_deref(), Some("globex"));
    }

    #[test]
    fn agent_rates_charge_per_thousand_tokens() {
        let mut card = RateCard::default();
        card.agent_per_1k_tokens
            .insert("CONTENT".into(), Money::parse("0.04").unwrap());
        // 2,500 tokens at $0.04 per 1K = $0.10, whatever the provider cost.
        assert_eq!(
            card.charge(Money::parse("0.01").unwrap(), Some("CONTENT"), 2_500, 0)
                .to_string(),
            "0.1"
        );
        // Other agents pay cost × markup.
        card.markup_bps = 15_000;
        assert_eq!(
            card.charge(Money::parse("0.01").unwrap(), Some("SEO"), 2_500, 0)
                .to_string(),
            "0.015"
        );
    }

    #[test]
    fn key_hash_hex_round_trips() {
        let h = KeyHash::of("bsr_secret");
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(KeyHash::from_hex("zz"), None);
    }
}
