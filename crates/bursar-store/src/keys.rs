//! Which idempotency keys the embedded store may have a hold for.
//!
//! A retry whose key the engine no longer remembers is looked up in the ledger before
//! it is decided anew (promise 2). On the embedded store, almost every such lookup is of
//! a key used for the first time, and finds nothing: a query on the reader's one
//! connection, on the request's worker thread. A filter of every key the store has
//! (loaded at start, then fed by the writer) answers "certainly not" for those without
//! the query; a key it may have still gets the query, whose answer is exact.
//!
//! The filter is a scalable Bloom filter (`growable-bloom-filter`): it grows with the
//! keys, at about two bytes a key, and says "maybe" for a key it lacks about once in
//! a hundred lookups. It never says "no" for a key it was given. Only the embedded
//! store has one: on PostgreSQL other instances write keys this process never sees.
//!
//! Sound because the filter learns a key no later than the store does: the writer adds
//! the keys of a batch before committing it, and a start loads every stored key (after
//! landing what an earlier run left) before the first request. The data directory is
//! held by one process at a time ([`crate::sqlite`]), so no other writer adds keys.

use growable_bloom_filter::GrowableBloom;
use parking_lot::RwLock;

/// The chance, per lookup of a key the store lacks, that the filter still says "maybe".
const FALSE_POSITIVE_RATE: f64 = 0.01;
/// The filter's first size; it grows (doubling) past it.
const FIRST_CAPACITY: usize = 100_000;

/// The (tenant, idempotency key) pairs a store may have a hold for.
pub struct IdempotencyKeys {
    filter: RwLock<GrowableBloom>,
}

impl Default for IdempotencyKeys {
    fn default() -> Self {
        IdempotencyKeys {
            filter: RwLock::new(GrowableBloom::new(FALSE_POSITIVE_RATE, FIRST_CAPACITY)),
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

    /// How many distinct keys it was given (a key added twice may count twice, in the
    /// rare case the filter took it for a new one).
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
        // Of keys never given, about 1 % may be taken for given ones; far fewer than half.
        let taken = (0..10_000)
            .filter(|i| keys.may_have("t-other", &format!("key-{i}")))
            .count();
        assert!(
            taken < 500,
            "{taken} of 10,000 unknown keys taken for known"
        );
        assert!(keys.len() >= 245_000, "{}", keys.len());
    }
}
