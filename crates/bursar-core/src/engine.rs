//! The governance engine: one decision per call, in the order of the specification.
//!
//! key → tenant, plan, role → feature/task gate → model access → rate limits → budgets
//! (reserve on every scope) → shape (`max_tokens`, emergency downgrade) → record.
//!
//! The engine keeps the live state in memory: counters per bucket, open holds, recent
//! outcomes, idempotency records and rate-limit cells. Every change is made under one
//! lock together with the [`LedgerSink::append`] of the entry that records it, so the
//! ledger order is the order of the changes and a replay of the ledger meets the same
//! states. The engine does no I/O itself; the sink hands the entry to a store and gives
//! back a ticket the caller awaits before acknowledging.
//!
//! Architecture invariants (each held by a test):
//! - a hold is placed on all of its buckets or on none (all-or-nothing, never shrunk
//!   to fit), and in enforce mode held + spent never passes a limit because of a hold;
//! - an authorization is finished (settled, voided or expired) at most once;
//! - the same idempotency key with the same request returns the first result.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use uuid::Uuid;

use crate::budget::{
    BucketKey, Budget, Counter, EmergencyAction, Level, ScopeKind, Selector, Window,
};
use crate::catalog::{
    ApiKey, Directory, EnforcementMode, FailurePolicy, KeyHash, KeyKind, KeyRing, LimitPer, Plan,
    Tenant, UserRef,
};
use crate::ledger::{flags, AlertEvent, Entry, EntryKind, HoldDetail, Tags};
use crate::money::{Money, PICOS_PER_NANO};
use crate::pricebook::{LookupError, Model, PriceBook, TokenUsage};
use crate::ratelimit::{Gcra, RateError};
use crate::tokens::{self, ChatMessage};

/// Holds not finished within 15 minutes expire: long enough for a slow reasoning call,
/// short enough that a crashed client does not pin budget for long.
pub const DEFAULT_HOLD_TTL: Duration = Duration::from_secs(15 * 60);
/// The longest hold a caller may ask for.
pub const MAX_HOLD_TTL: Duration = Duration::from_secs(24 * 3600);
/// A permit shaped by the budget below 16 output tokens would be useless; deny instead.
pub const DEFAULT_MIN_OUTPUT_TOKENS: u32 = 16;
/// An idempotency record stays in the engine's memory at most a day (or the window, if
/// shorter); past that, a retry within the window is answered from the ledger.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long an Idempotency-Key is honoured after its hold by default: a retry within it
/// gets the first answer (promise 2); past it, the key may be used for a new call.
/// Payment APIs honour keys for a day; a week covers a batch job retried after a
/// weekend. What the embedded store keeps in memory for it grows with the keys used
/// within the window, not with the ledger.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest window: an hour outlasts any client's retries.
pub const MIN_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(3600);
/// The longest window, ten years: for deployments that want keys honoured for good.
pub const MAX_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Finished authorizations stay in memory this long to answer retried settles at once;
/// older ones are answered from the ledger. It only has to outlast a commit (ms).
pub const FINISHED_RETENTION: Duration = Duration::from_secs(300);
/// Finished authorizations kept in memory at most; beyond it the oldest are forgotten
/// first and retries are answered from the ledger. 10k is half a second at 20k
/// settles/s, a hundred times as long as a commit takes, in ~5 MB (~15 MB when every
/// call carries an Idempotency-Key: each keeps its first permit for a retry).
pub const MAX_FINISHED_IN_MEMORY: usize = 10_000;
/// How often counters of ended periods are pruned from memory (`Engine::prune_counters`).
const COUNTER_PRUNE_EVERY_SECS: i64 = 60;
/// Idempotency records kept in memory at most (oldest forgotten first, at each sweep).
/// A retry is answered from memory only while its first answer is there (its hold open,
/// or its outcome among the last [`MAX_FINISHED_IN_MEMORY`]): more records would only
/// serve holds still open after that many newer keys, at ~450 bytes each. A forgotten
/// key is looked up in the ledger, which answers the same hold (on the embedded store,
/// only if its filter of stored keys may have the key); so a record is forgotten only
/// once its hold is known to be there ([`Engine::idempotency_landed`]), cap or not.
pub const MAX_IDEMPOTENCY_IN_MEMORY: usize = MAX_FINISHED_IN_MEMORY;
/// A prompt longer than this many tokens is refused before counting further.
pub const MAX_PROMPT_TOKENS: u64 = 10_000_000;
/// At most this many units of a metered API in one authorization.
pub const MAX_QUANTITY: u64 = 1_000_000;

/// What happens to a hold that is never settled or voided.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryPolicy {
    /// Charge the whole hold: the call may have reached the provider (the safe default).
    #[default]
    ChargeHold,
    /// Release the hold at no cost.
    Release,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub hold_ttl: Duration,
    pub expiry_policy: ExpiryPolicy,
    pub min_output_tokens: u32,
    /// How long an Idempotency-Key is honoured after its hold
    /// ([`DEFAULT_IDEMPOTENCY_WINDOW`]).
    pub idempotency_window: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            hold_ttl: DEFAULT_HOLD_TTL,
            expiry_policy: ExpiryPolicy::default(),
            min_output_tokens: DEFAULT_MIN_OUTPUT_TOKENS,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
        }
    }
}

/// Where the engine's entries go. `append` is called with the engine's lock held, so it
/// must only enqueue; the ticket resolves when the entry is durable.
pub trait LedgerSink {
    type Ticket;
    fn append(&self, entries: Vec<Entry>, alerts: Vec<AlertEvent>) -> Self::Ticket;
}

/// Every denial has a stable code; the HTTP edge maps it to a status.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyCode {
    InvalidApiKey,
    ApiKeyRevoked,
    ApiKeyExpired,
    AdminKeyCannotSpend,
    TenantNotFound,
    FeatureNotInPlan,
    TaskNotInPlan,
    ModelClassNotAllowed,
    UnknownModel,
    UnknownApi,
    NoPriceInEffect,
    PromptTooLong,
    InvalidRequest,
    RateLimited,
    ExceedsRateLimitCapacity,
    BudgetExceeded,
    IdempotencyKeyReused,
    /// Several instances share the budgets and this one needs a larger lease of some
    /// bucket before it can decide; the edge asks the store and decides again. Never
    /// an answer to a caller.
    LeaseNeeded,
}

impl DenyCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyCode::InvalidApiKey => "invalid_api_key",
            DenyCode::ApiKeyRevoked => "api_key_revoked",
            DenyCode::ApiKeyExpired => "api_key_expired",
            DenyCode::AdminKeyCannotSpend => "admin_key_cannot_spend",
            DenyCode::TenantNotFound => "tenant_not_found",
            DenyCode::FeatureNotInPlan => "feature_not_in_plan",
            DenyCode::TaskNotInPlan => "task_not_in_plan",
            DenyCode::ModelClassNotAllowed => "model_class_not_allowed",
            DenyCode::UnknownModel => "unknown_model",
            DenyCode::UnknownApi => "unknown_api",
            DenyCode::NoPriceInEffect => "no_price_in_effect",
            DenyCode::PromptTooLong => "prompt_too_long",
            DenyCode::InvalidRequest => "invalid_request",
            DenyCode::RateLimited => "rate_limited",
            DenyCode::ExceedsRateLimitCapacity => "exceeds_rate_limit_capacity",
            DenyCode::BudgetExceeded => "budget_exceeded",
            DenyCode::IdempotencyKeyReused => "idempotency_key_reused",
            DenyCode::LeaseNeeded => "lease_needed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denial {
    pub code: DenyCode,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// With [`DenyCode::LeaseNeeded`]: the leases to ask for.
    pub leases: Vec<LeaseWant>,
}

impl Denial {
    pub fn new(code: DenyCode, message: impl Into<String>) -> Self {
        Denial {
            code,
            message: message.into(),
            retry_after: None,
            leases: Vec::new(),
        }
    }
}

/// More room one instance needs in one budget bucket, when several instances share the
/// budgets (see ARCHITECTURE.md, "Several instances"). The store grants it only while
/// every instance's leases of the bucket, with what earlier slices of a rolling window
/// used, stay within the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseWant {
    pub bucket: BucketKey,
    /// The call needs at least this much more.
    pub shortfall: Money,
    /// The budget's limit.
    pub limit: Money,
    /// The part of the limit that may be used: 100, or the emergency threshold of a
    /// budget that blocks there.
    pub percent: u8,
    /// Rollover: the previous period's bucket, whose unused part adds to the limit.
    pub rollover_from: Option<BucketKey>,
    /// A rolling window's earlier slices, whose use counts against the limit.
    pub prior: Vec<BucketKey>,
}

impl From<LookupError> for Denial {
    fn from(e: LookupError) -> Self {
        let code = match e {
            LookupError::UnknownModel(_) => DenyCode::UnknownModel,
            LookupError::UnknownApi(_) => DenyCode::UnknownApi,
            LookupError::NoPriceInEffect { .. } => DenyCode::NoPriceInEffect,
        };
        Denial::new(code, e.to_string())
    }
}

/// The prompt of a model call, in whichever form the caller has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Messages(Vec<ChatMessage>),
    Text(String),
    /// Already counted by the caller.
    Tokens(u64),
}

/// What a call spends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Metered {
    Model {
        model: Arc<str>,
        prompt: Prompt,
        max_tokens: Option<u32>,
    },
    Api {
        api: Arc<str>,
        quantity: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeRequest {
    pub metered: Metered,
    pub tags: Tags,
    pub idempotency_key: Option<String>,
    /// SHA-256 (hex) of the request body, computed at the edge.
    pub fingerprint: Option<String>,
    pub ttl: Option<Duration>,
}

/// One budget as the caller sees it after the decision.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetView {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub budget_id: Arc<str>,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub scope: Arc<str>,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub value: Arc<str>,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub window: Arc<str>,
    pub period_start: i64,
    pub limit: Money,
    pub spent: Money,
    pub held: Money,
    pub remaining: Money,
    pub level: Level,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permit {
    pub authorization_id: Uuid,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub model: Option<Arc<str>>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub api: Option<Arc<str>>,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub price_version: Arc<str>,
    pub held: Money,
    pub prompt_tokens: u64,
    pub max_tokens: Option<u32>,
    pub quantity: u64,
    pub expires_at: DateTime<Utc>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub downgraded_from: Option<Arc<str>>,
    /// In shadow mode: the denial that enforce mode would have returned.
    pub shadow_denial: Option<DenyCode>,
    pub budgets: Vec<BudgetView>,
    /// The rate limits this call counted against, as they stand after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateStanding>,
    /// True when this is the stored answer to an earlier request with the same key.
    pub replayed: bool,
}

/// One rate limit as it stands after a call.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateStanding {
    /// `requests` or `tokens`.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub dimension: Cow<'static, str>,
    /// Who shares it: `key`, `user`, `tenant` or `model`.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub per: Cow<'static, str>,
    pub limit_per_minute: u32,
    pub remaining: u64,
    /// Milliseconds until the whole limit is available again.
    pub reset_ms: u64,
}

/// What the call actually used.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub tokens: TokenUsage,
    pub quantity: u64,
    /// The model the provider says it used; defaults to the permitted model.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub model_used: Option<Arc<str>>,
    pub latency_ms: Option<u32>,
    /// Usage counted by the caller rather than reported by the provider.
    pub estimated: bool,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Settled,
    Voided,
    Expired,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub authorization_id: Uuid,
    pub outcome: Outcome,
    pub cost: Money,
    pub charge: Money,
    pub released: Money,
    pub overage: Money,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub model_used: Option<Arc<str>>,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub price_version: Arc<str>,
    pub drift: bool,
    pub replayed: bool,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishCode {
    AuthorizationNotFound,
    AuthorizationExpired,
    AuthorizationVoided,
    AuthorizationAlreadySettled,
    UnknownModel,
    InvalidUsage,
}

