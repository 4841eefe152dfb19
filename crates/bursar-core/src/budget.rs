//! Budgets: a limit on a scope over a window, with thresholds.
//!
//! A budget applies to a call when its scope matches the call (the call's tenant, team,
//! user, key or one of its tags). A scope either names one value (`campaign =
//! "black-friday"`) or says `each`, which gives every distinct value its own counter
//! (`workflow = each` with a lifetime window is "$1.00 per workflow run").
//!
//! A counter is identified by a [`BucketKey`]: the budget, the scope value and the start
//! of the period. Calendar windows start at midnight in the tenant's time zone; rolling
//! windows are cut into [`ROLLING_SLICES`] slices and a check sums the slices inside the
//! window.
//!
//! Architecture invariant: a hold and everything that later settles, voids or expires
//! it act on the same buckets (those chosen when the hold was made), so a period
//! boundary between hold and settle never moves money between periods.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::money::Money;

/// Slices a rolling window is cut into; a rolling window of 24 h moves by the hour.
pub const ROLLING_SLICES: i64 = 24;

/// The dimension of a call a budget applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    Global,
    Tenant,
    Team,
    User,
    ApiKey,
    EndUser,
    Workflow,
    Campaign,
    Agent,
    Feature,
    Task,
    /// A custom tag, e.g. `env` for `env=prod`.
    Tag(String),
}

impl ScopeKind {
    pub fn parse(s: &str) -> Option<ScopeKind> {
        Some(match s {
            "global" => ScopeKind::Global,
            "tenant" => ScopeKind::Tenant,
            "team" => ScopeKind::Team,
            "user" => ScopeKind::User,
            "api_key" => ScopeKind::ApiKey,
            "end_user" => ScopeKind::EndUser,
            "workflow" => ScopeKind::Workflow,
            "campaign" => ScopeKind::Campaign,
            "agent" => ScopeKind::Agent,
            "feature" => ScopeKind::Feature,
            "task" => ScopeKind::Task,
            other => ScopeKind::Tag(other.strip_prefix("tag:")?.to_string()),
        })
    }
}

impl fmt::Display for ScopeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ScopeKind::Global => "global",
            ScopeKind::Tenant => "tenant",
            ScopeKind::Team => "team",
            ScopeKind::User => "user",
            ScopeKind::ApiKey => "api_key",
            ScopeKind::EndUser => "end_user",
            ScopeKind::Workflow => "workflow",
            ScopeKind::Campaign => "campaign",
            ScopeKind::Agent => "agent",
            ScopeKind::Feature => "feature",
            ScopeKind::Task => "task",
            ScopeKind::Tag(k) => return write!(f, "tag:{k}"),
        };
        f.write_str(s)
    }
}

/// Which values of the scope a budget covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// Every distinct value has its own counter with this limit.
    Each,
    /// Only this value.
    Value(String),
}

/// The period a budget's counter covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Window {
    Daily,
    /// Calendar weeks starting on Monday.
    Weekly,
    Monthly,
    /// The last `seconds`, moving in slices of `seconds / ROLLING_SLICES`.
    Rolling {
        seconds: u32,
    },
    Lifetime,
}

impl Window {
    pub fn parse(s: &str) -> Option<Window> {
        Some(match s {
            "daily" => Window::Daily,
            "weekly" => Window::Weekly,
            "monthly" => Window::Monthly,
            "lifetime" => Window::Lifetime,
            other => {
                let spec = other.strip_prefix("rolling:")?;
                let (n, unit) = spec.split_at(spec.len().checked_sub(1)?);
                let n: u32 = n.parse().ok()?;
                let seconds = match unit {
                    "m" => n.checked_mul(60)?,
                    "h" => n.checked_mul(3600)?,
                    "d" => n.checked_mul(86_400)?,
                    _ => return None,
                };
                if seconds < ROLLING_SLICES as u32 {
                    return None;
                }
                Window::Rolling { seconds }
            }
        })
    }

    fn slice_seconds(seconds: u32) -> i64 {
        (i64::from(seconds) / ROLLING_SLICES).max(1)
    }

    /// Start (unix seconds) of the period or slice that `now` falls in.
    pub fn period_start(&self, now: DateTime<Utc>, tz: Tz) -> i64 {
        let local = now.with_timezone(&tz).date_naive();
        let midnight = |d: NaiveDate| -> i64 {
            let naive = d.and_hms_opt(0, 0, 0).unwrap_or_default();
            // A day that starts inside a DST gap starts at the first instant that exists.
            tz.from_local_datetime(&naive)
                .earliest()
                .or_else(|| {
                    tz.from_local_datetime(&(naive + Duration::hours(1)))
                        .earliest()
                })
                .map_or(now.timestamp(), |t| t.timestamp())
        };
        match self {
            Window::Daily => midnight(local),
            Window::Weekly => {
                midnight(local - Duration::days(i64::from(local.weekday().num_days_from_monday())))
            }
            Window::Monthly => midnight(local.with_day(1).unwrap_or(local)),
            Window::Rolling { seconds } => {
                let s = Self::slice_seconds(*seconds);
                now.timestamp().div_euclid(s) * s
            }
            Window::Lifetime => 0,
        }
    }

