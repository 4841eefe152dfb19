//! Counting prompt tokens before a call, so a hold covers the worst case.
//!
//! OpenAI families are counted exactly with their own BPE (`o200k_base`, `cl100k_base`),
//! using OpenAI's published chat framing: 3 tokens per message, 1 more when a name is
//! given, and 3 to prime the reply. The counting is `bpe-openai`'s (GitHub's `rust-gems`):
//! the same counts as OpenAI's `tiktoken` (the tests hold it to `tiktoken-rs`), four to
//! six times as fast, which matters because every proxied call counts its whole prompt
//! before it is held; texts counted before are counted from a cache ([`Counted`]). Text
//! that looks like a special token (`<|endoftext|>`) is counted as the ordinary text it
//! is in a message.
//!
//! Other providers do not publish their tokenizers. For them Bursar counts with
//! `o200k_base` and adds [`ESTIMATE_MARGIN_PERCENT`] plus [`ESTIMATE_TOKENS_PER_MESSAGE`]
//! per message, rounded up. Anthropic, Gemini and Mistral tokenizers produce at most
//! ~15 % more tokens than `o200k_base` on English and code, so the margin keeps the hold a
//! worst case; a provider that reports more is settled at its real usage and the excess
//! is recorded as an overage, never hidden.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::pricebook::TokenizerKind;

/// Extra share added to the `o200k_base` count for models without a public tokenizer.
pub const ESTIMATE_MARGIN_PERCENT: u64 = 25;
/// Framing tokens assumed per message for models without a public tokenizer.
pub const ESTIMATE_TOKENS_PER_MESSAGE: u64 = 5;
/// Framing tokens per message in OpenAI's chat format.
const OPENAI_TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens that prime the assistant's reply in OpenAI's chat format.
const OPENAI_REPLY_PRIMING: u64 = 3;

/// One chat message, as far as counting needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Bytes of text the count cache of each encoding keeps at most.
const CACHED_TEXT_MAX_BYTES: u64 = 8 << 20;
/// What an entry of the count cache costs beside its text (the text's pointer and
/// length, the count, the cache's own bookkeeping), so that many short texts are held
/// to the same bound as a few long ones.
const CACHED_ENTRY_BYTES: u64 = 64;

/// Recently counted texts and their counts, per encoding.
///
/// A chat application sends the same system prompt with every call, and the whole
/// conversation so far with every turn: most of a prompt's text has been counted
/// before. The cache is keyed by the text itself (compared whole on a hit, so two texts
/// never share a count), holds at most [`CACHED_TEXT_MAX_BYTES`] of texts and their
/// entries, and evicts with S3-FIFO (`quick_cache`), so a run of one-off texts does not
/// push out a system prompt seen again and again. Short texts are kept too: a role's name
/// or a one-line prompt costs a few hundred nanoseconds to count (the pre-split and the
/// encoder's buffers) and tens to look up.
struct Counted {
    texts: quick_cache::sync::Cache<Box<str>, u64, TextBytes, foldhash::fast::RandomState>,
    hits: AtomicU64,
}

/// A cached text weighs its length and its entry.
#[derive(Clone)]
struct TextBytes;

impl quick_cache::Weighter<Box<str>, u64> for TextBytes {
    fn weight(&self, text: &Box<str>, _: &u64) -> u64 {
        text.len() as u64 + CACHED_ENTRY_BYTES
    }
}

impl Counted {
    fn new() -> Counted {
        Counted::holding(CACHED_TEXT_MAX_BYTES)
    }

    /// A cache of at most `bytes` of texts and entries.
    fn holding(bytes: u64) -> Counted {
        Counted {
            texts: quick_cache::sync::Cache::with(
                // Texts of a few hundred bytes on average.
                (bytes / 512) as usize,
                bytes,
                TextBytes,
                foldhash::fast::RandomState::default(),
                quick_cache::sync::DefaultLifecycle::default(),
            ),
            hits: AtomicU64::new(0),
        }
    }

    fn count(&self, bpe: &bpe_openai::Tokenizer, text: &str) -> u64 {
        if let Some(n) = self.texts.get(text) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return n;
        }
        let n = bpe.count(text) as u64;
        self.texts.insert(text.into(), n);
        n
    }
}

/// An encoding's tables and its count cache, made at their first use or by [`load`].
struct Encoding {
    bpe: &'static bpe_openai::Tokenizer,
    counted: Counted,
}

/// An encoding, and whether it is made yet (known without making it).
struct Table {
    loaded: AtomicBool,
    encoding: LazyLock<Encoding>,
}