impl FinishCode {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishCode::AuthorizationNotFound => "authorization_not_found",
            FinishCode::AuthorizationExpired => "authorization_expired",
            FinishCode::AuthorizationVoided => "authorization_voided",
            FinishCode::AuthorizationAlreadySettled => "authorization_already_settled",
            FinishCode::UnknownModel => "unknown_model",
            FinishCode::InvalidUsage => "invalid_usage",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FinishError {
    pub code: FinishCode,
    pub message: String,
}

impl FinishError {
    fn new(code: FinishCode, message: impl Into<String>) -> Self {
        FinishError {
            code,
            message: message.into(),
        }
    }
}

/// An open hold.
#[derive(Debug, Clone)]
struct Hold {
    /// When the hold was made: prices are those in effect then.
    at_ms: i64,
    tenant: Arc<str>,
    key_id: Option<Uuid>,
    detail: Arc<HoldDetail>,
    held: Money,
    model: Option<Arc<str>>,
    api: Option<Arc<str>>,
    price_version: Arc<str>,
    expires_at_ms: i64,
    agent: Option<String>,
    /// The answer, kept only when an idempotency key may ask for it again.
    permit: Option<Arc<Permit>>,
    /// Permitted by this engine while the store was away (flags::FAIL_OPEN): its claim
    /// is written with the hold, so this engine finishes it without claiming it.
    fail_open: bool,
}

/// A value that knows when it came (ms since the epoch).
trait Aged {
    fn at_ms(&self) -> i64;
}

/// A map whose values are forgotten oldest first, at O(1) each, from a queue of keys in
/// the order they came: under the engine's lock, every settle drops finished outcomes
/// past [`MAX_FINISHED_IN_MEMORY`] and every sweep what is past its retention.
/// (Scanning a whole map instead, tens of thousands of values, held the lock for
/// milliseconds every few thousand settles and at every sweep: the calls' p99.)
#[derive(Debug)]
struct Aging<K, V> {
    by_key: Map<K, V>,
    /// `(at_ms, key)` in arrival order. A value replaced under the same key leaves its
    /// older pair behind, which names it with another time: skipped.
    order: VecDeque<(i64, K)>,
    /// Pairs taken off the front of `order` so far: the front is insertion number
    /// `popped` (insertions are numbered from 0, in order).
    popped: u64,
    /// Insertions numbered below this may be forgotten by [`Aging::trim_landed`].
    landed: u64,
}

impl<K, V> Default for Aging<K, V> {
    fn default() -> Self {
        Aging {
            by_key: Map::default(),
            order: VecDeque::new(),
            popped: 0,
            landed: 0,
        }
    }
}

impl<K: Eq + std::hash::Hash + Clone, V: Aged> Aging<K, V> {
    fn get(&self, k: &K) -> Option<&V> {
        self.by_key.get(k)
    }

    fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.by_key.get_mut(k)
    }

    fn contains_key(&self, k: &K) -> bool {
        self.by_key.contains_key(k)
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }

    fn insert(&mut self, k: K, v: V) {
        self.order.push_back((v.at_ms(), k.clone()));
        self.by_key.insert(k, v);
    }

    /// How many values were inserted so far (the next insertion's number).
    fn inserted(&self) -> u64 {
        self.popped + self.order.len() as u64
    }

    /// Insertions numbered below `through` may be forgotten by [`Aging::trim_landed`].
    fn mark_landed(&mut self, through: u64) {
        self.landed = self.landed.max(through.min(self.inserted()));
    }

    /// Forgets, oldest first, until at most `max` remain and the oldest came after
    /// `after_ms`. (Values come nearly in time order; one adopted late waits its turn.)
    fn trim(&mut self, max: usize, after_ms: i64) {
        self.trim_below(max, after_ms, u64::MAX);
    }

    /// The same, but never forgets an insertion not yet marked landed: the oldest such
    /// stays, and every value after it, however many.
    fn trim_landed(&mut self, max: usize, after_ms: i64) {
        self.trim_below(max, after_ms, self.landed);
    }

    fn trim_below(&mut self, max: usize, after_ms: i64, below: u64) {
        while let Some((at, k)) = self.order.front() {
            let keep = self.by_key.len() <= max && *at > after_ms && self.order.len() <= 2 * max;
            if keep || self.popped >= below {
                break;
            }
            if self.by_key.get(k).is_some_and(|v| v.at_ms() == *at) {
                self.by_key.remove(k);
            }
            self.order.pop_front();
            self.popped += 1;
        }
    }
}

impl Aged for Box<Finished> {
    fn at_ms(&self) -> i64 {
        self.finished_at_ms
    }
}

impl Aged for IdempotencyRecord {
    fn at_ms(&self) -> i64 {
        self.at_ms
    }
}

/// What a call's usage cost, at the price of the model it used.
struct UsagePriced {
    cost: Money,
    price_version: Arc<str>,
    model_used: Option<Arc<str>>,
    /// The model used is not the one permitted.
    drift: bool,
}

/// A finished authorization, kept for a while to answer retries.
#[derive(Debug, Clone)]
struct Finished {
    tenant: Arc<str>,
    usage: Option<Usage>,
    settlement: Settlement,
    finished_at_ms: i64,
    /// The first answer, for an idempotent retry of the authorize.
    permit: Option<Arc<Permit>>,
    /// Kept (for expired holds only) so a late settle can be reconciled once.
    hold: Option<Box<Hold>>,
}

#[derive(Debug, Clone)]
struct IdempotencyRecord {
    fingerprint: Option<String>,
    authorization: Uuid,
    at_ms: i64,
}

/// The engine's maps (see [`crate::FastMap`]).
type Map<K, V> = crate::FastMap<K, V>;

/// Applies `f` to the counter of `b`, made (zero) if there is none. The key (two
/// strings) is copied only then, not at every call as `entry` copies it.
fn with_counter<R>(
    counters: &mut Map<BucketKey, Counter>,
    b: &BucketKey,
    f: impl FnOnce(&mut Counter) -> R,
) -> R {
    if let Some(c) = counters.get_mut(b) {
        return f(c);
    }
    f(counters.entry(b.clone()).or_default())
}

/// Who a rate-limit cell counts for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subject {
    Key(Uuid),
    /// Tenant and user.
    User(Arc<str>, String),
    Tenant(Arc<str>),
    /// Tenant and model (or metered API).
    Model(Arc<str>, Arc<str>),
}

/// The role limits of a plan, as a cell's `limit`; shared limits use their index.
const ROLE_LIMIT: u16 = u16::MAX;

/// A rate-limit cell: one per limit, subject and dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RateCell {
    limit: u16,
    subject: Subject,
    tokens: bool,
}

impl RateCell {
    fn per(&self) -> &'static str {
        match self.subject {
            Subject::Key(_) => "key",
            Subject::User(..) => "user",
            Subject::Tenant(_) => "tenant",
            Subject::Model(..) => "model",
        }
    }

    fn describe(&self, role: &str) -> String {
        let what = if self.tokens { "tokens" } else { "requests" };
        match &self.subject {
            Subject::Key(_) => format!("{what} of role `{role}` per key"),
            Subject::User(_, u) => format!("{what} of user `{u}`"),
            Subject::Tenant(t) => format!("{what} of tenant `{t}`"),
            Subject::Model(_, m) => format!("{what} of model `{m}` in this tenant"),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    counters: Map<BucketKey, Counter>,
    holds: Map<Uuid, Hold>,
    /// Boxed: most of a finished outcome's life is spent in the map, which is sized for
    /// `FINISHED_CAP_AT`; its buckets stay small.
    finished: Aging<Uuid, Box<Finished>>,
    idempotency: Aging<(String, String), IdempotencyRecord>,
    limiters: Map<RateCell, Gcra>,
    levels: Map<BucketKey, Level>,
    /// When several instances share the budgets: per bucket, the use this instance may
    /// reach on its own (its use when it started plus the leases it holds). `None`: this
    /// instance owns the budgets, the limits are the only bound.
    allowance: Option<Map<BucketKey, Money>>,
    /// When counters of ended periods were last pruned (unix seconds).
    pruned_at_s: i64,
    /// Shared budgets: per bucket, the use of the other instances beyond what this
    /// engine counts (refreshed by the sweeper), so levels and alerts judge the use of
    /// all of them. Decisions do not read it: they stay within this instance's leases.
    elsewhere: Map<BucketKey, Money>,
    /// Recovery started from the stored counters (those at the ledger's head): the
    /// entries recovered after them rebuild holds and outcomes, not counters.
    counters_restored: bool,
}

/// Budgets in force, by owner.
#[derive(Debug, Clone, Default)]
pub struct BudgetSet {
    pub global: Vec<Arc<Budget>>,
    pub by_tenant: Map<String, Vec<Arc<Budget>>>,
}

impl BudgetSet {
    pub fn from_budgets(budgets: impl IntoIterator<Item = Budget>) -> Self {
        let mut set = BudgetSet::default();
        for b in budgets {
            let b = Arc::new(b);
            match &b.tenant {
                None => set.global.push(b),
                Some(t) => set.by_tenant.entry(t.clone()).or_default().push(b),
            }
        }
        set
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Budget>> {
        self.global.iter().chain(self.by_tenant.values().flatten())
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Budget>> {
        self.all().find(|b| b.id == id)
    }
}

/// The identity a request presents, resolved from its key.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key: Arc<ApiKey>,
}

/// A call checked by [`Engine::prepare`], waiting for [`Engine::decide`].
pub struct Prepared<'a> {
    key: Arc<ApiKey>,
    dir: Arc<Directory>,
    req: AuthorizeRequest,
    now: DateTime<Utc>,
    tenant_id: Arc<str>,
    role: Arc<str>,
    tags: Tags,
    team: Option<Arc<str>>,
    mode: EnforcementMode,
    fail_open: bool,
    shadow: Option<DenyCode>,
    priced: Priced<'a>,
    ttl: Duration,
    applicable: Scoped,
    rate_checks: Vec<(RateCell, u64, u32)>,
    id: Uuid,
}

/// One rate limit a call counts against, as a distributed limiter takes it.
#[derive(Debug, Clone, Copy)]
pub struct RateCheck<'p> {
    /// Names the cell: the same limit, subject and dimension give the same name.
    pub cell: RateCellName<'p>,
    /// Units this call takes: 1 request, or its worst-case tokens.
    pub units: u64,
    pub per_minute: u32,
}

/// A rate-limit cell's name, written by its `Display` (unambiguous: every caller-chosen
/// part is length-prefixed).
#[derive(Debug, Clone, Copy)]
pub struct RateCellName<'p>(&'p RateCell);

impl std::fmt::Display for RateCellName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.0;
        let dim = if c.tokens { 't' } else { 'r' };
        write!(f, "{}:{dim}:", c.limit)?;
        match &c.subject {
            Subject::Key(id) => write!(f, "k:{id}"),
            Subject::User(t, u) => write!(f, "u:{}:{t}{}:{u}", t.len(), u.len()),
            Subject::Tenant(t) => write!(f, "t:{}:{t}", t.len()),
            Subject::Model(t, m) => write!(f, "m:{}:{t}{}:{m}", t.len(), m.len()),
        }
    }
}

/// What is left of a rate limit after a call took from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLeft {
    pub remaining: u64,
    /// Until the limit is whole again.
    pub reset: Duration,
}

impl RateLeft {
    fn of((remaining, reset): (u64, Duration)) -> Self {
        RateLeft { remaining, reset }
    }
}

/// How [`Engine::decide`] treats the leases of shared budgets (see
/// [`Engine::share_budgets`]; without sharing there are none and only `FailOpen`
/// changes anything: the flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leases {
    /// A call a larger lease would let through is answered [`DenyCode::LeaseNeeded`]
    /// before anything changes.
    AskForMore,
    /// Decided within the leases held.
    WithinHeld,
    /// The store is away and the tenant fails open: decided against the limits as this
    /// instance counts the use (its own, and the others' as last read), leases aside.
    /// The hold is flagged `FAIL_OPEN`.
    FailOpen,
}

/// Where [`Engine::decide`] gets a call's rate-limit outcomes.
#[derive(Debug, Clone, Copy)]
pub enum Rates<'r> {
    /// This instance's own cells: checked, and taken with the hold.
    Local,
    /// Outcomes a distributed limiter has already taken, one per
    /// [`Prepared::rate_checks`] in order. A call denied after them must give the
    /// units back (its caller's job: the limiter is not the engine's).
    Taken(&'r [Result<RateLeft, RateError>]),
}

impl Prepared<'_> {
    /// The rate limits this call counts against, in the order [`Rates::Taken`] expects.
    pub fn rate_checks(&self) -> impl ExactSizeIterator<Item = RateCheck<'_>> {
        self.rate_checks
            .iter()
            .map(|(cell, units, per_minute)| RateCheck {
                cell: RateCellName(cell),
                units: *units,
                per_minute: *per_minute,
            })
    }

    /// Whether the tenant takes calls on when a shared part (store, Redis) fails, with
    /// this instance's own accounting.
    pub fn fail_open(&self) -> bool {
        self.fail_open
    }

    /// Whether a limiter's [`RateError`] stops this call (enforcing tenants) or is only
    /// noted (shadow mode).
    pub fn enforces(&self) -> bool {
        self.mode == EnforcementMode::Enforce
    }

    pub fn tenant(&self) -> &str {
        &self.tenant_id
    }
}

