//! The declarative configuration file.
//!
//! One TOML file declares the server settings, plans, tenants, teams, users, keys and
//! budgets. Unknown keys are refused, and [`Config::parse`] checks the whole file and
//! reports every problem at once, so a bad file never starts a half-configured gateway.
//! Environment overrides for the server settings are applied by the binary.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Deserialize;
use serde_path_to_error::Segment;
use uuid::Uuid;

use crate::budget::{Budget, BudgetSpec, EmergencyAction, ScopeKind, Selector, Thresholds, Window};
use crate::catalog::{
    ApiKey, Directory, EnforcementMode, FailurePolicy, KeyHash, KeyKind, LimitPer, Plan, RateCard,
    RoleLimits, SharedLimit, TaskPolicy, Team, Tenant, User, KEY_SECRET_PREFIX,
};
use crate::engine::{
    EngineConfig, ExpiryPolicy, DEFAULT_HOLD_TTL, DEFAULT_IDEMPOTENCY_WINDOW,
    DEFAULT_MIN_OUTPUT_TOKENS, MAX_HOLD_TTL, MAX_IDEMPOTENCY_WINDOW, MIN_IDEMPOTENCY_WINDOW,
};
use crate::money::Money;
use crate::pricebook::PriceBook;
use crate::providers::{RawProvider, RawRouting, Routing};

/// Loopback by default: a gateway that holds provider keys is not exposed by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Beside the working directory, so the first run needs no set-up.
pub const DEFAULT_DATA_DIR: &str = "./bursar-data";
/// 1 MiB: ample for an authorization request, small enough to refuse floods early.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// A cached answer lives at most 30 days.
pub const MAX_CACHE_TTL_SECS: u64 = 30 * 24 * 3600;
/// Secrets shorter than this are guessable.
pub const MIN_SECRET_LEN: usize = 24;

/// The configuration shipped with Bursar: used when no file is given.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/default.toml");