    /// For a rolling window, the length of one slice in seconds.
    pub fn rolling_slice(&self) -> Option<i64> {
        match self {
            Window::Rolling { seconds } => Some(Self::slice_seconds(*seconds)),
            _ => None,
        }
    }

    /// For a rolling window, the oldest slice start still inside the window at `now`.
    pub fn rolling_floor(&self, now: DateTime<Utc>) -> Option<i64> {
        let s = self.rolling_slice()?;
        Some(now.timestamp().div_euclid(s) * s - s * (ROLLING_SLICES - 1))
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Window::Daily => f.write_str("daily"),
            Window::Weekly => f.write_str("weekly"),
            Window::Monthly => f.write_str("monthly"),
            Window::Lifetime => f.write_str("lifetime"),
            Window::Rolling { seconds } if seconds % 86_400 == 0 => {
                write!(f, "rolling:{}d", seconds / 86_400)
            }
            Window::Rolling { seconds } if seconds % 3600 == 0 => {
                write!(f, "rolling:{}h", seconds / 3600)
            }
            Window::Rolling { seconds } => write!(f, "rolling:{}m", seconds / 60),
        }
    }
}

/// What happens once spend passes the emergency threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmergencyAction {
    /// Deny new calls from the emergency threshold on.
    Block,
    /// Move calls to the cheapest model class the plan allows for the task.
    Downgrade,
    /// Only raise the alert.
    #[default]
    AlertOnly,
}

/// Warn at 80 %: early enough to act within a month.
pub const DEFAULT_WARN_PERCENT: u8 = 80;
/// Emergency at 90 %: the last tenth is kept for what must still run.
pub const DEFAULT_EMERGENCY_PERCENT: u8 = 90;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thresholds {
    pub warn_percent: u8,
    pub emergency_percent: u8,
    pub emergency_action: EmergencyAction,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            warn_percent: DEFAULT_WARN_PERCENT,
            emergency_percent: DEFAULT_EMERGENCY_PERCENT,
            emergency_action: EmergencyAction::default(),
        }
    }
}

/// A budget as configured (in the config file, a plan's defaults, or the admin API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetSpec {
    pub scope: ScopeKind,
    pub selector: Selector,
    pub window: Window,
    pub limit: Money,
    pub thresholds: Thresholds,
    /// Unused budget of the previous period is added to this one (calendar windows only).
    pub rollover: bool,
}

/// A budget in force: a spec owned by a tenant (or global, `tenant = None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    pub id: String,
    pub tenant: Option<String>,
    #[serde(flatten)]
    pub spec: BudgetSpec,
    /// Its texts as callers see them, made once (`Budget::texts`).
    #[serde(skip)]
    pub(crate) texts: TextsCache,
}

impl Budget {
    pub fn new(id: String, tenant: Option<String>, spec: BudgetSpec) -> Budget {
        Budget {
            id,
            tenant,
            spec,
            texts: TextsCache::default(),
        }
    }

    /// Its id, scope and window as text, shared by every view of it: a permit shows
    /// every budget it touched, and keeping a permit (for an idempotent retry) keeps
    /// these once, not once per view.
    pub fn texts(&self) -> &BudgetTexts {
        self.texts.0.get_or_init(|| {
            std::sync::Arc::new(BudgetTexts {
                id: self.id.as_str().into(),
                scope: self.spec.scope.to_string().into(),
                window: self.spec.window.to_string().into(),
            })
        })
    }
}

/// A budget's id, scope and window as text.
#[derive(Debug, PartialEq, Eq)]
pub struct BudgetTexts {
    pub id: std::sync::Arc<str>,
    pub scope: std::sync::Arc<str>,
    pub window: std::sync::Arc<str>,
}

/// A cache of [`Budget::texts`]: not part of the budget's value (equal whatever it
/// holds), and a clone starts empty, since a clone may then be changed. Behind an `Arc`:
/// most budgets of a large catalog are never shown, and each costs two words until then.
#[derive(Default)]
pub struct TextsCache(std::sync::OnceLock<std::sync::Arc<BudgetTexts>>);

impl Clone for TextsCache {
    fn clone(&self) -> Self {
        TextsCache::default()
    }
}

impl PartialEq for TextsCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for TextsCache {}

impl fmt::Debug for TextsCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TextsCache")
    }
}

/// One counter: a budget, a scope value and a period. Travels as its compact text form,
/// `budget|value|period_start`, which keeps ledger entries small. Its texts are shared
/// (a call's buckets take them from the budget and the call's scope values, uncopied).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub budget: Arc<str>,
    pub value: Arc<str>,
    pub period_start: i64,
}

impl fmt::Display for BucketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}|{}|{}", self.budget, self.value, self.period_start)
    }
}

impl Serialize for BucketKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BucketKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BucketKey::parse(&s).ok_or_else(|| serde::de::Error::custom("malformed bucket key"))
    }
}