impl Table {
    /// Makes the tables (a few hundred milliseconds, tens of megabytes) and the cache,
    /// then says so in `loaded`.
    fn make(&self, bpe: fn() -> &'static bpe_openai::Tokenizer) -> Encoding {
        let e = Encoding {
            bpe: bpe(),
            counted: Counted::new(),
        };
        self.loaded.store(true, Ordering::Release);
        e
    }
}

static O200K: Table = Table {
    loaded: AtomicBool::new(false),
    encoding: LazyLock::new(|| O200K.make(bpe_openai::o200k_base)),
};
static CL100K: Table = Table {
    loaded: AtomicBool::new(false),
    encoding: LazyLock::new(|| CL100K.make(bpe_openai::cl100k_base)),
};

/// The encoding whose tables `kind` counts with: `estimate` counts with `o200k_base`'s.
pub fn encoding_of(kind: TokenizerKind) -> TokenizerKind {
    match kind {
        TokenizerKind::Estimate => TokenizerKind::O200kBase,
        k => k,
    }
}

fn table(kind: TokenizerKind) -> &'static Table {
    match encoding_of(kind) {
        TokenizerKind::Cl100kBase => &CL100K,
        _ => &O200K,
    }
}

fn bpe_len(kind: TokenizerKind, text: &str) -> u64 {
    let e = &*table(kind).encoding;
    e.counted.count(e.bpe, text)
}

/// Loads the tables `kind` counts with now, if they are not loaded yet, so that no call
/// waits for them: the first text counted otherwise loads them, and every caller that
/// counts with them meanwhile waits. Blocks for as long as that takes (a few hundred
/// milliseconds); a gateway does it at start, off the runtime's workers.
pub fn load(kind: TokenizerKind) {
    LazyLock::force(&table(kind).encoding);
}

/// Whether the tables `kind` counts with are loaded.
pub fn is_loaded(kind: TokenizerKind) -> bool {
    table(kind).loaded.load(Ordering::Acquire)
}

/// How many texts were counted from the cache of recently counted texts, since start
/// (without loading tables nothing has counted with yet).
pub fn counted_from_cache() -> u64 {
    [&O200K, &CL100K]
        .into_iter()
        .filter(|t| t.loaded.load(Ordering::Acquire))
        .map(|t| t.encoding.counted.hits.load(Ordering::Relaxed))
        .sum()
}

/// Tokens of a plain text (embeddings input, a prompt).
pub fn count_text(kind: TokenizerKind, text: &str) -> u64 {
    let n = bpe_len(kind, text);
    match kind {
        TokenizerKind::Estimate => estimate(n, 0),
        _ => n,
    }
}

/// Prompt tokens of a chat request, framing included.
pub fn count_messages(kind: TokenizerKind, messages: &[ChatMessage]) -> u64 {
    let mut n = 0u64;
    for m in messages {
        n += bpe_len(kind, &m.role) + bpe_len(kind, &m.content);
        if let Some(name) = &m.name {
            n += bpe_len(kind, name) + 1;
        }
    }
    match kind {
        TokenizerKind::Estimate => estimate(n, messages.len() as u64),
        _ => n + OPENAI_TOKENS_PER_MESSAGE * messages.len() as u64 + OPENAI_REPLY_PRIMING,
    }
}

