//! Bursar's storage backends.
//!
//! The embedded default is one SQLite file ([`sqlite`]): the ledger, the counters it
//! derives, alerts and the catalog objects created through the admin API.

pub mod sqlite;

/// One error type for every backend; the HTTP edge maps all of them to 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    #[error("i/o error: {0}")]
    Io(String),
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("the stored data is inconsistent: {0}")]
    Corrupt(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}