/// What an acknowledged write survives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// A killed or crashed Bursar process loses nothing it acknowledged: an entry is in
    /// the operating system before the answer (the embedded store: its record in the
    /// local journal, written by the request itself, and SQLite's WAL with
    /// `synchronous = NORMAL` behind it). The default: it is the specification's
    /// crash-safety, at a fraction of the cost.
    #[default]
    Process,
    /// A lost machine (power cut, kernel crash) loses nothing acknowledged either: every
    /// commit batch is fsynced (`synchronous = FULL`) before its callers are answered.
    Power,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<String>,
    pub data_dir: Option<String>,
    /// A PostgreSQL database (`postgres://…`) instead of the embedded store: the system
    /// of record several instances share.
    pub database_url: Option<String>,
    /// Redis (`redis://…`): rate limits counted across every instance instead of per
    /// instance.
    pub redis_url: Option<String>,
    /// What every Redis key of this deployment starts with (default `bursar`): several
    /// deployments may share one Redis database, each with its own prefix.
    pub redis_prefix: Option<String>,
    pub max_body_bytes: Option<usize>,
    /// A price book file replacing the built-in one.
    pub price_book: Option<String>,
    #[serde(default)]
    pub durability: Durability,
    /// Threads that run requests (`bursar serve`; default: one per core). Fewer than
    /// the cores leaves the rest to the ledger writer and to whatever shares the
    /// machine (ARCHITECTURE, "Decisions").
    pub workers: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EngineSection {
    hold_ttl_secs: Option<u64>,
    expiry_policy: Option<ExpiryPolicy>,
    min_output_tokens: Option<u32>,
    idempotency_window_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    id: Option<String>,
    tenant: Option<String>,
    scope: String,
    value: Option<String>,
    window: String,
    limit: String,
    warn_percent: Option<u8>,
    emergency_percent: Option<u8>,
    emergency_action: Option<EmergencyAction>,
    #[serde(default)]
    rollover: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateCard {
    markup_bps: Option<u32>,
    #[serde(default)]
    agent_per_1k_tokens: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoleLimits {
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    per: LimitPer,
    role: Option<String>,
    model: Option<String>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    id: String,
    #[serde(default)]
    features: Vec<String>,
    default_task: String,
    tasks: BTreeMap<String, TaskPolicy>,
    #[serde(default)]
    rate_limits: BTreeMap<String, RawRoleLimits>,
    #[serde(default)]
    limits: Vec<RawLimit>,
    #[serde(default)]
    budgets: Vec<RawBudget>,
    rate_card: Option<RawRateCard>,
    price_per_month: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    id: String,
    name: Option<String>,
    plan: String,
    timezone: Option<String>,
    mode: Option<EnforcementMode>,
    cache_ttl_secs: Option<u64>,
    failure_policy: Option<FailurePolicy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTeam {
    tenant: String,
    id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    tenant: String,
    id: String,
    team: Option<String>,
    role: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    tenant: Option<String>,
    team: Option<String>,
    user: Option<String>,
    kind: KeyKind,
    role: Option<String>,
    /// The secret in clear: for demos and tests only.
    secret: Option<String>,
    /// The SHA-256 of the secret, hex: for production files.
    sha256: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    /// The response cache for this key's calls (seconds), even where its tenant has none.
    cache_ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    engine: EngineSection,
    #[serde(default)]
    plans: Vec<RawPlan>,
    #[serde(default)]
    tenants: Vec<RawTenant>,
    #[serde(default)]
    teams: Vec<RawTeam>,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    keys: Vec<RawKey>,
    #[serde(default)]
    budgets: Vec<RawBudget>,
    #[serde(default)]
    providers: Vec<RawProvider>,
    #[serde(default)]
    routing: RawRouting,
}

/// Every problem of a configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the configuration has {} problem(s):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSection,
    pub engine: EngineConfig,
    pub directory: Directory,
    pub keys: Vec<ApiKey>,
    pub budgets: Vec<Budget>,
    /// Proxy mode: providers, aliases and fallback chains.
    pub routing: Routing,
}

/// Ids become parts of bucket keys and URLs: keep them to a safe alphabet.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Parses a budget from its parts; shared by the file and the admin API.
#[allow(clippy::too_many_arguments)]
pub fn parse_budget_spec(
    scope: &str,
    value: Option<&str>,
    window: &str,
    limit: &str,
    warn_percent: Option<u8>,
    emergency_percent: Option<u8>,
    emergency_action: Option<EmergencyAction>,
    rollover: bool,
) -> Result<BudgetSpec, Vec<String>> {
    let mut problems = Vec::new();
    let scope_kind = ScopeKind::parse(scope);
    if scope_kind.is_none() {
        problems.push(format!(
            "unknown scope `{scope}` (global, tenant, team, user, api_key, end_user, workflow, campaign, agent, feature, task, tag:NAME)"
        ));
    }
    let w = Window::parse(window);
    if w.is_none() {
        problems.push(format!(
            "unknown window `{window}` (daily, weekly, monthly, lifetime, rolling:Nm|Nh|Nd)"
        ));
    }
    let limit = match Money::parse_non_negative(limit) {
        Ok(m) if m > Money::ZERO => Some(m),
        Ok(_) => {
            problems.push("limit must be greater than zero".into());
            None
        }
        Err(e) => {
            problems.push(format!("limit: {e}"));
            None
        }
    };
    let d = Thresholds::default();
    let t = Thresholds {
        warn_percent: warn_percent.unwrap_or(d.warn_percent),
        emergency_percent: emergency_percent.unwrap_or(d.emergency_percent),
        emergency_action: emergency_action.unwrap_or(d.emergency_action),
    };
    if !(t.warn_percent > 0 && t.warn_percent <= t.emergency_percent && t.emergency_percent <= 100)
    {
        problems.push(format!(
            "thresholds must satisfy 0 < warn ({}) ≤ emergency ({}) ≤ 100",
            t.warn_percent, t.emergency_percent
        ));
    }
    if rollover && matches!(w, Some(Window::Lifetime | Window::Rolling { .. })) {
        problems.push("rollover needs a calendar window (daily, weekly, monthly)".into());
    }
    if let Some(v) = value {
        if v.is_empty() || v.len() > 200 {
            problems.push("value must be 1 to 200 characters".into());
        }
    }
    match (scope_kind, w, limit) {
        (Some(scope), Some(window), Some(limit)) if problems.is_empty() => Ok(BudgetSpec {
            selector: match (&scope, value) {
                (_, Some(v)) => Selector::Value(v.to_string()),
                _ => Selector::Each,
            },
            scope,
            window,
            limit,
            thresholds: t,
            rollover,
        }),
        _ => Err(problems),
    }
}

/// Reads the file into its structure. Every unknown key is named with its place (not only
/// the first: each is taken out and the file read again), and the checks that follow
/// still run; a value of the wrong type ends the reading, named with its place.
fn read_raw(text: &str) -> Result<(RawConfig, Vec<String>), ConfigErrors> {
    let mut table: toml::Table =
        toml::from_str(text).map_err(|e| ConfigErrors(vec![e.to_string()]))?;
    let mut problems = Vec::new();
    loop {
        let e = match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
            Ok(raw) => return Ok((raw, problems)),
            Err(e) => e,
        };
        // The deserializer's own message, without the place it adds on a line of its own.
        let message = e.inner().to_string();
        let message = message.lines().next().unwrap_or_default();
        let mut path: Vec<&Segment> = e.path().iter().collect();
        let unknown = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(key, _)| key);
        // The place of an unknown key is the table holding it (the path may end with it).
        if let (Some(key), Some(Segment::Map { key: last })) = (unknown, path.last()) {
            if last == key {
                path.pop();
            }
        }
        let place = place_of(&path);
        match unknown.filter(|key| remove_key(&mut table, &path, key)) {
            Some(key) if place.is_empty() => problems.push(format!("unknown key `{key}`")),
            Some(key) => problems.push(format!("{place}: unknown key `{key}`")),
            None => {
                problems.push(format!("{place}: {message}"));
                return Err(ConfigErrors(problems));
            }
        }
    }
}

