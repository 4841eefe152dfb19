//! Counting a prompt's tokens: Bursar's counter (`bpe-openai`, with its cache of texts
//! counted before) against OpenAI's reference counting in Rust (`tiktoken-rs`), on a
//! short message, a 250-byte one and a 5 KB one. Each text Bursar counts is new (a
//! number in it changes), so its cache never answers; the last line counts a text seen
//! before, which the cache answers.

// A benchmark's job is to print its figures.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use bursar_core::pricebook::TokenizerKind;
use bursar_core::tokens::count_text;
use criterion::{criterion_group, criterion_main, Criterion};

/// The allocator of the `bursar` binary, so the figures are those of the server.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn texts() -> [(&'static str, String); 3] {
    let medium = "You are a helpful assistant. Summarize the following article in three \
        bullet points, keeping numbers exact: The quarterly report shows revenue of $12.4M, up \
        18% year over year, while costs rose 9%.\n\n  Indented   text\twith tabs and   trailing ";
    let long = "You are the support assistant of an online shop. Answer in the customer's \
        language, quote order numbers exactly, never promise refunds above 100 EUR without a \
        human, and keep answers under 120 words. My order 1048-2231 arrived with a cracked \
        screen; can I get a replacement before Friday? "
        .repeat(18);
    [
        ("29 bytes", "Write one line about budgets.".to_string()),
        ("250 bytes", medium.to_string()),
        ("5 KB", long),
    ]
}

fn bench(c: &mut Criterion) {
    let tiktoken = tiktoken_rs::o200k_base_singleton();
    for (name, text) in texts() {
        let mut i = 0u64;
        c.bench_function(&format!("o200k count, {name}: bursar (new text)"), |b| {
            b.iter(|| {
                i += 1;
                // A new number at the end: never a text the cache has.
                let t = format!("{text} {i}");
                count_text(TokenizerKind::O200kBase, &t)
            })
        });
        c.bench_function(&format!("o200k count, {name}: tiktoken-rs"), |b| {
            b.iter(|| {
                i += 1;
                let t = format!("{text} {i}");
                tiktoken.encode_ordinary(&t).len()
            })
        });
    }
    let (_, long) = &texts()[2];
    c.bench_function("o200k count, 5 KB: bursar (text counted before)", |b| {
        b.iter(|| count_text(TokenizerKind::O200kBase, long))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