pub struct Engine {
    config: EngineConfig,
    book: Arc<PriceBook>,
    directory: RwLock<Arc<Directory>>,
    keys: RwLock<KeyRing>,
    budgets: RwLock<Arc<BudgetSet>>,
    state: Mutex<State>,
}

/// A budget that applies to a call, with its bucket, borrowed from where they are kept
/// (a call's [`Scoped`], a hold's detail): no copy of their texts.
#[derive(Clone, Copy)]
struct Applicable<'b> {
    budget: &'b Budget,
    bucket: &'b BucketKey,
    tz: Tz,
}

/// The budgets a call counts against, and their buckets. The buckets are made once, when
/// the call is prepared, and shared with its hold's detail.
struct Scoped {
    budgets: Vec<(Arc<Budget>, Tz)>,
    buckets: Arc<[BucketKey]>,
}

impl Scoped {
    fn iter(&self) -> impl Iterator<Item = Applicable<'_>> + Clone + '_ {
        self.budgets
            .iter()
            .zip(self.buckets.iter())
            .map(|((budget, tz), bucket)| Applicable {
                budget,
                bucket,
                tz: *tz,
            })
    }

    fn len(&self) -> usize {
        self.buckets.len()
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The permit a hold entry stands for: what a retry with its idempotency key gets.
pub fn permit_of_hold(
    authorization: Uuid,
    held: Money,
    item: Option<Arc<str>>,
    price_version: Option<Arc<str>>,
    d: &HoldDetail,
    replayed: bool,
) -> Permit {
    let (model, api) = if d.quantity == 0 {
        (item, None)
    } else {
        (None, item)
    };
    Permit {
        authorization_id: authorization,
        model,
        api,
        price_version: price_version.unwrap_or_default(),
        held,
        prompt_tokens: d.prompt_tokens,
        max_tokens: d.max_tokens,
        quantity: d.quantity,
        expires_at: from_ms(d.expires_at_ms),
        downgraded_from: None,
        shadow_denial: None,
        budgets: Vec::new(),
        rate_limits: Vec::new(),
        replayed,
    }
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

impl Engine {
    pub fn new(config: EngineConfig, book: Arc<PriceBook>) -> Self {
        Engine {
            config,
            book,
            directory: RwLock::new(Arc::new(Directory::default())),
            keys: RwLock::new(KeyRing::default()),
            budgets: RwLock::new(Arc::new(BudgetSet::default())),
            state: Mutex::new(State::default()),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn price_book(&self) -> &Arc<PriceBook> {
        &self.book
    }

    pub fn directory(&self) -> Arc<Directory> {
        self.directory.read().clone()
    }

    pub fn set_directory(&self, d: Directory) {
        *self.directory.write() = Arc::new(d);
    }

    pub fn budgets(&self) -> Arc<BudgetSet> {
        self.budgets.read().clone()
    }

    pub fn set_budgets(&self, b: BudgetSet) {
        *self.budgets.write() = Arc::new(b);
    }

    pub fn upsert_key(&self, key: ApiKey) {
        self.keys.write().insert(key);
    }

    pub fn key_count(&self) -> usize {
        self.keys.read().len()
    }

    pub fn key_by_id(&self, id: &Uuid) -> Option<Arc<ApiKey>> {
        self.keys.read().by_id(id).cloned()
    }

    pub fn keys_of(&self, tenant: Option<&str>) -> Vec<Arc<ApiKey>> {
        let mut v: Vec<_> = self
            .keys
            .read()
            .iter()
            .filter(|k| tenant.is_none() || k.tenant.as_deref() == tenant)
            .cloned()
            .collect();
        v.sort_by_key(|k| k.created_at);
        v
    }

    /// Step 1: the key. Unknown, revoked and expired keys are told apart.
    pub fn identify(&self, secret: &str, now: DateTime<Utc>) -> Result<Caller, Denial> {
        let hash = KeyHash::of(secret);
        let key = self
            .keys
            .read()
            .by_hash(&hash)
            .cloned()
            .ok_or_else(|| Denial::new(DenyCode::InvalidApiKey, "the API key is not valid"))?;
        if key.revoked_at.is_some() {
            return Err(Denial::new(
                DenyCode::ApiKeyRevoked,
                "the API key was revoked",
            ));
        }
        if key.expires_at.is_some_and(|e| now >= e) {
            return Err(Denial::new(
                DenyCode::ApiKeyExpired,
                "the API key has expired",
            ));
        }
        Ok(Caller { key })
    }

    /// The scope value of a call for a budget scope, if the call has one. The tenant's,
    /// team's and user's are shared, not copied.
    fn scope_value(
        scope: &ScopeKind,
        tenant: &Arc<str>,
        key: &ApiKey,
        team: Option<&Arc<str>>,
        tags: &Tags,
    ) -> Option<Arc<str>> {
        static GLOBAL: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "*".into());
        let tag = |t: &Option<String>| t.as_deref().map(Arc::from);
        match scope {
            ScopeKind::Global => Some(GLOBAL.clone()),
            ScopeKind::Tenant => Some(tenant.clone()),
            ScopeKind::Team => team.cloned(),
            ScopeKind::User => key.user.clone(),
            ScopeKind::ApiKey => Some(key.id.to_string().into()),
            ScopeKind::EndUser => tag(&tags.end_user),
            ScopeKind::Workflow => tag(&tags.workflow),
            ScopeKind::Campaign => tag(&tags.campaign),
            ScopeKind::Agent => tag(&tags.agent),
            ScopeKind::Feature => tag(&tags.feature),
            ScopeKind::Task => tag(&tags.task),
            ScopeKind::Tag(k) => tags.custom.get(k).map(|v| Arc::from(v.as_str())),
        }
    }

    fn applicable(
        &self,
        tenant: &Tenant,
        key: &ApiKey,
        team: Option<&Arc<str>>,
        tags: &Tags,
        now: DateTime<Utc>,
    ) -> Scoped {
        let set = self.budgets.read().clone();
        let own = set
            .by_tenant
            .get(&*tenant.id)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut budgets = Vec::with_capacity(set.global.len() + own.len());
        let mut buckets = Vec::with_capacity(budgets.capacity());
        for (budget, tz) in set
            .global
            .iter()
            .map(|b| (b, Tz::UTC))
            .chain(own.iter().map(|b| (b, tenant.timezone)))
        {
            let Some(value) = Self::scope_value(&budget.spec.scope, &tenant.id, key, team, tags)
            else {
                continue;
            };
            if let Selector::Value(v) = &budget.spec.selector {
                if **v != *value {
                    continue;
                }
            }
            buckets.push(BucketKey {
                budget: budget.texts().id.clone(),
                period_start: budget.spec.window.period_start(now, tz),
                value,
            });
            budgets.push((budget.clone(), tz));
        }
        Scoped {
            budgets,
            buckets: buckets.into(),
        }
    }

    /// Used (held + spent) and limit of a bucket at `now`, rolling windows and rollover
    /// included.
    fn standing(state: &State, a: &Applicable, now: DateTime<Utc>) -> (Counter, Money) {
        let spec = &a.budget.spec;
        let counter = match spec.window.rolling_slice() {
            // A rolling window sums its slices, the current one and the ones before it.
            Some(slice) => (0..crate::budget::ROLLING_SLICES)
                .filter_map(|i| {
                    state.counters.get(&BucketKey {
                        budget: a.bucket.budget.clone(),
                        value: a.bucket.value.clone(),
                        period_start: a.bucket.period_start - i * slice,
                    })
                })
                .fold(Counter::default(), |sum, c| Counter {
                    held: sum.held + c.held,
                    spent: sum.spent + c.spent,
                }),
            None => state.counters.get(a.bucket).copied().unwrap_or_default(),
        };
        let mut limit = spec.limit;
        if let Some(prev) = Self::rollover_from(a, now) {
            if let Some(p) = state.counters.get(&prev) {
                limit += spec.limit.saturating_sub(p.used()).max(Money::ZERO);
            }
        }
        (counter, limit)
    }

    /// The previous period's bucket, when the budget rolls its unused part over.
    fn rollover_from(a: &Applicable, now: DateTime<Utc>) -> Option<BucketKey> {
        let spec = &a.budget.spec;
        if !spec.rollover || matches!(spec.window, Window::Rolling { .. } | Window::Lifetime) {
            return None;
        }
        let prev_instant = Utc
            .timestamp_opt(a.bucket.period_start - 1, 0)
            .single()
            .unwrap_or(now);
        Some(BucketKey {
            budget: a.bucket.budget.clone(),
            value: a.bucket.value.clone(),
            period_start: spec.window.period_start(prev_instant, a.tz),
        })
    }

    fn lease_want(a: &Applicable, shortfall: Money, now: DateTime<Utc>) -> LeaseWant {
        let spec = &a.budget.spec;
        let percent = match spec.thresholds.emergency_action {
            EmergencyAction::Block => spec.thresholds.emergency_percent,
            EmergencyAction::Downgrade | EmergencyAction::AlertOnly => 100,
        };
        let prior = match spec.window.rolling_slice() {
            Some(slice) => (1..crate::budget::ROLLING_SLICES)
                .map(|i| BucketKey {
                    budget: a.bucket.budget.clone(),
                    value: a.bucket.value.clone(),
                    period_start: a.bucket.period_start - i * slice,
                })
                .collect(),
            None => Vec::new(),
        };
        LeaseWant {
            bucket: a.bucket.clone(),
            shortfall,
            limit: spec.limit,
            percent,
            rollover_from: Self::rollover_from(a, now),
            prior,
        }
    }

    /// From now on the budgets are shared with other instances: this instance may use
    /// each bucket up to what it has used so far (all of it recovered from the ledger)
    /// plus the leases it is granted. Call once, after recovery.
    pub fn share_budgets(&self) {
        let mut state = self.state.lock();
        let allowance = state
            .counters
            .iter()
            .map(|(k, c)| (k.clone(), c.used()))
            .collect();
        state.allowance = Some(allowance);
    }

    /// The open hold a hold entry stands for.
    fn hold_of_entry(e: &Entry, d: &Arc<HoldDetail>) -> Hold {
        let permit = permit_of_hold(
            e.authorization,
            e.held_delta,
            e.model_used.clone(),
            e.price_version.clone(),
            d,
            false,
        );
        let (model, api) = (permit.model.clone(), permit.api.clone());
        let price_version = permit.price_version.clone();
        Hold {
            at_ms: e.at_ms,
            tenant: e.tenant.clone(),
            key_id: e.key_id,
            detail: d.clone(),
            held: e.held_delta,
            model,
            api,
            price_version,
            expires_at_ms: d.expires_at_ms,
            agent: d.tags.agent.clone(),
            permit: d.idempotency_key.is_some().then(|| Arc::new(permit)),
            // Another instance's (or an earlier process's) claim is not this one's.
            fail_open: false,
        }
    }

    /// Whether the open hold `id` was permitted by this engine failing open (the store
    /// away): its claim is this instance's from the start.
    pub fn is_fail_open_hold(&self, id: Uuid) -> bool {
        self.state
            .lock()
            .holds
            .get(&id)
            .is_some_and(|h| h.fail_open)
    }

    /// Shared budgets: takes over an open hold another instance made (its hold entry),
    /// so this instance can finish it. Its amount is in the other instance's use, not
    /// this one's: the finish entry this instance writes carries `cost − held`, and the
    /// sum over instances stays the ledger's.
    pub fn adopt_hold(&self, e: &Entry) -> bool {
        let Some(d) = &e.detail else { return false };
        if e.kind != EntryKind::Hold {
            return false;
        }
        let mut state = self.state.lock();
        if state.finished.contains_key(&e.authorization) {
            return false;
        }
        state
            .holds
            .entry(e.authorization)
            .or_insert_with(|| Self::hold_of_entry(e, d));
        true
    }

    /// Takes up an expired hold this engine has no outcome for (another instance expired
    /// it, or its record left memory), from its hold and expire entries, so that a late
    /// report of its usage is reconciled once as an adjustment, as for one it
    /// remembers. Call it only with the ledger's word that the hold expired. `false`
    /// when it knows the outcome already, or the entries do not fit.
    pub fn adopt_expired(&self, hold: &Entry, expired: &Entry) -> bool {
        let Some(d) = &hold.detail else { return false };
        if hold.kind != EntryKind::Hold
            || expired.kind != EntryKind::Expire
            || hold.authorization != expired.authorization
        {
            return false;
        }
        let id = hold.authorization;
        let mut state = self.state.lock();
        if state.finished.contains_key(&id) {
            return false;
        }
        // Shared budgets: a hold this instance still lists as open was expired by the
        // one that claimed it (its amounts are in that instance's use).
        state.holds.remove(&id);
        let finished = Self::finished_of(expired, Self::hold_of_entry(hold, d));
        state.finished.insert(id, Box::new(finished));
        true
    }

    /// Whether this engine remembers the authorization as expired and not reconciled yet
    /// (a late settle here would record its true cost).
    pub fn is_expired_unreconciled(&self, tenant: &str, id: Uuid) -> bool {
        self.state.lock().finished.get(&id).is_some_and(|f| {
            *f.tenant == *tenant && f.settlement.outcome == Outcome::Expired && f.hold.is_some()
        })
    }

    /// Shared budgets: another instance reconciles (or has reconciled) this expired
    /// hold's late report; a late settle here is answered as an expiry, recording nothing.
    pub fn reconciled_elsewhere(&self, id: Uuid) {
        if let Some(f) = self.state.lock().finished.get_mut(&id) {
            f.hold = None;
        }
    }

    /// Whether this engine has the authorization open (not finished, not unknown).
    pub fn is_open(&self, tenant: &str, id: Uuid) -> bool {
        self.state
            .lock()
            .holds
            .get(&id)
            .is_some_and(|h| *h.tenant == *tenant)
    }

    /// Shared budgets: another instance finished this hold; forget it without any
    /// accounting (the finish and its amounts are in the other instance's use).
    pub fn forget_finished_elsewhere(&self, id: Uuid) {
        self.state.lock().holds.remove(&id);
    }

    /// The holds past their TTL.
    pub fn due_holds(&self, now: DateTime<Utc>) -> Vec<Uuid> {
        let now_ms = ms(now);
        self.state
            .lock()
            .holds
            .iter()
            .filter(|(_, h)| h.expires_at_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Adds a granted lease to a bucket's allowance.
    pub fn add_lease(&self, bucket: &BucketKey, amount: Money) {
        let mut state = self.state.lock();
        if let Some(allowance) = state.allowance.as_mut() {
            *allowance.entry(bucket.clone()).or_default() += amount;
        }
    }

    /// Takes back the unused part of this instance's leases (of `only` these buckets,
    /// or of all): the allowance drops to the use, and the amounts taken are returned
    /// so the store can lower the leases by as much. Lowering here first keeps the
    /// store's leases at or above this instance's use at every moment.
    pub fn take_spare_leases(&self, only: Option<&[BucketKey]>) -> Vec<(BucketKey, Money)> {
        let mut state = self.state.lock();
        let State {
            allowance,
            counters,
            ..
        } = &mut *state;
        let Some(allowance) = allowance.as_mut() else {
            return Vec::new();
        };
        let mut spare = Vec::new();
        for (bucket, allowed) in allowance.iter_mut() {
            if only.is_some_and(|o| !o.contains(bucket)) {
                continue;
            }
            let used = counters.get(bucket).map(|c| c.used()).unwrap_or_default();
            if *allowed > used {
                spare.push((bucket.clone(), *allowed - used));
                *allowed = used;
            }
        }
        spare
    }

    /// A counter with the other instances' use of its bucket added as spent (shared
    /// budgets: what a caller is shown is the use of all instances).
    fn with_elsewhere(state: &State, a: &Applicable, mut c: Counter) -> Counter {
        if let Some(e) = state.elsewhere.get(a.bucket) {
            c.spent += *e;
        }
        c
    }

    fn view(a: &Applicable, counter: Counter, limit: Money) -> BudgetView {
        let texts = a.budget.texts();
        BudgetView {
            budget_id: texts.id.clone(),
            scope: texts.scope.clone(),
            value: a.bucket.value.clone(),
            window: texts.window.clone(),
            period_start: a.bucket.period_start,
            limit,
            spent: counter.spent,
            held: counter.held,
            remaining: limit.saturating_sub(counter.used()).max(Money::ZERO),
            level: Level::of(counter.used(), limit, &a.budget.spec.thresholds),
        }
    }

    /// A mark of the idempotency records made so far, for [`Engine::idempotency_landed`].
    /// Each record is made under the engine's lock with the append of its hold, so every
    /// record before the mark has had its hold appended to the sink.
    pub fn idempotency_mark(&self) -> u64 {
        self.state.lock().idempotency.inserted()
    }

    /// Says that the holds of every idempotency record before `mark` are in the store
    /// (a barrier sent after the mark was read has resolved): only those records may be
    /// forgotten, since a forgotten key is looked up in the store, where a hold not yet
    /// landed would not be found and a second one would be made.
    pub fn idempotency_landed(&self, mark: u64) {
        self.state.lock().idempotency.mark_landed(mark);
    }

    /// Does the engine still remember this idempotency key of this tenant? When it does
    /// not, a retry is looked up in the ledger before it is decided anew.
    pub fn knows_idempotency_key(&self, tenant: &str, key: &str) -> bool {
        let state = self.state.lock();
        // Known only if a retry can be answered from memory: the record and its first
        // answer (the hold's, or its finished outcome's, which may have gone before it).
        state
            .idempotency
            .get(&(tenant.to_string(), key.to_string()))
            .is_some_and(|rec| {
                let id = rec.authorization;
                state.holds.get(&id).is_some_and(|h| h.permit.is_some())
                    || state.finished.get(&id).is_some_and(|f| f.permit.is_some())
            })
    }

    /// Restores the highest level already alerted per bucket (from the stored alerts), so
    /// a restart does not raise the same threshold alert of a period twice.
    pub fn restore_alert_levels(&self, levels: impl IntoIterator<Item = (BucketKey, Level)>) {
        let mut state = self.state.lock();
        for (bucket, level) in levels {
            let l = state.levels.entry(bucket).or_insert(Level::Normal);
            *l = (*l).max(level);
        }
    }

    /// Records a call answered from the response cache: nothing is held or spent, and
    /// the entry (an adjustment of $0 flagged `CACHE_HIT`) names the model, the usage of
    /// the cached answer and the price in effect, so the cost saved is provable from the
    /// ledger. Returns the entry's id and the cost saved.
    pub fn record_cache_hit<S: LedgerSink>(
        &self,
        caller: &Caller,
        model: &str,
        usage: TokenUsage,
        now: DateTime<Utc>,
        sink: &S,
    ) -> Result<(Uuid, Money, S::Ticket), Denial> {
        let m = self.book.resolve(model)?;
        let price = m.price_at(now)?;
        let saved = price.cost(&usage);
        let id = Uuid::now_v7();
        let entry = Entry {
            at_ms: ms(now),
            kind: EntryKind::Adjustment,
            authorization: id,
            tenant: caller.key.tenant.clone().unwrap_or_else(|| "".into()),
            key_id: Some(caller.key.id),
            held_delta: Money::ZERO,
            cost_delta: Money::ZERO,
            charge_delta: Money::ZERO,
            model_requested: Some(m.id.clone()),
            model_used: Some(m.id.clone()),
            price_version: Some(m.version_text(price)),
            usage,
            quantity: 0,
            latency_ms: None,
            flags: flags::CACHE_HIT,
            detail: None,
            hold: None,
        };
        // Appended under the lock like every entry, so ledger order is one order.
        let _state = self.state.lock();
        let ticket = sink.append(vec![entry], Vec::new());
        Ok((id, saved, ticket))
    }

    /// Decides a call and, when permitted, holds its worst-case cost on every budget it
    /// touches. The entry is appended to `sink` before the lock is released.
    pub fn authorize<S: LedgerSink>(
        &self,
        caller: &Caller,
        req: AuthorizeRequest,
        now: DateTime<Utc>,
        sink: &S,
    ) -> Result<(Permit, S::Ticket), Denial> {
        self.authorize_within(caller, req, now, sink, true)
    }

    /// [`Engine::authorize`] when budgets are shared: with `may_ask_lease`
    /// ([`Leases::AskForMore`]), a call that a larger lease would let through (or
    /// through unshaped) is answered [`DenyCode::LeaseNeeded`] before anything changes;
    /// without it, the call is decided within the leases held.
    pub fn authorize_within<S: LedgerSink>(
        &self,
        caller: &Caller,
        req: AuthorizeRequest,
        now: DateTime<Utc>,
        sink: &S,
        may_ask_lease: bool,
    ) -> Result<(Permit, S::Ticket), Denial> {
        let prepared = self.prepare(caller, req, now)?;
        let leases = if may_ask_lease {
            Leases::AskForMore
        } else {
            Leases::WithinHeld
        };
        self.decide(&prepared, sink, leases, Rates::Local)
    }

    /// The first half of a decision, which needs no lock: the key, plan, feature and task
    /// gates, model access, the prompt counted with the model's tokenizer, the budgets
    /// that apply and the rate limits to check. A denial here changes nothing.
    pub fn prepare(
        &self,
        caller: &Caller,
        mut req: AuthorizeRequest,
        now: DateTime<Utc>,
    ) -> Result<Prepared<'_>, Denial> {
        let key = &caller.key;
        let (KeyKind::Member | KeyKind::TenantAdmin) = key.kind else {
            return Err(Denial::new(
                DenyCode::AdminKeyCannotSpend,
                "a platform admin key cannot spend; use a tenant key",
            ));
        };
        let dir = self.directory();
        let tenant = dir
            .tenants
            .get(key.tenant.as_deref().unwrap_or_default())
            .ok_or_else(|| {
                Denial::new(
                    DenyCode::TenantNotFound,
                    "the key's tenant no longer exists",
                )
            })?;
        let tenant_id = tenant.id.clone();
        let plan = dir.plans.get(&tenant.plan).ok_or_else(|| {
            Denial::new(
                DenyCode::TenantNotFound,
                "the tenant's plan no longer exists",
            )
        })?;
        let user = key
            .user
            .as_ref()
            .and_then(|u| dir.users.get(&UserRef(&tenant_id, u)));
        let team = key
            .team
            .clone()
            .or_else(|| user.and_then(|u| u.team.clone()));
        static DEFAULT_ROLE: std::sync::LazyLock<Arc<str>> =
            std::sync::LazyLock::new(|| "default".into());
        let role = key
            .role
            .clone()
            .or_else(|| user.map(|u| u.role.clone()))
            .unwrap_or_else(|| DEFAULT_ROLE.clone());
        // The call's tags are its own from here on (the request keeps what `decide`
        // reads: the metered item and the idempotency key).
        let mut tags = std::mem::take(&mut req.tags);
        if tags.task.is_none() {
            tags.task = Some(plan.default_task.clone());
        }
        let task_name = tags.task.as_deref().unwrap_or_default();
        let mode = tenant.mode;
        // In shadow mode the first denial is remembered and the call goes on.
        let mut shadow: Option<DenyCode> = None;
        let mut gate = |d: Denial| -> Result<(), Denial> {
            match mode {
                EnforcementMode::Enforce => Err(d),
                EnforcementMode::Shadow => {
                    shadow.get_or_insert(d.code);
                    Ok(())
                }
                EnforcementMode::Off => Ok(()),
            }
        };

        // Feature and task gate.
        if let Some(f) = &tags.feature {
            if !plan.features.contains(f) {
                gate(Denial::new(
                    DenyCode::FeatureNotInPlan,
                    format!("feature `{f}` is not in plan `{}`", plan.id),
                ))?;
            }
        }
        let task = plan.tasks.get(task_name);
        if task.is_none() {
            gate(Denial::new(
                DenyCode::TaskNotInPlan,
                format!("task `{task_name}` is not in plan `{}`", plan.id),
            ))?;
        }

        // Model access, prompt size and the price in effect.
        let priced = match &req.metered {
            Metered::Model {
                model,
                prompt,
                max_tokens,
            } => {
                let m = self.book.resolve(model)?;
                if let Some(t) = task {
                    if !t.classes.contains(&m.class) {
                        gate(Denial::new(
                            DenyCode::ModelClassNotAllowed,
                            format!(
                                "model `{}` is of class `{}`, which plan `{}` does not allow for task `{task_name}` (allowed: {})",
                                m.id,
                                m.class,
                                plan.id,
                                t.classes.join(", ")
                            ),
                        ))?;
                    }
                }
                let prompt_tokens = match prompt {
                    Prompt::Tokens(n) => *n,
                    Prompt::Text(t) => tokens::count_text(m.tokenizer, t),
                    Prompt::Messages(msgs) => tokens::count_messages(m.tokenizer, msgs),
                };
                if prompt_tokens > MAX_PROMPT_TOKENS || prompt_tokens >= u64::from(m.context_window)
                {
                    return Err(Denial::new(
                        DenyCode::PromptTooLong,
                        format!(
                            "the prompt has {prompt_tokens} tokens; `{}` takes at most {}",
                            m.id, m.context_window
                        ),
                    ));
                }
                let mut cap = m.max_output_tokens;
                if let Some(t) = task {
                    cap = cap.min(t.max_tokens);
                }
                let room = u64::from(m.context_window) - prompt_tokens;
                cap = cap.min(u32::try_from(room).unwrap_or(u32::MAX));
                let wanted = max_tokens.map_or(cap, |mt| mt.min(cap));
                if *max_tokens == Some(0) {
                    return Err(Denial::new(
                        DenyCode::InvalidRequest,
                        "max_tokens must be at least 1",
                    ));
                }
                Priced::Model {
                    model: m,
                    prompt_tokens,
                    max_tokens: wanted,
                }
            }
            Metered::Api { api, quantity } => {
                if *quantity == 0 || *quantity > MAX_QUANTITY {
                    return Err(Denial::new(
                        DenyCode::InvalidRequest,
                        format!("quantity must be between 1 and {MAX_QUANTITY}"),
                    ));
                }
                Priced::Api {
                    api: self.book.resolve_api(api)?.id.clone(),
                    quantity: *quantity,
                }
            }
        };

        let ttl = req.ttl.unwrap_or(self.config.hold_ttl).min(MAX_HOLD_TTL);
        let applicable = self.applicable(tenant, key, team.as_ref(), &tags, now);
        let limits = plan.rate_limits.get(&*role).copied().unwrap_or_default();

        // The rate limits to check: checked and taken by `decide`, or by a distributed
        // limiter before it.
        let mut rate_checks: Vec<(RateCell, u64, u32)> = Vec::new();
        if mode != EnforcementMode::Off {
            let mut add = |limit: u16,
                           subject: Subject,
                           rpm: Option<std::num::NonZeroU32>,
                           tpm: Option<std::num::NonZeroU32>| {
                if let Some(rpm) = rpm {
                    rate_checks.push((
                        RateCell {
                            limit,
                            subject: subject.clone(),
                            tokens: false,
                        },
                        1,
                        rpm.get(),
                    ));
                }
                if let Some(tpm) = tpm {
                    rate_checks.push((
                        RateCell {
                            limit,
                            subject,
                            tokens: true,
                        },
                        priced.estimated_tokens(),
                        tpm.get(),
                    ));
                }
            };
            add(
                ROLE_LIMIT,
                Subject::Key(key.id),
                limits.requests_per_minute,
                limits.tokens_per_minute,
            );
            let item = priced.item_id();
            for (i, l) in plan.limits.iter().enumerate() {
                if l.role.as_ref().is_some_and(|r| **r != *role)
                    || l.model.as_ref().is_some_and(|m| **m != **item)
                {
                    continue;
                }
                let subject = match (l.per, &key.user) {
                    (LimitPer::User, Some(u)) => Subject::User(tenant_id.clone(), u.to_string()),
                    (LimitPer::Key | LimitPer::User, _) => Subject::Key(key.id),
                    (LimitPer::Tenant, _) => Subject::Tenant(tenant_id.clone()),
                    (LimitPer::Model, _) => Subject::Model(tenant_id.clone(), item.clone()),
                };
                let index = u16::try_from(i).unwrap_or(ROLE_LIMIT - 1);
                add(index, subject, l.requests_per_minute, l.tokens_per_minute);
            }
        }
        Ok(Prepared {
            key: key.clone(),
            fail_open: tenant.failure_policy == FailurePolicy::FailOpen,
            dir: dir.clone(),
            req,
            now,
            tenant_id,
            role,
            tags,
            team,
            mode,
            shadow,
            priced,
            ttl,
            applicable,
            rate_checks,
            id: Uuid::now_v7(),
        })
    }

    /// The second half of a decision, under the engine's lock: idempotency, rate limits
    /// (this instance's own cells, or outcomes a distributed limiter has already taken),
    /// budgets, shaping, and the hold. `prepared` may be decided again after a denial
    /// (an instance that asked for a larger lease does).
    pub fn decide<S: LedgerSink>(
        &self,
        prepared: &Prepared<'_>,
        sink: &S,
        leases: Leases,
        rates: Rates<'_>,
    ) -> Result<(Permit, S::Ticket), Denial> {
        let Prepared {
            ref key,
            ref req,
            now,
            ref tenant_id,
            ref role,
            ref tags,
            ref team,
            mode,
            mut shadow,
            ref applicable,
            ref rate_checks,
            ttl,
            id,
            ..
        } = *prepared;
        let now_ms = ms(now);
        let estimated_tokens = prepared.priced.estimated_tokens();
        let mut downgraded_from = None;

        let mut state = self.state.lock();

        // Idempotency: a retry gets the first answer, a different request gets 409.
        if let Some(k) = &req.idempotency_key {
            if let Some(rec) = state.idempotency.get(&(tenant_id.to_string(), k.clone())) {
                if rec.fingerprint != req.fingerprint {
                    return Err(Denial::new(
                        DenyCode::IdempotencyKeyReused,
                        "this Idempotency-Key was used with a different request",
                    ));
                }
                let first = rec.authorization;
                let permit = state
                    .holds
                    .get(&first)
                    .and_then(|h| h.permit.clone())
                    .or_else(|| state.finished.get(&first).and_then(|f| f.permit.clone()));
                if let Some(p) = permit {
                    let mut p = p.as_ref().clone();
                    p.replayed = true;
                    return Ok((p, sink.append(Vec::new(), Vec::new())));
                }
                return Err(Denial::new(
                    DenyCode::IdempotencyKeyReused,
                    "this Idempotency-Key belongs to an authorization that is no longer held in memory",
                ));
            }
        }

        // Rate limits: this instance's cells are checked here and taken with the hold;
        // a distributed limiter's were taken before (and are given back if this denies).
        // A call's rate cells and budgets are few: kept on the stack.
        let mut rate_updates: SmallVec<[(RateCell, Gcra); 4]> = SmallVec::new();
        let mut rate_limits = Vec::with_capacity(rate_checks.len());
        for (i, (cell, n, per_minute)) in rate_checks.iter().enumerate() {
            let outcome = match rates {
                Rates::Taken(taken) if i < taken.len() => taken[i],
                _ => {
                    let g = state.limiters.get(cell).copied().unwrap_or_default();
                    g.check(now_ms, *n, *per_minute).map(|next| {
                        rate_updates.push((cell.clone(), next));
                        RateLeft::of(next.standing(now_ms, *per_minute))
                    })
                }
            };
            match outcome {
                Ok(left) => rate_limits.push(RateStanding {
                    dimension: Cow::Borrowed(if cell.tokens { "tokens" } else { "requests" }),
                    per: Cow::Borrowed(cell.per()),
                    limit_per_minute: *per_minute,
                    remaining: left.remaining,
                    reset_ms: u64::try_from(left.reset.as_millis()).unwrap_or(u64::MAX),
                }),
                Err(RateError::Wait(wait)) => {
                    let mut d = Denial::new(
                        DenyCode::RateLimited,
                        format!(
                            "rate limit of {per_minute} {} per minute reached",
                            cell.describe(role)
                        ),
                    );
                    d.retry_after = Some(wait);
                    if mode == EnforcementMode::Enforce {
                        return Err(d);
                    }
                    shadow.get_or_insert(d.code);
                }
                Err(RateError::NeverFits) => {
                    let d = Denial::new(
                        DenyCode::ExceedsRateLimitCapacity,
                        format!(
                            "this request needs {n} units; the limit is {per_minute} per minute"
                        ),
                    );
                    if mode == EnforcementMode::Enforce {
                        return Err(d);
                    }
                    shadow.get_or_insert(d.code);
                }
            }
        }

        // Budgets: the room left on the tightest bucket, and emergency actions. With
        // shared budgets the room is what this instance's leases leave (what it knows of
        // the others' use is not the bound: the leases are).
        let mut room = Money::MAX;
        let mut downgrade = false;
        let mut standings: SmallVec<[(Counter, Money); 8]> = SmallVec::new();
        let mut lease_rooms = Vec::new();
        for a in applicable.iter() {
            let (counter, limit) = Self::standing(&state, &a, now);
            let t = &a.budget.spec.thresholds;
            let level = Level::of(counter.used(), limit, t);
            let effective_limit = match t.emergency_action {
                EmergencyAction::Block => limit.mul_div_floor(i64::from(t.emergency_percent), 100),
                EmergencyAction::Downgrade => {
                    if level >= Level::Emergency {
                        downgrade = true;
                    }
                    limit
                }
                EmergencyAction::AlertOnly => limit,
            };
            match state
                .allowance
                .as_ref()
                .filter(|_| leases != Leases::FailOpen)
            {
                Some(allowance) => {
                    let used_here = state
                        .counters
                        .get(a.bucket)
                        .map(|c| c.used())
                        .unwrap_or_default();
                    let lease_room = allowance
                        .get(a.bucket)
                        .copied()
                        .unwrap_or_default()
                        .saturating_sub(used_here);
                    room = room.min(lease_room.max(Money::ZERO));
                    lease_rooms.push(lease_room);
                }
                None => {
                    room = room.min(
                        effective_limit
                            .saturating_sub(counter.used())
                            .max(Money::ZERO),
                    );
                }
            }
            standings.push((counter, limit));
        }

        let mut priced = prepared.priced.clone();
        if downgrade {
            // The plan and task `prepare` gated, from the same directory.
            let dir = &prepared.dir;
            let task = dir
                .tenants
                .get(&*prepared.tenant_id)
                .and_then(|t| dir.plans.get(&t.plan))
                .zip(prepared.tags.task.as_deref())
                .and_then(|(p, task)| p.tasks.get(task));
            if let (Priced::Model { model, .. }, Some(t)) = (&mut priced, task) {
                if let Some(cheaper) = self.cheapest_allowed(model, &t.classes, now) {
                    downgraded_from = Some(model.id.clone());
                    *model = cheaper;
                }
            }
        }

        // Price the worst case, shaping max_tokens down to what the room can pay.
        let (held, price_version, max_tokens, worst_case) = match &priced {
            Priced::Model {
                model,
                prompt_tokens,
                max_tokens,
            } => {
                let price = model.price_at(now)?;
                let base = price.cost_pico(&TokenUsage {
                    input_tokens: *prompt_tokens,
                    cached_input_tokens: 0,
                    output_tokens: 0,
                });
                let out = i128::from(price.output.picos());
                let mut mt = *max_tokens;
                let full = Money::from_pico_ceil(base + out * i128::from(mt));
                if full > room && mode == EnforcementMode::Enforce {
                    let room_pico = i128::from(room.nanos()) * PICOS_PER_NANO;
                    let affordable = if out > 0 {
                        (room_pico - base).max(0) / out
                    } else {
                        0
                    };
                    mt = u32::try_from(affordable).unwrap_or(0).min(mt);
                }
                let hold = Money::from_pico_ceil(base + out * i128::from(mt));
                (hold, model.version_text(price), Some(mt), full)
            }
            Priced::Api { api, quantity } => {
                let a = self.book.resolve_api(api)?;
                let price = a.price_at(now)?;
                let cost = price.cost(*quantity);
                (cost, a.version_text(price), None, cost)
            }
        };
        // Shared budgets: a lease short of the unshaped worst case is asked for first.
        if leases == Leases::AskForMore
            && mode == EnforcementMode::Enforce
            && !lease_rooms.is_empty()
        {
            let leases: Vec<LeaseWant> = applicable
                .iter()
                .zip(&lease_rooms)
                .filter(|(_, r)| **r < worst_case)
                .map(|(a, r)| Self::lease_want(&a, worst_case.saturating_sub(*r), now))
                .collect();
            if !leases.is_empty() {
                let mut d = Denial::new(
                    DenyCode::LeaseNeeded,
                    "this instance needs a larger lease of a shared budget",
                );
                d.leases = leases;
                return Err(d);
            }
        }
        let too_small = max_tokens.is_some_and(|mt| {
            mt < self
                .config
                .min_output_tokens
                .min(priced.max_tokens_wanted())
        });
        if held > room || too_small {
            let tight = applicable
                .iter()
                .zip(&standings)
                .min_by_key(|(_, (c, l))| l.saturating_sub(c.used()))
                .map(|(a, _)| {
                    format!(
                        "{} budget `{}` ({})",
                        a.budget.spec.window, a.budget.id, a.budget.spec.scope
                    )
                })
                .unwrap_or_default();
            let d = Denial::new(
                DenyCode::BudgetExceeded,
                format!("the call's worst case of ${held} does not fit the {tight}: ${room} left"),
            );
            if mode == EnforcementMode::Enforce {
                return Err(d);
            }
            shadow.get_or_insert(d.code);
        }

        // Permit: take the rate cells, hold on every bucket, record.
        for (cell, g) in rate_updates {
            state.limiters.insert(cell, g);
        }
        let mut views = Vec::with_capacity(applicable.len());
        let mut alerts = Vec::new();
        for (a, (counter, limit)) in applicable.iter().zip(&standings) {
            with_counter(&mut state.counters, a.bucket, |c| c.held += held);
            let after = Counter {
                held: counter.held + held,
                spent: counter.spent,
            };
            views.push(Self::view(
                &a,
                Self::with_elsewhere(&state, &a, after),
                *limit,
            ));
            Self::note_level(
                &mut state,
                &a,
                after.used(),
                *limit,
                now_ms,
                tenant_id,
                &mut alerts,
            );
        }
        let expires_at_ms = now_ms + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let (model_id, api_id, prompt_tokens, quantity) = match &priced {
            Priced::Model {
                model,
                prompt_tokens,
                ..
            } => (Some(model.id.clone()), None, *prompt_tokens, 0),
            Priced::Api { api, quantity } => (None, Some(api.clone()), 0, *quantity),
        };
        let model_requested = match &req.metered {
            Metered::Model { model, .. } => Some(model.clone()),
            Metered::Api { api, .. } => Some(api.clone()),
        };
        let detail = Arc::new(HoldDetail {
            buckets: applicable.buckets.clone(),
            tags: tags.clone(),
            team: team.clone(),
            user: key.user.clone(),
            expires_at_ms,
            idempotency_key: req.idempotency_key.clone(),
            fingerprint: req.fingerprint.clone(),
            max_tokens,
            prompt_tokens,
            quantity,
            rate_tokens: estimated_tokens,
        });
        let permit = Permit {
            authorization_id: id,
            model: model_id.clone(),
            api: api_id.clone(),
            price_version: price_version.clone(),
            held,
            prompt_tokens,
            max_tokens,
            quantity,
            expires_at: from_ms(expires_at_ms),
            downgraded_from: downgraded_from.clone(),
            shadow_denial: shadow,
            budgets: views,
            rate_limits,
            replayed: false,
        };
        let mut entry_flags = 0;
        if shadow.is_some() {
            entry_flags |= flags::SHADOW_DENIED;
        }
        if downgraded_from.is_some() {
            entry_flags |= flags::DOWNGRADED;
        }
        if leases == Leases::FailOpen {
            entry_flags |= flags::FAIL_OPEN;
        }
        let entry = Entry {
            at_ms: now_ms,
            kind: EntryKind::Hold,
            authorization: id,
            tenant: tenant_id.clone(),
            key_id: Some(key.id),
            held_delta: held,
            cost_delta: Money::ZERO,
            charge_delta: Money::ZERO,
            model_requested,
            model_used: model_id.clone().or(api_id.clone()),
            price_version: Some(price_version.clone()),
            usage: TokenUsage {
                input_tokens: prompt_tokens,
                cached_input_tokens: 0,
                output_tokens: u64::from(max_tokens.unwrap_or(0)),
            },
            quantity,
            latency_ms: None,
            flags: entry_flags,
            detail: Some(detail.clone()),
            hold: None,
        };
        if let Some(k) = &req.idempotency_key {
            state.idempotency.insert(
                (tenant_id.to_string(), k.clone()),
                IdempotencyRecord {
                    fingerprint: req.fingerprint.clone(),
                    authorization: id,
                    at_ms: now_ms,
                },
            );
        }
        state.holds.insert(
            id,
            Hold {
                at_ms: now_ms,
                tenant: tenant_id.clone(),
                key_id: Some(key.id),
                detail,
                held,
                model: model_id,
                api: api_id,
                price_version,
                expires_at_ms,
                agent: tags.agent.clone(),
                permit: req
                    .idempotency_key
                    .is_some()
                    .then(|| Arc::new(permit.clone())),
                fail_open: leases == Leases::FailOpen,
            },
        );
        let ticket = sink.append(vec![entry], alerts);
        Ok((permit, ticket))
    }

    /// The cheapest model (by output price) of the cheapest allowed class, preferring the
    /// same provider.
    fn cheapest_allowed<'a>(
        &'a self,
        current: &Model,
        classes: &[String],
        now: DateTime<Utc>,
    ) -> Option<&'a Model> {
        let out_price = |m: &Model| m.price_at(now).map(|p| p.output).ok();
        let current_price = out_price(current)?;
        self.book
            .models()
            .iter()
            .filter(|m| classes.contains(&m.class) && m.class != "embedding")
            .filter_map(|m| out_price(m).map(|p| (m, p)))
            .filter(|(_, p)| *p < current_price)
            .min_by_key(|(m, p)| (m.provider != current.provider, *p))
            .map(|(m, _)| m)
    }

    /// Records a level change on a bucket as an alert, once per level and period.
    fn note_level(
        state: &mut State,
        a: &Applicable,
        used: Money,
        limit: Money,
        now_ms: i64,
        tenant: &Arc<str>,
        alerts: &mut Vec<AlertEvent>,
    ) {
        let used = used
            + state
                .elsewhere
                .get(a.bucket)
                .copied()
                .unwrap_or(Money::ZERO);
        let level = Level::of(used, limit, &a.budget.spec.thresholds);
        let last = state.levels.get(a.bucket).copied().unwrap_or(Level::Normal);
        if level > last {
            state.levels.insert(a.bucket.clone(), level);
            alerts.push(AlertEvent {
                at_ms: now_ms,
                tenant: a
                    .budget
                    .tenant
                    .as_deref()
                    .map(Arc::from)
                    .or_else(|| (!tenant.is_empty()).then(|| tenant.clone())),
                bucket: a.bucket.clone(),
                level,
                limit,
                used,
                reason: "threshold".into(),
            });
        }
    }

    /// Settles an authorization from the real usage, releasing the rest of the hold.
    pub fn settle<S: LedgerSink>(
        &self,
        tenant: &str,
        id: Uuid,
        usage: Usage,
        now: DateTime<Utc>,
        sink: &S,
    ) -> Result<(Settlement, S::Ticket), FinishError> {
        self.finish(tenant, id, Some(usage), Outcome::Settled, now, sink)
    }

    /// Voids an authorization: the call failed. `usage`, when given, is its true cost
    /// (a provider may bill a failed call); otherwise the cost is zero.
    pub fn void<S: LedgerSink>(
        &self,
        tenant: &str,
        id: Uuid,
        usage: Option<Usage>,
        now: DateTime<Utc>,
        sink: &S,
    ) -> Result<(Settlement, S::Ticket), FinishError> {
        self.finish(tenant, id, usage, Outcome::Voided, now, sink)
    }

    fn price_usage(
        &self,
        hold: &Hold,
        usage: Option<&Usage>,
        now: DateTime<Utc>,
    ) -> Result<UsagePriced, FinishError> {
        let Some(u) = usage else {
            return Ok(UsagePriced {
                cost: Money::ZERO,
                price_version: hold.price_version.clone(),
                model_used: hold.model.clone().or(hold.api.clone()),
                drift: false,
            });
        };
        if let Some(api) = &hold.api {
            let a = self
                .book
                .resolve_api(api)
                .map_err(|e| FinishError::new(FinishCode::UnknownModel, e.to_string()))?;
            let at = from_ms(hold.at_ms).min(now);
            let price = a
                .price_at(at)
                .map_err(|e| FinishError::new(FinishCode::UnknownModel, e.to_string()))?;
            return Ok(UsagePriced {
                cost: price.cost(u.quantity),
                price_version: a.version_text(price),
                model_used: Some(api.clone()),
                drift: false,
            });
        }
        let permitted = hold.model.as_deref().unwrap_or_default();
        let used = match &u.model_used {
            Some(m) => self
                .book
                .resolve(m)
                .map_err(|e| FinishError::new(FinishCode::UnknownModel, e.to_string()))?,
            None => self
                .book
                .resolve(permitted)
                .map_err(|e| FinishError::new(FinishCode::UnknownModel, e.to_string()))?,
        };
        if u.tokens.cached_input_tokens > u.tokens.input_tokens {
            return Err(FinishError::new(
                FinishCode::InvalidUsage,
                "cached_input_tokens cannot exceed input_tokens",
            ));
        }
        // The price in effect when the call was authorized.
        let at = from_ms(hold.at_ms).min(now);
        let price = used
            .price_at(at)
            .map_err(|e| FinishError::new(FinishCode::UnknownModel, e.to_string()))?;
        Ok(UsagePriced {
            cost: price.cost(&u.tokens),
            price_version: used.version_text(price),
            model_used: Some(used.id.clone()),
            drift: *used.id != *permitted,
        })
    }

    fn finish<S: LedgerSink>(
        &self,
        tenant: &str,
        id: Uuid,
        usage: Option<Usage>,
        outcome: Outcome,
        now: DateTime<Utc>,
        sink: &S,
    ) -> Result<(Settlement, S::Ticket), FinishError> {
        if let Some(u) = &usage {
            if u.tokens.input_tokens > MAX_PROMPT_TOKENS
                || u.tokens.output_tokens > MAX_PROMPT_TOKENS
                || u.quantity > MAX_QUANTITY
            {
                return Err(FinishError::new(
                    FinishCode::InvalidUsage,
                    "usage is out of range",
                ));
            }
        }
        let now_ms = ms(now);
        let mut state = self.state.lock();
        let Some(hold) = state.holds.get(&id).filter(|h| *h.tenant == *tenant) else {
            return self.finish_finished(&mut state, tenant, id, usage, outcome, now, sink);
        };
        let UsagePriced {
            cost,
            price_version,
            model_used,
            drift,
        } = self.price_usage(hold, usage.as_ref(), now)?;
        let tokens = usage.as_ref().map(|u| u.tokens).unwrap_or_default();
        let quantity = usage.as_ref().map_or(0, |u| u.quantity);
        let charge = self.charge_for(
            &hold.tenant,
            cost,
            hold.agent.as_deref(),
            tokens.total(),
            quantity,
        );
        let overage = cost.saturating_sub(hold.held).max(Money::ZERO);
        let mut entry_flags = 0;
        if overage > Money::ZERO {
            entry_flags |= flags::OVERAGE;
        }
        if drift {
            entry_flags |= flags::DRIFT;
        }
        if usage.as_ref().is_some_and(|u| u.estimated) {
            entry_flags |= flags::ESTIMATED;
        }
        let kind = match outcome {
            Outcome::Settled => EntryKind::Settle,
            Outcome::Voided => EntryKind::Void,
            Outcome::Expired => EntryKind::Expire,
        };
        let entry = Entry {
            at_ms: now_ms,
            kind,
            authorization: id,
            tenant: hold.tenant.clone(),
            key_id: hold.key_id,
            held_delta: -hold.held,
            cost_delta: cost,
            charge_delta: charge,
            model_requested: hold.model.clone().or(hold.api.clone()),
            model_used: model_used.clone(),
            price_version: Some(price_version.clone()),
            usage: tokens,
            quantity,
            latency_ms: usage.as_ref().and_then(|u| u.latency_ms),
            flags: entry_flags,
            detail: None,
            hold: Some(hold.detail.clone()),
        };
        // Taken out (not copied) once nothing can refuse the call any more.
        let Some(hold) = state.holds.remove(&id) else {
            return self.finish_finished(&mut state, tenant, id, usage, outcome, now, sink);
        };
        let alerts = self.apply_to_buckets(
            &mut state, &hold, -hold.held, cost, now, now_ms, overage, drift,
        );
        // Kept in canonical form, so a retry names the model in any spelling.
        let usage = usage.map(|mut u| {
            u.model_used = model_used.clone();
            u
        });
        let settlement = Settlement {
            authorization_id: id,
            outcome,
            cost,
            charge,
            released: hold.held,
            overage,
            model_used,
            price_version,
            drift,
            replayed: false,
        };
        state.finished.trim(MAX_FINISHED_IN_MEMORY - 1, i64::MIN);
        state.finished.insert(
            id,
            Box::new(Finished {
                tenant: hold.tenant,
                usage,
                settlement: settlement.clone(),
                finished_at_ms: now_ms,
                permit: hold.permit,
                hold: None,
            }),
        );
        let ticket = sink.append(vec![entry], alerts);
        Ok((settlement, ticket))
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_to_buckets(
        &self,
        state: &mut State,
        hold: &Hold,
        held_delta: Money,
        cost_delta: Money,
        now: DateTime<Utc>,
        now_ms: i64,
        overage: Money,
        drift: bool,
    ) -> Vec<AlertEvent> {
        let budgets = self.budgets.read().clone();
        let dir = self.directory.read().clone();
        let tz = dir
            .tenants
            .get(&*hold.tenant)
            .map_or(Tz::UTC, |t| t.timezone);
        let mut alerts = Vec::new();
        for b in hold.detail.buckets.iter() {
            let used = with_counter(&mut state.counters, b, |c| {
                c.held += held_delta;
                c.spent += cost_delta;
                c.used()
            });
            if let Some(budget) = budgets.get(&b.budget) {
                let a = Applicable {
                    budget,
                    bucket: b,
                    tz: if budget.tenant.is_some() { tz } else { Tz::UTC },
                };
                let (_, limit) = Self::standing(state, &a, now);
                Self::note_level(state, &a, used, limit, now_ms, &hold.tenant, &mut alerts);
                if overage > Money::ZERO || drift {
                    alerts.push(AlertEvent {
                        at_ms: now_ms,
                        tenant: Some(hold.tenant.clone()),
                        bucket: b.clone(),
                        level: Level::of(used, limit, &budget.spec.thresholds),
                        limit,
                        used,
                        reason: if overage > Money::ZERO {
                            "overage"
                        } else {
                            "drift"
                        }
                        .into(),
                    });
                }
            }
        }
        alerts
    }

    fn charge_for(
        &self,
        tenant: &str,
        cost: Money,
        agent: Option<&str>,
        tokens: u64,
        quantity: u64,
    ) -> Money {
        let dir = self.directory.read().clone();
        dir.tenants
            .get(tenant)
            .and_then(|t| dir.plans.get(&t.plan))
            .map_or(cost, |p: &Plan| {
                p.rate_card.charge(cost, agent, tokens, quantity)
            })
    }

    /// A settle or void of an authorization that is not open: replay, reconcile or refuse.
    #[allow(clippy::too_many_arguments)]
    fn finish_finished<S: LedgerSink>(
        &self,
        state: &mut State,
        tenant: &str,
        id: Uuid,
        usage: Option<Usage>,
        outcome: Outcome,
        now: DateTime<Utc>,
        sink: &S,
    ) -> Result<(Settlement, S::Ticket), FinishError> {
        let Some(f) = state
            .finished
            .get(&id)
            .filter(|f| *f.tenant == *tenant)
            .cloned()
        else {
            return Err(FinishError::new(
                FinishCode::AuthorizationNotFound,
                format!("no authorization `{id}`"),
            ));
        };
        let usage = usage.map(|mut u| {
            u.model_used = match &u.model_used {
                Some(m) => Some(
                    self.book
                        .resolve(m)
                        .map_or_else(|_| m.clone(), |m| m.id.clone()),
                ),
                None => f.settlement.model_used.clone(),
            };
            u
        });
        match f.settlement.outcome {
            Outcome::Settled | Outcome::Voided
                if f.settlement.outcome == outcome && f.usage == usage =>
            {
                let mut s = f.settlement.clone();
                s.replayed = true;
                Ok((s, sink.append(Vec::new(), Vec::new())))
            }
            Outcome::Settled => Err(FinishError::new(
                FinishCode::AuthorizationAlreadySettled,
                format!(
                    "authorization `{id}` was already settled at ${}",
                    f.settlement.cost
                ),
            )),
            Outcome::Voided => Err(FinishError::new(
                FinishCode::AuthorizationVoided,
                format!("authorization `{id}` was voided"),
            )),
            Outcome::Expired => {
                // A late report of an expired hold: record the true cost as an adjustment
                // against what the expiry charged, once, and still answer 409.
                if let (Some(hold), Some(u)) = (f.hold.clone(), usage.as_ref()) {
                    let now_ms = ms(now);
                    let UsagePriced {
                        cost,
                        price_version,
                        model_used,
                        drift,
                    } = self.price_usage(&hold, Some(u), now)?;
                    let delta = cost - f.settlement.cost;
                    let charge = self.charge_for(
                        tenant,
                        cost,
                        hold.agent.as_deref(),
                        u.tokens.total(),
                        u.quantity,
                    ) - f.settlement.charge;
                    let entry = Entry {
                        at_ms: now_ms,
                        kind: EntryKind::Adjustment,
                        authorization: id,
                        tenant: f.tenant.clone(),
                        key_id: hold.key_id,
                        held_delta: Money::ZERO,
                        cost_delta: delta,
                        charge_delta: charge,
                        model_requested: hold.model.clone().or(hold.api.clone()),
                        model_used,
                        price_version: Some(price_version),
                        usage: u.tokens,
                        quantity: u.quantity,
                        latency_ms: u.latency_ms,
                        flags: flags::RECONCILED | if drift { flags::DRIFT } else { 0 },
                        detail: None,
                        hold: Some(hold.detail.clone()),
                    };
                    let alerts = self.apply_to_buckets(
                        state,
                        &hold,
                        Money::ZERO,
                        delta,
                        now,
                        now_ms,
                        Money::ZERO,
                        drift,
                    );
                    if let Some(rec) = state.finished.get_mut(&id) {
                        rec.hold = None;
                    }
                    let ticket = sink.append(vec![entry], alerts);
                    // Answered as an expiry (the caller learns it was late), with the
                    // true cost now on record.
                    return Ok((
                        Settlement {
                            authorization_id: id,
                            outcome: Outcome::Expired,
                            cost,
                            charge: f.settlement.charge + charge,
                            released: Money::ZERO,
                            overage: Money::ZERO,
                            model_used: Some(
                                hold.model.clone().or(hold.api.clone()).unwrap_or_default(),
                            ),
                            price_version: hold.price_version.clone(),
                            drift,
                            replayed: false,
                        },
                        ticket,
                    ));
                }
                Err(FinishError::new(
                    FinishCode::AuthorizationExpired,
                    format!(
                        "authorization `{id}` had expired and was charged ${}",
                        f.settlement.cost
                    ),
                ))
            }
        }
    }

    /// Expires holds past their TTL and forgets old outcomes and idempotency keys.
    pub fn expire_due<S: LedgerSink>(
        &self,
        now: DateTime<Utc>,
        sink: &S,
    ) -> (usize, Option<S::Ticket>) {
        let due = self.due_holds(now);
        self.expire(&due, now, sink)
    }

    /// Expires these holds (those still open), and trims the in-memory caches. With
    /// shared budgets the edge claims them in the store first.
    pub fn expire<S: LedgerSink>(
        &self,
        due: &[Uuid],
        now: DateTime<Utc>,
        sink: &S,
    ) -> (usize, Option<S::Ticket>) {
        let now_ms = ms(now);
        let mut state = self.state.lock();
        let mut entries = Vec::with_capacity(due.len());
        let mut alerts = Vec::new();
        for id in due {
            let Some(hold) = state.holds.remove(id) else {
                continue;
            };
            let cost = match self.config.expiry_policy {
                ExpiryPolicy::ChargeHold => hold.held,
                ExpiryPolicy::Release => Money::ZERO,
            };
            let charge = self.charge_for(
                &hold.tenant,
                cost,
                hold.agent.as_deref(),
                0,
                hold.detail.quantity,
            );
            alerts.extend(self.apply_to_buckets(
                &mut state,
                &hold,
                -hold.held,
                cost,
                now,
                now_ms,
                Money::ZERO,
                false,
            ));
            entries.push(Entry {
                at_ms: now_ms,
                kind: EntryKind::Expire,
                authorization: *id,
                tenant: hold.tenant.clone(),
                key_id: hold.key_id,
                held_delta: -hold.held,
                cost_delta: cost,
                charge_delta: charge,
                model_requested: hold.model.clone().or(hold.api.clone()),
                model_used: hold.model.clone().or(hold.api.clone()),
                price_version: Some(hold.price_version.clone()),
                usage: TokenUsage::default(),
                quantity: 0,
                latency_ms: None,
                flags: 0,
                detail: None,
                hold: Some(hold.detail.clone()),
            });
            state.finished.insert(
                *id,
                Box::new(Finished {
                    tenant: hold.tenant.clone(),
                    usage: None,
                    settlement: Settlement {
                        authorization_id: *id,
                        outcome: Outcome::Expired,
                        cost,
                        charge,
                        released: hold.held,
                        overage: Money::ZERO,
                        model_used: hold.model.clone(),
                        price_version: hold.price_version.clone(),
                        drift: false,
                        replayed: false,
                    },
                    finished_at_ms: now_ms,
                    permit: hold.permit.clone(),
                    hold: Some(Box::new(hold)),
                }),
            );
        }
        self.prune_locked(&mut state, now.timestamp());
        let keep_finished = now_ms - i64::try_from(FINISHED_RETENTION.as_millis()).unwrap_or(0);
        state.finished.trim(MAX_FINISHED_IN_MEMORY, keep_finished);
        let remembered = IDEMPOTENCY_TTL.min(self.config.idempotency_window);
        let keep_idem = now_ms - i64::try_from(remembered.as_millis()).unwrap_or(0);
        state
            .idempotency
            .trim_landed(MAX_IDEMPOTENCY_IN_MEMORY, keep_idem);
        let n = entries.len();
        let ticket = (n > 0).then(|| sink.append(entries, alerts));
        (n, ticket)
    }

    /// Counters of every bucket, for reports and for comparing with a rebuild.
    pub fn counters(&self) -> HashMap<BucketKey, Counter> {
        let state = self.state.lock();
        state
            .counters
            .iter()
            .map(|(k, c)| (k.clone(), *c))
            .collect()
    }

    /// Shared budgets: the buckets this engine counts, to learn the use of all instances.
    pub fn counted_buckets(&self) -> Vec<BucketKey> {
        self.state.lock().counters.keys().cloned().collect()
    }

    /// Shared budgets: the use of all instances per bucket, as committed; what exceeds
    /// this engine's own count is the others' (their use since it started), which the
    /// levels then count too. Returns the alerts of thresholds that use crosses.
    pub fn note_use_everywhere<S: LedgerSink>(
        &self,
        everywhere: impl IntoIterator<Item = (BucketKey, Money)>,
        now: DateTime<Utc>,
        sink: &S,
    ) -> Option<S::Ticket> {
        let budgets = self.budgets.read().clone();
        let dir = self.directory.read().clone();
        let now_ms = ms(now);
        let mut alerts = Vec::new();
        let mut state = self.state.lock();
        for (bucket, all) in everywhere {
            let own = state
                .counters
                .get(&bucket)
                .map_or(Money::ZERO, Counter::used);
            let others = all.saturating_sub(own).max(Money::ZERO);
            state.elsewhere.insert(bucket.clone(), others);
            let Some(budget) = budgets.get(&bucket.budget) else {
                continue;
            };
            let tz = budget
                .tenant
                .as_ref()
                .and_then(|t| dir.tenants.get(t))
                .map_or(Tz::UTC, |t| t.timezone);
            let a = Applicable {
                budget,
                bucket: &bucket,
                tz,
            };
            let (_, limit) = Self::standing(&state, &a, now);
            // A global budget's alert names no tenant here (no call crossed it).
            let tenant: Arc<str> = budget.tenant.as_deref().unwrap_or_default().into();
            Self::note_level(&mut state, &a, own, limit, now_ms, &tenant, &mut alerts);
        }
        (!alerts.is_empty()).then(|| sink.append(Vec::new(), alerts))
    }

    /// Forgets the in-memory counters (and alert levels and leases) of periods no
    /// decision can read any more, so memory does not grow with time: a counter goes once
    /// nothing is held on it and its period started before the current one and the one
    /// before it (rollover reads that one), or before a rolling window's slices, with a
    /// margin for time zones. Lifetime counters stay, and so do those of budgets the
    /// engine does not know. The stored `counters` table keeps every period (it is what
    /// `ledger verify` compares). At most once a minute; returns how many went.
    pub fn prune_counters(&self, now: DateTime<Utc>) -> usize {
        let mut state = self.state.lock();
        self.prune_locked(&mut state, now.timestamp())
    }

    fn prune_locked(&self, state: &mut State, now_s: i64) -> usize {
        if now_s - state.pruned_at_s < COUNTER_PRUNE_EVERY_SECS {
            return 0;
        }
        state.pruned_at_s = now_s;
        let budgets = self.budgets.read().clone();
        let keep_from: Map<&str, Option<i64>> = budgets
            .all()
            .map(|b| {
                const DAY: i64 = 86_400;
                let from = match b.spec.window {
                    Window::Daily => Some(now_s - 3 * DAY),
                    Window::Weekly => Some(now_s - 21 * DAY),
                    Window::Monthly => Some(now_s - 95 * DAY),
                    Window::Rolling { seconds } => {
                        let slice = (i64::from(seconds) / crate::budget::ROLLING_SLICES).max(1);
                        Some(now_s - i64::from(seconds) - 2 * slice)
                    }
                    Window::Lifetime => None,
                };
                (b.id.as_str(), from)
            })
            .collect();
        // A budget this engine does not know (not loaded yet, or deleted and perhaps
        // re-created under its id) keeps its counters.
        let gone = |k: &BucketKey| match keep_from.get(&*k.budget) {
            Some(Some(from)) => k.period_start < *from,
            Some(None) | None => false,
        };
        let before = state.counters.len();
        state
            .counters
            .retain(|k, c| c.held != Money::ZERO || !gone(k));
        let State {
            counters,
            levels,
            allowance,
            elsewhere,
            ..
        } = state;
        elsewhere.retain(|k, _| counters.contains_key(k));
        levels.retain(|k, _| counters.contains_key(k) || !gone(k));
        if let Some(a) = allowance {
            a.retain(|k, _| counters.contains_key(k) || !gone(k));
        }
        before - state.counters.len()
    }

    /// Counters held in memory (current periods, and older ones not yet pruned).
    pub fn counters_in_memory(&self) -> usize {
        self.state.lock().counters.len()
    }

    /// Finished outcomes kept in memory to answer retries (the rest are in the ledger).
    pub fn finished_in_memory(&self) -> usize {
        self.state.lock().finished.len()
    }

    /// Open holds.
    pub fn open_holds(&self) -> usize {
        self.state.lock().holds.len()
    }

    /// The budgets a key's calls touch right now, without holding anything.
    pub fn standing_for(
        &self,
        caller: &Caller,
        tags: &Tags,
        now: DateTime<Utc>,
    ) -> Vec<BudgetView> {
        let dir = self.directory();
        let Some(tenant) = caller
            .key
            .tenant
            .as_deref()
            .and_then(|t| dir.tenants.get(t))
        else {
            return Vec::new();
        };
        let user = caller
            .key
            .user
            .as_ref()
            .and_then(|u| dir.users.get(&UserRef(&tenant.id, u)));
        let team = caller
            .key
            .team
            .clone()
            .or_else(|| user.and_then(|u| u.team.clone()));
        let applicable = self.applicable(tenant, &caller.key, team.as_ref(), tags, now);
        let state = self.state.lock();
        applicable
            .iter()
            .map(|a| {
                let (c, l) = Self::standing(&state, &a, now);
                Self::view(&a, Self::with_elsewhere(&state, &a, c), l)
            })
            .collect()
    }

    /// Views of all buckets of one budget (for the admin API).
    pub fn buckets_of(&self, budget_id: &str) -> Vec<(BucketKey, Counter)> {
        let state = self.state.lock();
        let mut v: Vec<_> = state
            .counters
            .iter()
            .filter(|(k, _)| *k.budget == *budget_id)
            .map(|(k, c)| (k.clone(), *c))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Rebuilds the live state from the ledger, in order (recovery on start).
    pub fn recover<'a>(&self, entries: impl IntoIterator<Item = &'a Entry>) {
        *self.state.lock() = State::default();
        for e in entries {
            self.recover_one(e);
        }
    }

    /// The finished outcome an ending entry (settle, void, release, expire) records.
    fn finished_of(e: &Entry, hold: Hold) -> Finished {
        let kind = e.kind;
        let outcome = match kind {
            EntryKind::Settle => Outcome::Settled,
            EntryKind::Expire => Outcome::Expired,
            _ => Outcome::Voided,
        };
        Finished {
            tenant: e.tenant.clone(),
            usage: (kind == EntryKind::Settle).then(|| Usage {
                tokens: e.usage,
                quantity: e.quantity,
                model_used: e.model_used.clone(),
                latency_ms: e.latency_ms,
                estimated: e.flags & flags::ESTIMATED != 0,
            }),
            settlement: Settlement {
                authorization_id: e.authorization,
                outcome,
                cost: e.cost_delta,
                charge: e.charge_delta,
                released: -e.held_delta,
                overage: e.cost_delta.saturating_sub(-e.held_delta).max(Money::ZERO),
                model_used: e.model_used.clone(),
                price_version: e.price_version.clone().unwrap_or_default(),
                drift: e.flags & flags::DRIFT != 0,
                replayed: false,
            },
            finished_at_ms: e.at_ms,
            permit: hold.permit.clone(),
            hold: (kind == EntryKind::Expire).then(|| Box::new(hold)),
        }
    }

    /// Starts recovery from the stored counters, which are those at the ledger's head:
    /// the store then hands only the ledger's tail to [`Engine::recover_one`] (every
    /// hold still open, and the recent past), which rebuilds holds and outcomes without
    /// counting their amounts a second time.
    pub fn restore_counters(&self, counters: impl IntoIterator<Item = (BucketKey, Counter)>) {
        let mut state = self.state.lock();
        state.counters = counters.into_iter().collect();
        state.counters_restored = true;
    }

    /// Applies one ledger entry to the live state; entries must come in ledger order,
    /// into an engine that has applied nothing else (but restored counters). Memory
    /// stays bounded however long the ledger: finished outcomes are capped as the
    /// sweeper caps them.
    pub fn recover_one(&self, e: &Entry) {
        let mut state = self.state.lock();
        state.finished.trim(MAX_FINISHED_IN_MEMORY, i64::MIN);
        // What recovery reads is in the store already.
        let recovered = state.idempotency.inserted();
        state.idempotency.mark_landed(recovered);
        state
            .idempotency
            .trim_landed(MAX_IDEMPOTENCY_IN_MEMORY, i64::MIN);
        {
            match e.kind {
                EntryKind::Hold => {
                    let Some(d) = &e.detail else { return };
                    if !state.counters_restored {
                        for b in d.buckets.iter() {
                            state.counters.entry(b.clone()).or_default().held += e.held_delta;
                        }
                    }
                    if let Some(k) = &d.idempotency_key {
                        state.idempotency.insert(
                            (e.tenant.to_string(), k.clone()),
                            IdempotencyRecord {
                                fingerprint: d.fingerprint.clone(),
                                authorization: e.authorization,
                                at_ms: e.at_ms,
                            },
                        );
                    }
                    state
                        .holds
                        .insert(e.authorization, Self::hold_of_entry(e, d));
                }
                kind => {
                    let hold = state.holds.get(&e.authorization).cloned().or_else(|| {
                        state
                            .finished
                            .get(&e.authorization)
                            .and_then(|f| f.hold.as_deref().cloned())
                    });
                    let Some(hold) = hold else { return };
                    if !state.counters_restored {
                        for b in hold.detail.buckets.iter() {
                            let c = state.counters.entry(b.clone()).or_default();
                            c.held += e.held_delta;
                            c.spent += e.cost_delta;
                        }
                    }
                    if kind == EntryKind::Adjustment {
                        if let Some(f) = state.finished.get_mut(&e.authorization) {
                            f.hold = None;
                        }
                        return;
                    }
                    state.holds.remove(&e.authorization);
                    state
                        .finished
                        .insert(e.authorization, Box::new(Self::finished_of(e, hold)));
                }
            }
        }
    }
}

/// A call priced against the book, before shaping.
#[derive(Clone)]
enum Priced<'a> {
    Model {
        model: &'a Model,
        prompt_tokens: u64,
        max_tokens: u32,
    },
    Api {
        api: Arc<str>,
        quantity: u64,
    },
}

impl Priced<'_> {
    /// The model or metered API priced.
    fn item_id(&self) -> &Arc<str> {
        match self {
            Priced::Model { model, .. } => &model.id,
            Priced::Api { api, .. } => api,
        }
    }

    fn estimated_tokens(&self) -> u64 {
        match self {
            Priced::Model {
                prompt_tokens,
                max_tokens,
                ..
            } => prompt_tokens + u64::from(*max_tokens),
            Priced::Api { .. } => 0,
        }
    }

    fn max_tokens_wanted(&self) -> u32 {
        match self {
            Priced::Model { max_tokens, .. } => *max_tokens,
            Priced::Api { .. } => u32::MAX,
        }
    }
}

/// Builds the budget of a plan default for one tenant.
pub fn plan_budget_id(tenant: &str, index: usize) -> String {
    format!("{tenant}.plan.{index}")
}

/// Budgets that apply to one tenant from its plan.
pub fn plan_budgets(tenant: &Tenant, plan: &Plan) -> Vec<Budget> {
    plan.default_budgets
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            Budget::new(
                plan_budget_id(&tenant.id, i),
                Some(tenant.id.to_string()),
                spec.clone(),
            )
        })
        .collect()
}