/// A place in the file as a reader writes it: `plans[0].tasks.chat`.
fn place_of(path: &[&Segment]) -> String {
    let mut place = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => place.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !place.is_empty() {
                    place.push('.');
                }
                place.push_str(key);
            }
            Segment::Unknown => place.push_str(".?"),
        }
    }
    place
}

/// Takes `key` out of the table at `path`; false when there is no such table or key.
fn remove_key(table: &mut toml::Table, path: &[&Segment], key: &str) -> bool {
    let mut at: &mut toml::Table = table;
    let mut segments = path.iter().copied().peekable();
    while let Some(segment) = segments.next() {
        let next = match segment {
            Segment::Map { key } => at.get_mut(key.as_str()),
            _ => None,
        };
        // An array of tables: the index follows its name.
        let next = match (next, segments.peek()) {
            (Some(toml::Value::Array(items)), Some(Segment::Seq { index })) => {
                let index = *index;
                segments.next();
                items.get_mut(index)
            }
            (next, _) => next,
        };
        match next {
            Some(toml::Value::Table(t)) => at = t,
            _ => return false,
        }
    }
    at.remove(key).is_some()
}

impl Config {
    /// Parses and checks a configuration against a price book.
    pub fn parse(text: &str, book: &PriceBook, now: DateTime<Utc>) -> Result<Config, ConfigErrors> {
        let (raw, mut p) = read_raw(text)?;
        let classes: BTreeSet<&str> = book.classes();

        let engine = EngineConfig {
            hold_ttl: raw
                .engine
                .hold_ttl_secs
                .map_or(DEFAULT_HOLD_TTL, Duration::from_secs),
            expiry_policy: raw.engine.expiry_policy.unwrap_or_default(),
            min_output_tokens: raw
                .engine
                .min_output_tokens
                .unwrap_or(DEFAULT_MIN_OUTPUT_TOKENS),
            idempotency_window: raw
                .engine
                .idempotency_window_secs
                .map_or(DEFAULT_IDEMPOTENCY_WINDOW, Duration::from_secs),
        };
        if engine.hold_ttl.is_zero() || engine.hold_ttl > MAX_HOLD_TTL {
            p.push(format!(
                "engine.hold_ttl_secs must be between 1 and {}",
                MAX_HOLD_TTL.as_secs()
            ));
        }
        if !(MIN_IDEMPOTENCY_WINDOW..=MAX_IDEMPOTENCY_WINDOW).contains(&engine.idempotency_window) {
            p.push(format!(
                "engine.idempotency_window_secs must be between {} (an hour) and {} (ten years)",
                MIN_IDEMPOTENCY_WINDOW.as_secs(),
                MAX_IDEMPOTENCY_WINDOW.as_secs()
            ));
        }
        if raw.server.max_body_bytes == Some(0) {
            p.push("server.max_body_bytes must be greater than zero".into());
        }
        if raw.server.workers == Some(0) {
            p.push("server.workers must be at least 1".into());
        }
        if let Some(prefix) = &raw.server.redis_prefix {
            if prefix.is_empty()
                || prefix.len() > 64
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            {
                p.push(format!(
                    "server.redis_prefix `{prefix}` must be 1 to 64 letters, digits, `-`, `_`, `.` or `:`"
                ));
            }
        }

        let mut dir = Directory::default();
        for rp in raw.plans {
            let owner = format!("plan `{}`", rp.id);
            if !valid_id(&rp.id) {
                p.push(format!("{owner}: invalid id"));
            }
            if !rp.tasks.contains_key(&rp.default_task) {
                p.push(format!(
                    "{owner}: default_task `{}` is not one of its tasks",
                    rp.default_task
                ));
            }
            for (name, t) in &rp.tasks {
                if t.classes.is_empty() {
                    p.push(format!("{owner}: task `{name}` allows no model class"));
                }
                for c in &t.classes {
                    if !classes.contains(c.as_str()) {
                        p.push(format!(
                            "{owner}: task `{name}`: class `{c}` is not in the price book ({})",
                            classes.iter().copied().collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
                if !t.classes.contains(&t.default_class) {
                    p.push(format!(
                        "{owner}: task `{name}`: default_class `{}` is not one of its classes",
                        t.default_class
                    ));
                }
                if t.max_tokens == 0 {
                    p.push(format!(
                        "{owner}: task `{name}`: max_tokens must be at least 1"
                    ));
                }
            }
            let mut rate_limits = BTreeMap::new();
            for (role, l) in rp.rate_limits {
                let rpm = l.requests_per_minute.map(NonZeroU32::new);
                let tpm = l.tokens_per_minute.map(NonZeroU32::new);
                if matches!(rpm, Some(None)) || matches!(tpm, Some(None)) {
                    p.push(format!(
                        "{owner}: rate limit of role `{role}` must be at least 1"
                    ));
                }
                rate_limits.insert(
                    role,
                    RoleLimits {
                        requests_per_minute: rpm.flatten(),
                        tokens_per_minute: tpm.flatten(),
                    },
                );
            }
            let mut limits = Vec::new();
            for (i, l) in rp.limits.iter().enumerate() {
                let rpm = l.requests_per_minute.map(NonZeroU32::new);
                let tpm = l.tokens_per_minute.map(NonZeroU32::new);
                if matches!(rpm, Some(None)) || matches!(tpm, Some(None)) {
                    p.push(format!("{owner}: limit {i}: a rate must be at least 1"));
                }
                if rpm.is_none() && tpm.is_none() {
                    p.push(format!(
                        "{owner}: limit {i}: give requests_per_minute, tokens_per_minute or both"
                    ));
                }
                let model = match &l.model {
                    None => None,
                    Some(m) => match book.resolve(m) {
                        Ok(m) => Some(m.id.to_string()),
                        Err(e) => {
                            p.push(format!("{owner}: limit {i}: {e}"));
                            None
                        }
                    },
                };
                limits.push(SharedLimit {
                    per: l.per,
                    role: l.role.clone(),
                    model,
                    requests_per_minute: rpm.flatten(),
                    tokens_per_minute: tpm.flatten(),
                });
            }
            let mut default_budgets = Vec::new();
            for (i, b) in rp.budgets.iter().enumerate() {
                if b.id.is_some() || b.tenant.is_some() {
                    p.push(format!(
                        "{owner}: budget {i}: a plan budget takes no id or tenant"
                    ));
                }
                match parse_budget_spec(
                    &b.scope,
                    b.value.as_deref(),
                    &b.window,
                    &b.limit,
                    b.warn_percent,
                    b.emergency_percent,
                    b.emergency_action,
                    b.rollover,
                ) {
                    Ok(spec) if spec.scope == ScopeKind::Global => p.push(format!(
                        "{owner}: budget {i}: a plan budget cannot be global"
                    )),
                    Ok(spec) => default_budgets.push(spec),
                    Err(e) => p.extend(e.into_iter().map(|e| format!("{owner}: budget {i}: {e}"))),
                }
            }
            let rate_card = match rp.rate_card {
                None => RateCard::default(),
                Some(rc) => {
                    let mut agent = BTreeMap::new();
                    for (a, v) in rc.agent_per_1k_tokens {
                        match Money::parse_non_negative(&v) {
                            Ok(m) => {
                                agent.insert(a, m);
                            }
                            Err(e) => p.push(format!("{owner}: rate card agent `{a}`: {e}")),
                        }
                    }
                    RateCard {
                        markup_bps: rc.markup_bps.unwrap_or(crate::catalog::DEFAULT_MARKUP_BPS),
                        agent_per_1k_tokens: agent,
                    }
                }
            };
            let price_per_month = match rp.price_per_month.as_deref().map(Money::parse_non_negative)
            {
                None => Money::ZERO,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    p.push(format!("{owner}: price_per_month: {e}"));
                    Money::ZERO
                }
            };
            let plan = Plan {
                id: rp.id.clone(),
                features: rp.features.into_iter().collect(),
                tasks: rp.tasks,
                default_task: rp.default_task,
                rate_limits,
                limits,
                default_budgets,
                rate_card,
                price_per_month,
            };
            if dir.plans.insert(rp.id.clone(), plan).is_some() {
                p.push(format!("{owner}: declared twice"));
            }
        }

        for t in raw.tenants {
            let owner = format!("tenant `{}`", t.id);
            if !valid_id(&t.id) {
                p.push(format!("{owner}: invalid id"));
            }
            if !dir.plans.contains_key(&t.plan) {
                p.push(format!("{owner}: plan `{}` does not exist", t.plan));
            }
            let tz = match t.timezone.as_deref().map(str::parse::<Tz>) {
                None => Tz::UTC,
                Some(Ok(tz)) => tz,
                Some(Err(_)) => {
                    p.push(format!(
                        "{owner}: time zone `{}` is not an IANA time zone (e.g. Europe/Paris)",
                        t.timezone.unwrap_or_default()
                    ));
                    Tz::UTC
                }
            };
            let tenant = Tenant {
                name: t.name.unwrap_or_else(|| t.id.clone()),
                id: t.id.as_str().into(),
                plan: t.plan,
                timezone: tz,
                mode: t.mode.unwrap_or_default(),
                cache_ttl_secs: t.cache_ttl_secs,
                failure_policy: t.failure_policy.unwrap_or_default(),
            };
            if t.cache_ttl_secs
                .is_some_and(|s| s == 0 || s > MAX_CACHE_TTL_SECS)
            {
                p.push(format!(
                    "{owner}: cache_ttl_secs must be 1 to {MAX_CACHE_TTL_SECS} (leave it out for no cache)"
                ));
            }
            if dir.tenants.insert(t.id.clone(), tenant).is_some() {
                p.push(format!("{owner}: declared twice"));
            }
        }

        for t in raw.teams {
            if !dir.tenants.contains_key(&t.tenant) {
                p.push(format!(
                    "team `{}`: tenant `{}` does not exist",
                    t.id, t.tenant
                ));
            }
            if !valid_id(&t.id) {
                p.push(format!("team `{}`: invalid id", t.id));
            }
            let team = Team {
                tenant: t.tenant.clone(),
                id: t.id.clone(),
            };
            if dir.teams.insert((t.tenant, t.id.clone()), team).is_some() {
                p.push(format!("team `{}`: declared twice", t.id));
            }
        }

        for u in raw.users {
            if !dir.tenants.contains_key(&u.tenant) {
                p.push(format!(
                    "user `{}`: tenant `{}` does not exist",
                    u.id, u.tenant
                ));
            }
            if !valid_id(&u.id) {
                p.push(format!("user `{}`: invalid id", u.id));
            }
            if let Some(team) = &u.team {
                if !dir.teams.contains_key(&(u.tenant.clone(), team.clone())) {
                    p.push(format!("user `{}`: team `{team}` does not exist", u.id));
                }
            }
            let user = User {
                tenant: u.tenant.clone(),
                id: u.id.clone(),
                team: u.team.map(Into::into),
                role: u.role.as_deref().unwrap_or("member").into(),
            };
            if dir.users.insert((u.tenant, u.id.clone()), user).is_some() {
                p.push(format!("user `{}`: declared twice", u.id));
            }
        }

        let mut keys = Vec::new();
        let mut seen_hashes = HashSet::new();
        for k in raw.keys {
            let owner = format!("key `{}`", k.name);
            let hash = match (&k.secret, &k.sha256) {
                (Some(s), None) => {
                    if !s.starts_with(KEY_SECRET_PREFIX) || s.len() < MIN_SECRET_LEN {
                        p.push(format!(
                            "{owner}: secret must start with `{KEY_SECRET_PREFIX}` and have at least {MIN_SECRET_LEN} characters"
                        ));
                    }
                    Some(KeyHash::of(s))
                }
                (None, Some(h)) => {
                    let parsed = KeyHash::from_hex(h);
                    if parsed.is_none() {
                        p.push(format!("{owner}: sha256 must be 64 hex characters"));
                    }
                    parsed
                }
                _ => {
                    p.push(format!(
                        "{owner}: give exactly one of `secret` and `sha256`"
                    ));
                    None
                }
            };
            match (&k.kind, &k.tenant) {
                (KeyKind::PlatformAdmin, Some(_)) => p.push(format!(
                    "{owner}: a platform admin key belongs to no tenant"
                )),
                (KeyKind::TenantAdmin | KeyKind::Member, None) => {
                    p.push(format!("{owner}: a tenant key needs a tenant"))
                }
                (_, Some(t)) if !dir.tenants.contains_key(t) => {
                    p.push(format!("{owner}: tenant `{t}` does not exist"))
                }
                _ => {}
            }
            let tenant = k.tenant.clone().unwrap_or_default();
            if let Some(team) = &k.team {
                if !dir.teams.contains_key(&(tenant.clone(), team.clone())) {
                    p.push(format!("{owner}: team `{team}` does not exist"));
                }
            }
            if let Some(user) = &k.user {
                if !dir.users.contains_key(&(tenant.clone(), user.clone())) {
                    p.push(format!("{owner}: user `{user}` does not exist"));
                }
            }
            if k.cache_ttl_secs
                .is_some_and(|s| s == 0 || s > MAX_CACHE_TTL_SECS)
            {
                p.push(format!(
                    "{owner}: cache_ttl_secs must be 1 to {MAX_CACHE_TTL_SECS} (leave it out for no cache)"
                ));
            }
            let Some(hash) = hash else { continue };
            if !seen_hashes.insert(hash) {
                p.push(format!("{owner}: the same secret is declared twice"));
            }
            // A key declared in the file keeps one id across restarts: derived from its hash.
            let id = Uuid::from_slice(&hash.0[..16]).unwrap_or_default();
            keys.push(ApiKey {
                id,
                name: k.name.into(),
                hash,
                prefix: k
                    .secret
                    .as_deref()
                    .map(|s| s.chars().take(8).collect::<String>().into())
                    .unwrap_or_else(|| KEY_SECRET_PREFIX.into()),
                tenant: k.tenant.map(Into::into),
                team: k.team.map(Into::into),
                user: k.user.map(Into::into),
                kind: k.kind,
                role: k.role.map(Into::into),
                created_at: now,
                expires_at: k.expires_at,
                revoked_at: None,
                cache_ttl_secs: k.cache_ttl_secs.and_then(|t| u32::try_from(t).ok()),
            });
        }

        let mut budgets = Vec::new();
        let mut ids: HashMap<String, usize> = HashMap::new();
        for (i, b) in raw.budgets.iter().enumerate() {
            let id = b.id.clone().unwrap_or_else(|| format!("budget-{i}"));
            let owner = format!("budget `{id}`");
            if !valid_id(&id) {
                p.push(format!("{owner}: invalid id"));
            }
            if ids.insert(id.clone(), i).is_some() {
                p.push(format!("{owner}: declared twice"));
            }
            if let Some(t) = &b.tenant {
                if !dir.tenants.contains_key(t) {
                    p.push(format!("{owner}: tenant `{t}` does not exist"));
                }
            }
            match parse_budget_spec(
                &b.scope,
                b.value.as_deref(),
                &b.window,
                &b.limit,
                b.warn_percent,
                b.emergency_percent,
                b.emergency_action,
                b.rollover,
            ) {
                Ok(spec) => {
                    if b.tenant.is_none() && spec.scope != ScopeKind::Global {
                        p.push(format!("{owner}: only a global budget has no tenant"));
                    }
                    if b.tenant.is_some() && spec.scope == ScopeKind::Global {
                        p.push(format!("{owner}: a global budget has no tenant"));
                    }
                    budgets.push(Budget::new(id, b.tenant.clone(), spec));
                }
                Err(e) => p.extend(e.into_iter().map(|e| format!("{owner}: {e}"))),
            }
        }

        let routing = Routing::parse(raw.providers, raw.routing, book, &mut p);

        if !p.is_empty() {
            return Err(ConfigErrors(p));
        }
        Ok(Config {
            server: raw.server,
            engine,
            directory: dir,
            keys,
            budgets,
            routing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> PriceBook {
        PriceBook::builtin().unwrap()
    }

    #[test]
    fn the_default_config_is_valid() {
        let c = Config::parse(DEFAULT_CONFIG, &book(), Utc::now()).unwrap();
        assert!(!c.directory.tenants.is_empty());
        assert!(!c.keys.is_empty());
    }

    /// The commented providers of the default configuration are what a user uncomments:
    /// they must parse, and the defaults they show must be the defaults.
    #[test]
    fn the_default_configs_commented_providers_parse_with_the_defaults_they_show() {
        let mut text = String::new();
        let mut in_block = false;
        for line in DEFAULT_CONFIG.lines() {
            in_block = line.starts_with("# [[providers]]") || (in_block && line.starts_with('#'));
            let uncommented = line.strip_prefix("# ").or_else(|| line.strip_prefix('#'));
            text.push_str(uncommented.filter(|_| in_block).unwrap_or(line));
            text.push('\n');
        }
        let c = Config::parse(&text, &book(), Utc::now()).unwrap();
        let names: Vec<&str> = c
            .routing
            .providers
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["openai", "anthropic", "simulated"]);
        assert_eq!(
            c.routing.providers[0].max_answer_bytes,
            crate::providers::DEFAULT_MAX_ANSWER_BYTES
        );
        let shown: std::collections::BTreeMap<&str, &str> = text
            .lines()
            .skip_while(|l| *l != "name = \"openai\"")
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(" = "))
            .map(|(k, v)| (k, v.split_whitespace().next().unwrap_or("")))
            .collect();
        use crate::providers::*;
        for (key, default) in [
            ("timeout_ms", DEFAULT_TIMEOUT_MS.to_string()),
            ("max_retries", DEFAULT_MAX_RETRIES.to_string()),
            ("circuit_failures", DEFAULT_CIRCUIT_FAILURES.to_string()),
            ("circuit_open_ms", DEFAULT_CIRCUIT_OPEN_MS.to_string()),
            ("max_answer_bytes", DEFAULT_MAX_ANSWER_BYTES.to_string()),
            ("on_disconnect", "\"cancel\"".to_string()),
        ] {
            assert_eq!(shown.get(key), Some(&default.as_str()), "{key}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::parse(
            "[server]\nlisten = \"x\"\ncolour = 1\n",
            &book(),
            Utc::now(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        // A value of the wrong type ends the reading, named with its place.
        let err = Config::parse(
            "[[tenants]]\nid = \"acme\"\nplan = 5\n",
            &book(),
            Utc::now(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("tenants[0].plan: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn every_problem_is_named() {
        let text = r#"
shade = "dark"

[server]
redis_prefix = "my prefix"
workers = 0
colour = "blue"

[engine]
idempotency_window_secs = 60

[[plans]]
id = "free"
default_task = "chat"
[plans.tasks.chat]
classes = ["tiny"]
default_class = "huge"
max_tokens = 0
temperature = 0.5
[plans.rate_limits.member]
requests_per_minute = 0

[[tenants]]
id = "acme"
plan = "gold"
timezone = "Mars/Olympus"
flavour = 1

[[budgets]]
tenant = "acme"
scope = "tenant"
window = "fortnightly"
limit = "-5"
warn_percent = 95
emergency_percent = 90

[[keys]]
name = "forever"
tenant = "acme"
kind = "member"
secret = "bsr_config_test_key_0000000000000"
cache_ttl_secs = 0

[[providers]]
name = "broken"
kind = "openai"
base_url = "http://127.0.0.1:9"
models = ["gpt-4o"]
timeout_ms = 0
circuit_failures = 0
max_answer_bytes = 0
"#;
        let err = Config::parse(text, &book(), Utc::now()).unwrap_err();
        let all = err.to_string();
        for needle in [
            "class `tiny`",
            "default_class `huge`",
            "max_tokens must be at least 1",
            "rate limit of role `member`",
            "plan `gold` does not exist",
            "Mars/Olympus",
            "unknown window `fortnightly`",
            "limit",
            "thresholds",
            "server.redis_prefix `my prefix`",
            "server.workers must be at least 1",
            "key `forever`: cache_ttl_secs must be 1",
            "engine.idempotency_window_secs must be between 3600",
            "timeout_ms must be at least 1",
            "circuit_failures must be at least 1",
            "max_answer_bytes must be at least 1",
            // Every unknown key, where it is, beside the other problems.
            "unknown key `shade`",
            "server: unknown key `colour`",
            "tenants[0]: unknown key `flavour`",
            "plans[0].tasks.chat: unknown key `temperature`",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
        assert!(err.0.len() >= 20, "{all}");
    }
}
