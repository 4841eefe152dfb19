//! Which idempotency keys the embedded store may have a hold for.
//!
//! A retry whose key the engine no longer remembers is looked up in the ledger before
//! it is decided anew (promise 2). On the embedded store, almost every such lookup is of
//! a key used for the first time, and finds nothing: a query on the reader's one
//! connection, on the request's worker thread. A filter of every key the store has
//! (loaded at start, then fed by the writer) answers "certainly not" for those without
//! the query; a key it may have still gets the query, whose answer is exact.
//!
//! A key is honoured for the idempotency window after its hold (a week by default), so
//! only the keys of holds made within it matter. The filter keeps them in generations,
//! one per quarter of the window by the hold's time, and drops a generation once all of
//! it is older than the window: its memory follows the keys used within the window
//! (about 1.25 windows of them), not the ledger. Each generation is a scalable Bloom
//! filter (`growable-bloom-filter`): a series of Bloom filters, each twice the size of
//! the one before and with half its false-positive rate, so a generation's rate stays
//! under 0.4 % however many keys (0.2 % × (1 + ½ + ¼ …)), at about 2 to 3.5 bytes a
//! key; a look-up asks only the generations that reach into the window, at most five,
//! so under 2 % in all. It never says "no" for a key it was given. Only the embedded
//! store has one: on PostgreSQL other instances write keys this process never sees.
//!
//! Sound because the filter learns a key no later than the store does: the writer adds
//! the keys of a batch before committing it, and a start loads every stored key of the
//! window (after landing what an earlier run left) before the first request. The data
//! directory is held by one process at a time ([`crate::sqlite`]), so no other writer
//! adds keys. The filter knows from when it holds every key
//! ([`IdempotencyKeys::complete_from_ms`]): a look-up reaching further back (a clock
//! set back, a window longer than the one loaded) is "maybe", and gets the query.

use std::collections::VecDeque;
use std::time::Duration;

use growable_bloom_filter::{GrowableBloom, GrowableBloomBuilder};
use parking_lot::RwLock;

/// The false-positive rate of a generation's first filter; each next one has half its
/// predecessor's, so a generation stays under twice this.
const FIRST_FALSE_POSITIVE_RATE: f64 = 0.002;
/// A generation's first filter's size; each next one is twice the one before.
const FIRST_CAPACITY: usize = 50_000;
/// Generations per window: a key is dropped at most a quarter of a window after it
/// leaves the window.
const GENERATIONS_PER_WINDOW: i64 = 4;

/// The (tenant, idempotency key) pairs a store may have a hold for, within the
/// idempotency window.
pub struct IdempotencyKeys {
    window_ms: i64,
    /// The time one generation covers.
    period_ms: i64,
    state: RwLock<Generations>,
}

struct Generations {
    /// By period (hold time ÷ `period_ms`), oldest first.
    by_period: VecDeque<(i64, GrowableBloom)>,
    /// Every key of a hold made at or after this time is here.
    complete_from_ms: i64,
}

impl IdempotencyKeys {
    /// An empty filter that will hold every key of a hold made at or after
    /// `complete_from_ms` (what a start loads from, and every key added after).
    pub fn new(window: Duration, complete_from_ms: i64) -> Self {
        let window_ms = i64::try_from(window.as_millis())
            .unwrap_or(i64::MAX)
            .max(GENERATIONS_PER_WINDOW);
        IdempotencyKeys {
            window_ms,
            period_ms: window_ms / GENERATIONS_PER_WINDOW,
            state: RwLock::new(Generations {
                by_period: VecDeque::new(),
                complete_from_ms,
            }),
        }
    }

