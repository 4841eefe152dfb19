//! Integration tests of the HTTP API against a real router, store and clock.

mod bad_input;
mod helpers;
mod isolation;
mod promises;
