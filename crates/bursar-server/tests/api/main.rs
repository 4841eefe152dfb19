//! Integration tests of the HTTP API against a real router, store and clock.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod bad_input;
mod helpers;
mod isolation;
mod promises;
mod proxy;
mod redis;
mod stores;