fn estimate(bpe_tokens: u64, messages: u64) -> u64 {
    let with_margin = (bpe_tokens * (100 + ESTIMATE_MARGIN_PERCENT)).div_ceil(100);
    with_margin + messages * ESTIMATE_TOKENS_PER_MESSAGE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            name: None,
        }
    }

    #[test]
    fn openai_chat_framing_matches_published_counts() {
        // OpenAI's cookbook example counts "hello world" as a user message: 2 content tokens
        // + 1 role token + 3 framing + 3 priming = 9 with o200k_base.
        let n = count_messages(TokenizerKind::O200kBase, &[msg("user", "hello world")]);
        assert_eq!(n, 9);
    }

    #[test]
    fn tokenizers_differ_on_the_same_text() {
        let text = "Bursar authorizes every call before money is spent, 日本語のテキストも数える。";
        let o200 = count_text(TokenizerKind::O200kBase, text);
        let cl100 = count_text(TokenizerKind::Cl100kBase, text);
        assert!(o200 > 0 && cl100 > 0);
        assert_ne!(o200, cl100);
    }

    #[test]
    fn estimate_is_above_the_bpe_count() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
        let exact = count_text(TokenizerKind::O200kBase, &text);
        let est = count_text(TokenizerKind::Estimate, &text);
        assert_eq!(est, (exact * 125).div_ceil(100));
        let msgs = [msg("system", "be brief"), msg("user", &text)];
        assert!(
            count_messages(TokenizerKind::Estimate, &msgs)
                > count_messages(TokenizerKind::O200kBase, &msgs)
        );
    }

    /// OpenAI's own counts (`tiktoken-rs`, ordinary text) for both encodings.
    fn reference(kind: TokenizerKind, text: &str) -> u64 {
        let bpe = match kind {
            TokenizerKind::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            _ => tiktoken_rs::o200k_base_singleton(),
        };
        bpe.encode_ordinary(text).len() as u64
    }

    const KINDS: [TokenizerKind; 2] = [TokenizerKind::O200kBase, TokenizerKind::Cl100kBase];

    #[test]
    fn counts_are_tiktokens_on_texts_that_try_the_split_rules() {
        let long_prompt = "You are a careful assistant. Answer in JSON.\n\n".repeat(80);
        let corpus = [
            "",
            " ",
            "hello world",
            "Write one line about budgets.",
            // Whitespace runs: the split rule `\s+(?!\S)` leaves the last space to the next word.
            "a  b   c    d",
            "trailing spaces   ",
            "\t\tindented\n    code\r\n\r\nnext",
            "   \n\n\n   ",
            // Contractions, upper and lower case.
            "I'M sure we'LL see they'd've DON'T it's",
            // Numbers are split in threes.
            "1234567890 3.14159 -42 1,000,000",
            "<|endoftext|> is text in a message <|im_start|>",
            "fn main() { println!(\"{}\", x.iter().map(|v| v * 2).sum::<u64>()); }",
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
            "日本語のテキストも数える。中文文本。한국어 텍스트.",
            "Ünïcödé ÇAFÉ café e\u{301} naïve",
            "emoji 👍🏽 👨‍👩‍👧‍👦 🇫🇷 and symbols ∑∫√ ™",
            "مرحبا بالعالم שלום עולם",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "https://example.com/path/to/page?query=1&x=y#frag C:\\Users\\me\\file.txt",
            &long_prompt,
        ];
        for kind in KINDS {
            for text in corpus {
                assert_eq!(
                    count_text(kind, text),
                    reference(kind, text),
                    "{kind:?} on {text:?}"
                );
            }
        }
    }

    #[test]
    fn a_text_counted_again_is_counted_from_the_cache_with_the_same_count() {
        let counted = Counted::new();
        let bpe = bpe_openai::o200k_base();
        let system =
            "You are a careful assistant for the finance team; answer with exact figures. "
                .repeat(4);
        let exact = reference(TokenizerKind::O200kBase, &system);
        assert_eq!(counted.count(bpe, &system), exact);
        assert_eq!(counted.hits.load(Ordering::Relaxed), 0);
        assert_eq!(counted.count(bpe, &system), exact);
        assert_eq!(counted.hits.load(Ordering::Relaxed), 1);
        // A text that differs from a cached one in its last byte gets its own count.
        let mut other = system.clone();
        other.pop();
        other.push('!');
        assert_eq!(
            counted.count(bpe, &other),
            reference(TokenizerKind::O200kBase, &other)
        );
        assert_eq!(counted.hits.load(Ordering::Relaxed), 1);
        // Short texts too.
        assert_eq!(counted.count(bpe, "hello world"), 2);
        assert_eq!(counted.count(bpe, "hello world"), 2);
        assert_eq!(counted.hits.load(Ordering::Relaxed), 2);
        assert_eq!(counted.texts.len(), 3);
    }

    #[test]
    fn many_short_texts_are_held_to_the_caches_bound_with_their_entries() {
        let bound = 64 << 10;
        let counted = Counted::holding(bound);
        let bpe = bpe_openai::o200k_base();
        for i in 0..5_000 {
            let text = format!("q{i}");
            assert_eq!(
                counted.count(bpe, &text),
                reference(TokenizerKind::O200kBase, &text)
            );
        }
        // Texts of 2 to 5 bytes: by their length alone, all 5,000 would fit.
        assert!(counted.texts.weight() <= bound);
        assert!(
            counted.texts.len() as u64 <= bound / CACHED_ENTRY_BYTES,
            "{} entries",
            counted.texts.len()
        );
        assert!(counted.texts.len() > 100, "the cache still keeps texts");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        #[test]
        fn counts_are_tiktokens_on_any_text(
            text in "(\\PC|[ \\t\\r\\n'0-9]){0,120}",
            words in proptest::collection::vec("[A-Za-z]{1,8}|[ \\n]{1,4}|'[a-zA-Z]{1,2}|[0-9]{1,5}|[.,;:!?/]{1,3}", 0..40),
        ) {
            let words = words.concat();
            for kind in KINDS {
                proptest::prop_assert_eq!(count_text(kind, &text), reference(kind, &text));
                proptest::prop_assert_eq!(count_text(kind, &words), reference(kind, &words));
            }
        }
    }
}