impl BucketKey {
    pub fn parse(s: &str) -> Option<BucketKey> {
        let mut it = s.rsplitn(2, '|');
        let period_start = it.next()?.parse().ok()?;
        let (budget, value) = it.next()?.split_once('|')?;
        Some(BucketKey {
            budget: budget.into(),
            value: value.into(),
            period_start,
        })
    }
}

/// Money held and spent on one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub held: Money,
    pub spent: Money,
}

impl Counter {
    pub fn used(&self) -> Money {
        self.held + self.spent
    }
}

/// Where a bucket stands against its thresholds.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Normal,
    Warn,
    Emergency,
    Blocked,
}

impl Level {
    pub fn of(used: Money, limit: Money, t: &Thresholds) -> Level {
        if used >= limit {
            Level::Blocked
        } else if used >= limit.mul_div_floor(i64::from(t.emergency_percent), 100) {
            Level::Emergency
        } else if used >= limit.mul_div_floor(i64::from(t.warn_percent), 100) {
            Level::Warn
        } else {
            Level::Normal
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "normal" => Some(Level::Normal),
            "warn" => Some(Level::Warn),
            "emergency" => Some(Level::Emergency),
            "blocked" => Some(Level::Blocked),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Warn => "warn",
            Level::Emergency => "emergency",
            Level::Blocked => "blocked",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budgets_texts_are_made_once_and_never_outlive_a_change() {
        let b = Budget::new(
            "team-day".into(),
            Some("acme".into()),
            BudgetSpec {
                scope: ScopeKind::Team,
                selector: Selector::Each,
                window: Window::Daily,
                limit: Money::from_nanos(5_000_000_000),
                thresholds: Thresholds::default(),
                rollover: false,
            },
        );
        let texts = b.texts();
        assert_eq!(
            (&*texts.id, &*texts.scope, &*texts.window),
            ("team-day", "team", "daily")
        );
        assert!(
            std::sync::Arc::ptr_eq(&texts.id, &b.texts().id),
            "made once"
        );
        // A clone may be changed: it makes its own texts.
        let mut changed = b.clone();
        assert_eq!(changed, b, "the cache is not part of the value");
        changed.id = "team-week".into();
        changed.spec.window = Window::Weekly;
        assert_eq!(
            (&*changed.texts().id, &*changed.texts().window),
            ("team-week", "weekly")
        );
        assert_eq!(&*b.texts().id, "team-day");
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn calendar_periods_follow_the_tenant_time_zone() {
        let ny: Tz = "America/New_York".parse().unwrap();
        // 03:00 UTC on March 1st is still February 28th in New York.
        let now = at("2025-03-01T03:00:00Z");
        assert_eq!(
            Window::Monthly.period_start(now, ny),
            at("2025-02-01T05:00:00Z").timestamp()
        );
        assert_eq!(
            Window::Daily.period_start(now, ny),
            at("2025-02-28T05:00:00Z").timestamp()
        );
        // 2025-03-01 is a Saturday: the week started Monday February 24th.
        assert_eq!(
            Window::Weekly.period_start(now, Tz::UTC),
            at("2025-02-24T00:00:00Z").timestamp()
        );
        assert_eq!(Window::Lifetime.period_start(now, ny), 0);
    }

    #[test]
    fn rolling_windows_move_by_slices() {
        let w = Window::parse("rolling:24h").unwrap();
        let now = at("2025-03-01T10:30:00Z");
        assert_eq!(
            w.period_start(now, Tz::UTC),
            at("2025-03-01T10:00:00Z").timestamp()
        );
        assert_eq!(
            w.rolling_floor(now),
            Some(at("2025-02-28T11:00:00Z").timestamp())
        );
        assert_eq!(w.to_string(), "rolling:1d");
        assert_eq!(Window::parse("rolling:5x"), None);
        assert_eq!(
            Window::parse("rolling:1m"),
            Some(Window::Rolling { seconds: 60 })
        );
        assert_eq!(Window::parse("fortnightly"), None);
    }

    #[test]
    fn levels() {
        let t = Thresholds::default();
        let limit = Money::from_usd(100);
        assert_eq!(Level::of(Money::from_usd(79), limit, &t), Level::Normal);
        assert_eq!(Level::of(Money::from_usd(80), limit, &t), Level::Warn);
        assert_eq!(Level::of(Money::from_usd(90), limit, &t), Level::Emergency);
        assert_eq!(Level::of(Money::from_usd(100), limit, &t), Level::Blocked);
    }

    #[test]
    fn bucket_keys_round_trip_with_separators_in_values() {
        let k = BucketKey {
            budget: "b1".into(),
            value: "env=prod|x".into(),
            period_start: -5,
        };
        assert_eq!(BucketKey::parse(&k.to_string()), Some(k));
    }

    #[test]
    fn scope_kinds_parse() {
        assert_eq!(
            ScopeKind::parse("tag:env"),
            Some(ScopeKind::Tag("env".into()))
        );
        assert_eq!(ScopeKind::parse("workflow"), Some(ScopeKind::Workflow));
        assert_eq!(ScopeKind::parse("planet"), None);
        assert_eq!(ScopeKind::Tag("env".into()).to_string(), "tag:env");
    }
}
