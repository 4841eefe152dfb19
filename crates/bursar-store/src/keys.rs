//! Which idempotency keys the embedded store may have a hold for.
//!
//! A retry whose key the engine no longer remembers is looked up in the ledger before
//! it is decided anew (promise 2). On the embedded store, almost every such lookup is of
//! a key used for the first time, and finds nothing: a query on the reader's one
//! connection, on the request's worker thread. A filter of every key the store has
//! (loaded at start, then fed by the writer) answers "certainly not" for those without
//! the query; a key it may have still gets the query, whose answer is exact.
//!
//! The filter is a scalable Bloom filter (`growable-bloom-filter`): a series of Bloom
//! filters, each twice the size of the one before and with half its false-positive
//! rate, so the rate of the whole stays under 1 % however many keys (0.5 % × (1 + ½ +
//! ¼ …)), at about 1.5 to 3 bytes a key. It never says "no" for a key it was given. It
//! keeps every key the store has: it grows with the ledger (see ARCHITECTURE.md,
//! "Decisions and known limits"). Only the embedded store has one: on PostgreSQL other
//! instances write keys this process never sees.
//!
//! Sound because the filter learns a key no later than the store does: the writer adds
//! the keys of a batch before committing it, and a start loads every stored key (after
//! landing what an earlier run left) before the first request. The data directory is
//! held by one process at a time ([`crate::sqlite`]), so no other writer adds keys.

use growable_bloom_filter::{GrowableBloom, GrowableBloomBuilder};
use parking_lot::RwLock;

/// The false-positive rate of the first filter; each next one has half its
/// predecessor's, so the whole stays under twice this.
const FIRST_FALSE_POSITIVE_RATE: f64 = 0.005;
/// The first filter's size; each next one is twice the one before.
const FIRST_CAPACITY: usize = 100_000;

/// The (tenant, idempotency key) pairs a store may have a hold for.
pub struct IdempotencyKeys {
    filter: RwLock<GrowableBloom>,
}

impl Default for IdempotencyKeys {
    fn default() -> Self {
        IdempotencyKeys {
            filter: RwLock::new(
                GrowableBloomBuilder::new()
                    .estimated_insertions(FIRST_CAPACITY)
                    .desired_error_ratio(FIRST_FALSE_POSITIVE_RATE)
                    .growth_factor(2)
                    .tightening_ratio(0.5)
                    .build(),
            ),
        }
    }
}

impl IdempotencyKeys {
    /// Adds keys the store has, or is about to have.
    pub fn add<'a>(&self, keys: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut keys = keys.into_iter().peekable();
        if keys.peek().is_none() {
            return;
        }
        let mut filter = self.filter.write();
        for key in keys {
            filter.insert(key);
        }
    }

    /// False when the store certainly has no hold with this key of this tenant.
    pub fn may_have(&self, tenant: &str, key: &str) -> bool {
        self.filter.read().contains((tenant, key))
    }

    /// How many distinct keys it was given, or a little fewer: a new key the filter
    /// takes for one it has (a false positive) is not counted.
    pub fn len(&self) -> usize {
        self.filter.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_no_only_for_keys_it_was_never_given() {
        let keys = IdempotencyKeys::default();
        assert!(!keys.may_have("a", "k"));
        // More than the first capacity: the filter grows and forgets nothing.
        let given: Vec<(String, String)> = (0..250_000)
            .map(|i| (format!("t{}", i % 7), format!("key-{i}")))
            .collect();
        keys.add(given.iter().map(|(t, k)| (t.as_str(), k.as_str())));
        for (t, k) in &given {
            assert!(keys.may_have(t, k), "{t}/{k} was given");
        }
        // The tenant is part of the key: the same key of another tenant is another pair.
        // Of keys never given, under 1 % may be taken for given ones.
        let taken = (0..20_000)
            .filter(|i| keys.may_have("t-other", &format!("key-{i}")))
            .count();
        assert!(
            taken < 200,
            "{taken} of 20,000 unknown keys taken for known"
        );
        assert!(keys.len() >= 245_000, "{}", keys.len());
    }
}
