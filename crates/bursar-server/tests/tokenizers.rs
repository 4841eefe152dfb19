//! A gateway loads the tokenizers of the models it serves before it serves, so that no
//! call waits for their tables (a few hundred milliseconds), nor the calls beside it.
//!
//! A test binary of its own: the tables are loaded once per process, so no other test
//! may have loaded them before this one looks.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bursar_core::config::Config;
use bursar_core::pricebook::{PriceBook, TokenizerKind};
use bursar_core::tokens;
use bursar_server::ManualClock;
use bursar_store::Location;

/// Builds an instance of `config` on a fresh embedded store, as `bursar serve` does
/// before it listens.
async fn build(config: &str) {
    let book = Arc::new(PriceBook::builtin().unwrap());
    let at = "2026-05-14T10:00:00Z".parse().unwrap();
    let config = Config::parse(config, &book, at).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let location = Location::Sqlite(dir.path().join("ledger.db"));
    let clock = Arc::new(ManualClock::new(at));
    let (services, _writer) = bursar_server::build(config, book, &location, true, clock)
        .await
        .unwrap();
    drop(services);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_loads_the_tokenizers_of_the_models_it_proxies_before_it_serves() {
    use TokenizerKind::{Cl100kBase, O200kBase};
    // In this order: tables once loaded stay loaded for the process.
    let steps = [
        // The authorization API alone: nothing is loaded (tens of megabytes it may never
        // use; a text prompt loads its tokenizer when one comes).
        ("no provider", "", false, false),
        // A provider of one model counted with `o200k_base`: its tables only.
        (
            "a provider of gpt-4o-mini",
            "[[providers]]\nname = \"sim\"\nkind = \"simulated\"\nmodels = [\"gpt-4o-mini\"]\n",
            true,
            false,
        ),
        // A provider of every model: `cl100k_base` too (GPT-4 Turbo, text-embedding-3).
        (
            "a provider of every model",
            "[[providers]]\nname = \"sim\"\nkind = \"simulated\"\nserves = [\"*\"]\n",
            true,
            true,
        ),
    ];
    for (what, config, o200k, cl100k) in steps {
        build(config).await;
        // Loaded when the instance is built, before it would listen.
        assert_eq!(tokens::is_loaded(O200kBase), o200k, "{what}: o200k_base");
        assert_eq!(tokens::is_loaded(Cl100kBase), cl100k, "{what}: cl100k_base");
    }
    // Counting with tables loaded this way works, and counts as OpenAI does.
    assert_eq!(tokens::count_text(Cl100kBase, "hello world"), 2);
}