    /// Adds the keys of holds the store has, or is about to have, each with its hold's
    /// time (ms); then forgets the generations wholly older than the window before the
    /// latest of those times, or before now if that is earlier (a hold stamped ahead of
    /// the clock does not make the current generations go).
    pub fn add<'a>(&self, keys: impl IntoIterator<Item = (i64, &'a str, &'a str)>) {
        let mut keys = keys.into_iter().peekable();
        if keys.peek().is_none() {
            return;
        }
        let mut state = self.state.write();
        let mut latest = i64::MIN;
        for (at_ms, tenant, key) in keys {
            latest = latest.max(at_ms);
            let period = at_ms.div_euclid(self.period_ms);
            state.generation(period).insert((tenant, key));
        }
        let now = chrono::Utc::now().timestamp_millis();
        let cutoff = latest.min(now).saturating_sub(self.window_ms);
        while let Some(&(period, _)) = state.by_period.front() {
            let end = self.end_of(period);
            if end > cutoff {
                break;
            }
            state.by_period.pop_front();
            state.complete_from_ms = state.complete_from_ms.max(end);
        }
    }

    /// False when the store certainly has no hold made at or after `since_ms` with this
    /// key of this tenant.
    pub fn may_have(&self, tenant: &str, key: &str, since_ms: i64) -> bool {
        let state = self.state.read();
        if since_ms < state.complete_from_ms {
            return true;
        }
        state
            .by_period
            .iter()
            .rev()
            .take_while(|(period, _)| self.end_of(*period) > since_ms)
            .any(|(_, filter)| filter.contains((tenant, key)))
    }

    /// From when every key is here (see the module's documentation).
    pub fn complete_from_ms(&self) -> i64 {
        self.state.read().complete_from_ms
    }

    /// How many generations it keeps (at most a window's and a quarter's worth of
    /// periods, while the keys' times move forward).
    pub fn generations(&self) -> usize {
        self.state.read().by_period.len()
    }

    /// How many distinct keys it was given and keeps, or a little fewer: a new key the
    /// filter takes for one it has (a false positive) is not counted.
    pub fn len(&self) -> usize {
        self.state
            .read()
            .by_period
            .iter()
            .map(|(_, f)| f.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first time after a period.
    fn end_of(&self, period: i64) -> i64 {
        period.saturating_add(1).saturating_mul(self.period_ms)
    }
}

impl Generations {
    /// The filter of a period, made if it is not there (in order).
    fn generation(&mut self, period: i64) -> &mut GrowableBloom {
        let at = match self.by_period.binary_search_by_key(&period, |(p, _)| *p) {
            Ok(at) => at,
            Err(at) => {
                let filter = GrowableBloomBuilder::new()
                    .estimated_insertions(FIRST_CAPACITY)
                    .desired_error_ratio(FIRST_FALSE_POSITIVE_RATE)
                    .growth_factor(2)
                    .tightening_ratio(0.5)
                    .build();
                self.by_period.insert(at, (period, filter));
                at
            }
        };
        &mut self.by_period[at].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: i64 = 3_600_000;

    fn day_window() -> IdempotencyKeys {
        IdempotencyKeys::new(Duration::from_secs(24 * 3600), 0)
    }

    #[test]
    fn says_no_only_for_keys_it_was_never_given() {
        let keys = day_window();
        let now = 100 * 24 * HOUR_MS;
        assert!(!keys.may_have("a", "k", now - 24 * HOUR_MS));
        // More than a generation's first capacity, over a window's generations: the
        // filter grows and forgets nothing within the window.
        let given: Vec<(i64, String, String)> = (0..250_000i64)
            .map(|i| {
                let at = now - 24 * HOUR_MS + i * (24 * HOUR_MS / 250_000);
                (at, format!("t{}", i % 7), format!("key-{i}"))
            })
            .collect();
        keys.add(given.iter().map(|(at, t, k)| (*at, t.as_str(), k.as_str())));
        for (_, t, k) in &given {
            assert!(keys.may_have(t, k, now - 24 * HOUR_MS), "{t}/{k} was given");
        }
        // The tenant is part of the key: the same key of another tenant is another pair.
        // Of keys never given, under 2 % may be taken for given ones.
        let taken = (0..20_000)
            .filter(|i| keys.may_have("t-other", &format!("key-{i}"), now - 24 * HOUR_MS))
            .count();
        assert!(
            taken < 400,
            "{taken} of 20,000 unknown keys taken for known"
        );
        assert!(keys.len() >= 245_000, "{}", keys.len());
    }

    #[test]
    fn keys_older_than_the_window_are_dropped_and_the_rest_kept() {
        let keys = day_window();
        // A key an hour, for three days.
        for h in 0..72 {
            keys.add([(h * HOUR_MS, "t", format!("k{h}").as_str())]);
        }
        // A quarter-day generation ends before the last key's time less a day: gone.
        assert!(
            keys.generations() <= 5,
            "{} generations for a day's window",
            keys.generations()
        );
        let since = 71 * HOUR_MS - 24 * HOUR_MS;
        for h in 47..72 {
            assert!(
                keys.may_have("t", &format!("k{h}"), since),
                "k{h} is within the window"
            );
        }
        // Keys dropped with their generation are past the window; asking further back
        // than the filter is complete from is "maybe", never a wrong "no".
        assert!(keys.complete_from_ms() > 0);
        assert!(keys.complete_from_ms() <= since);
        assert!(keys.may_have("t", "k0", keys.complete_from_ms() - 1));
        assert!(
            !keys.may_have("t", "k0", since),
            "k0 left with its generation"
        );
        // The generations dropped held the keys of the first 42 hours: those are "no"
        // (but for false positives). Keys of the generation that straddles `since` are
        // "maybe": the query's own time bound answers them.
        let kept_old = (0..42)
            .filter(|h| keys.may_have("t", &format!("k{h}"), since))
            .count();
        assert!(
            kept_old <= 1,
            "{kept_old} keys older than the window taken for held"
        );
        assert_eq!(keys.complete_from_ms(), 42 * HOUR_MS);
    }

    #[test]
    fn a_filter_knows_nothing_before_it_was_complete_from() {
        let keys = IdempotencyKeys::new(Duration::from_secs(3600), 10 * HOUR_MS);
        // A look-up reaching before the load's start cannot be answered "no".
        assert!(keys.may_have("t", "k", 9 * HOUR_MS));
        assert!(!keys.may_have("t", "k", 10 * HOUR_MS));
        keys.add([(10 * HOUR_MS + 5, "t", "k")]);
        assert!(keys.may_have("t", "k", 10 * HOUR_MS));
    }
}
