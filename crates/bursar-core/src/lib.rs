//! Bursar's domain core: money, prices, plans, budgets, reservations and decisions.
//!
//! Architecture invariant: nothing in this crate does I/O. Files, sockets and clocks are
//! the callers'; time comes in as a `now` argument and ledger entries leave through the
//! [`engine::LedgerSink`] trait, so every rule here is tested with plain values.

pub mod budget;
pub mod catalog;
pub mod config;
pub mod engine;
pub mod json;
pub mod ledger;
pub mod litellm;
pub mod money;
pub mod pricebook;
pub mod providers;
pub mod ratelimit;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokens;

pub use money::Money;

/// The maps of the per-call path: foldhash is several times faster than SipHash on
/// their short keys and still seeded per process, so keys chosen by callers (tag
/// values, model names) cannot be made to collide.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