/// For tests and tools: all buckets' counters sorted.
pub fn sorted(counters: &HashMap<BucketKey, Counter>) -> BTreeMap<BucketKey, Counter> {
    counters.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished_at(at: i64) -> Box<Finished> {
        Box::new(Finished {
            tenant: "t".into(),
            usage: None,
            settlement: Settlement {
                authorization_id: Uuid::nil(),
                outcome: Outcome::Settled,
                cost: Money::ZERO,
                charge: Money::ZERO,
                released: Money::ZERO,
                overage: Money::ZERO,
                model_used: None,
                price_version: "".into(),
                drift: false,
                replayed: false,
            },
            finished_at_ms: at,
            permit: None,
            hold: None,
        })
    }

    #[test]
    fn finished_outcomes_forget_the_oldest_first_by_count_and_by_time() {
        let mut f: Aging<Uuid, Box<Finished>> = Aging::default();
        let ids: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
        for (at, id) in ids.iter().enumerate() {
            f.insert(*id, finished_at(at as i64 * 10));
        }
        f.trim(6, i64::MIN);
        assert_eq!(f.len(), 6);
        assert!(
            ids[..4].iter().all(|id| !f.contains_key(id)),
            "the oldest four went"
        );
        assert!(ids[4..].iter().all(|id| f.contains_key(id)));
        f.trim(6, 60);
        assert_eq!(f.len(), 3, "finished at 70, 80, 90 are kept: after 60");
        assert!(f.contains_key(&ids[7]) && !f.contains_key(&ids[6]));

        // An outcome replaced under its id: its older place in line does not take the
        // new one away, which goes in its own turn.
        f.insert(ids[7], finished_at(200));
        f.trim(3, 100);
        assert!(f.contains_key(&ids[7]), "replaced at 200: kept");
        assert_eq!(f.len(), 1);
        assert_eq!(f.get(&ids[7]).map(|x| x.finished_at_ms), Some(200));
        f.trim(0, i64::MIN);
        assert_eq!(f.len(), 0);
        assert!(f.order.is_empty(), "nothing is left in line");

        // The line stays bounded even if the map shrinks some other way.
        for at in 0..100 {
            f.insert(Uuid::now_v7(), finished_at(1_000 + at));
        }
        f.by_key.clear();
        f.insert(Uuid::now_v7(), finished_at(2_000));
        f.trim(10, i64::MIN);
        assert!(f.order.len() <= 20, "{}", f.order.len());
        assert_eq!(f.len(), 1, "the newest outcome stays");
    }

    /// Idempotency records whose holds may not be in the store yet are never forgotten,
    /// however many or old: a forgotten key is looked up in the store.
    #[test]
    fn only_records_marked_landed_are_forgotten() {
        let mut m: Aging<Uuid, Box<Finished>> = Aging::default();
        let ids: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
        for (at, id) in ids.iter().enumerate() {
            m.insert(*id, finished_at(at as i64));
        }
        m.trim_landed(2, i64::MAX);
        assert_eq!(m.len(), 10, "nothing is marked landed yet");
        m.mark_landed(4);
        m.trim_landed(2, i64::MAX);
        assert_eq!(m.len(), 6, "the first four went, and only them");
        assert!(ids[..4].iter().all(|id| !m.contains_key(id)));
        assert!(ids[4..].iter().all(|id| m.contains_key(id)));
        // A mark past what was inserted covers only what was.
        m.mark_landed(1_000);
        m.insert(Uuid::now_v7(), finished_at(100));
        m.trim_landed(0, i64::MAX);
        assert_eq!(m.len(), 1, "the one inserted after the mark stays");
        assert_eq!(m.inserted(), 11);
    }
}
