//! The model catalog and price book.
//!
//! A [`PriceBook`] is parsed from the TOML file shipped in `prices/pricebook.toml` (or a
//! replacement). Every model has a canonical id, aliases, a class and a list of prices
//! with effective dates; every metered API (web search, patent search, images) has a
//! per-call price list. [`PriceBook::resolve`] maps any spelling of a model id to one
//! canonical model, and an unknown model is an error, never a zero price.
//!
//! Architecture invariant: a price is chosen by the time of the call, and the version it
//! names (`model@effective-date`) is recorded with every cost, so a later price change
//! never changes a past number.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::money::{AmountError, Money, PicoPerToken};
use crate::FastMap;

/// How prompt tokens of a model are counted before the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// OpenAI's `o200k_base` (GPT-4o, 4.1, o-series, GPT-5).
    O200kBase,
    /// OpenAI's `cl100k_base` (GPT-4, GPT-3.5, text-embedding-3).
    Cl100kBase,
    /// A documented conservative estimate for providers whose tokenizer is not public
    /// (see `tokens.rs`).
    Estimate,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBook {
    version: String,
    #[serde(default)]
    model: Vec<RawModel>,
    #[serde(default)]
    api: Vec<RawApi>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: String,
    provider: String,
    class: String,
    context_window: u32,
    max_output_tokens: u32,
    tokenizer: TokenizerKind,
    #[serde(default)]
    aliases: Vec<String>,
    price: Vec<RawTokenPrice>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenPrice {
    effective: NaiveDate,
    input_per_mtok: String,
    output_per_mtok: String,
    cached_input_per_mtok: Option<String>,
    per_request: Option<String>,
    source: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    id: String,
    provider: String,
    unit: String,
    price: Vec<RawCallPrice>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCallPrice {
    effective: NaiveDate,
    per_call: String,
    source: String,
}

/// The price of a token-priced model from one date on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenPrice {
    pub effective: NaiveDate,
    pub input: PicoPerToken,
    pub output: PicoPerToken,
    pub cached_input: PicoPerToken,
    pub per_request: Money,
    pub source: String,
    /// This price's version text (`model@YYYY-MM-DD`), made once when the book is read:
    /// every hold and settlement records it.
    #[serde(skip)]
    pub version: Arc<str>,
}

/// The price of one call (or unit) of a metered API from one date on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallPrice {
    pub effective: NaiveDate,
    pub per_call: Money,
    pub source: String,
    /// This price's version text (`api@YYYY-MM-DD`), made once when the book is read.
    #[serde(skip)]
    pub version: Arc<str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Model {
    pub id: Arc<str>,
    pub provider: String,
    pub class: String,
    pub context_window: u32,
    pub max_output_tokens: u32,
    pub tokenizer: TokenizerKind,
    pub aliases: Vec<String>,
    /// Sorted by `effective`, oldest first.
    pub prices: Vec<TokenPrice>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MeteredApi {
    pub id: Arc<str>,
    pub provider: String,
    pub unit: String,
    /// Sorted by `effective`, oldest first.
    pub prices: Vec<CallPrice>,
}

/// The version of a price: the item it prices and the date it took effect. Printed as
/// `gpt-4o-mini@2024-07-18`; recorded with every cost.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PriceVersion {
    pub item: String,
    pub effective: NaiveDate,
}

impl fmt::Display for PriceVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.item, self.effective)
    }
}

/// A price version's text (`item@YYYY-MM-DD`), as [`PriceVersion`] prints it, written
/// without `core::fmt` and without a `PriceVersion` between: every hold and settlement
/// records one.
pub fn version_text(item: &str, effective: NaiveDate) -> String {
    let year = match u32::try_from(effective.year()) {
        Ok(year) if year <= 9999 => year,
        // Signed and five-digit years: `Display`'s own form.
        _ => {
            return PriceVersion {
                item: item.to_string(),
                effective,
            }
            .to_string()
        }
    };
    let mut s = String::with_capacity(item.len() + 11);
    s.push_str(item);
    for (sep, n, width) in [
        ('@', year, 4),
        ('-', effective.month(), 2),
        ('-', effective.day(), 2),
    ] {
        s.push(sep);
        for place in (0..width).rev() {
            s.push(char::from(b'0' + (n / 10u32.pow(place) % 10) as u8));
        }
    }
    s
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceBookError {
    #[error("price book is not valid TOML: {0}")]
    Syntax(String),
    #[error("price book problems: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("unknown model `{0}`: it is not in the price book (check the id or add it)")]
    UnknownModel(String),
    #[error("unknown metered api `{0}`: it is not in the price book")]
    UnknownApi(String),
    #[error("`{item}` has no price in effect on {date}")]
    NoPriceInEffect { item: String, date: NaiveDate },
}

/// The model catalog and price book, immutable once built.
#[derive(Debug, Clone)]
pub struct PriceBook {
    version: String,
    models: Vec<Model>,
    apis: Vec<MeteredApi>,
    /// Normalized id or alias → index into `models`.
    model_index: FastMap<String, usize>,
    api_index: FastMap<String, usize>,
}

/// Lowercases, drops any path of provider prefixes (`openai/gpt-4o`,
/// `openrouter/anthropic/claude-3.5-sonnet`, `vertex_ai/gemini-1.5-pro`: the model is the
/// last segment) and treats `.`, `_`, `:` and `-` alike (`claude-3.5-sonnet` and
/// `claude-3-5-sonnet` are one spelling).
fn normalize_key(id: &str) -> String {
    let lower = id.trim().to_ascii_lowercase();
    let last = lower.rsplit('/').next().unwrap_or_default();
    last.replace(['.', '_', ':'], "-")
}

/// Removes one trailing date or `latest` marker: `-2024-07-18`, `-20241022`, `@20241022`,
/// `-0613`, `-latest`, `-preview-05-06` is left alone (it names a different model).
fn strip_date_suffix(key: &str) -> Option<String> {
    let is_digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = key.strip_suffix("-latest") {
        return Some(rest.to_string());
    }
    let parts: Vec<&str> = key.split(['-', '@']).collect();
    let n = parts.len();
    if n >= 4
        && is_digits(parts[n - 3], 4)
        && is_digits(parts[n - 2], 2)
        && is_digits(parts[n - 1], 2)
    {
        let cut = parts[n - 3].len() + parts[n - 2].len() + parts[n - 1].len() + 3;
        return Some(key[..key.len() - cut].to_string());
    }
    if n >= 2 && (is_digits(parts[n - 1], 8) || is_digits(parts[n - 1], 4)) {
        let cut = parts[n - 1].len() + 1;
        return Some(key[..key.len() - cut].to_string());
    }
    None
}

fn parse_per_mtok(field: &str, owner: &str, v: &str, problems: &mut Vec<String>) -> PicoPerToken {
    PicoPerToken::parse_per_mtok(v).unwrap_or_else(|e: AmountError| {
        problems.push(format!("{owner}: {field}: {e}"));
        PicoPerToken::ZERO
    })
}

fn parse_money(field: &str, owner: &str, v: &str, problems: &mut Vec<String>) -> Money {
    Money::parse_non_negative(v).unwrap_or_else(|e| {
        problems.push(format!("{owner}: {field}: {e}"));
        Money::ZERO
    })
}

impl PriceBook {
    /// The price book shipped with Bursar (`prices/pricebook.toml`).
    pub fn builtin() -> Result<Self, PriceBookError> {
        Self::from_toml(include_str!("../../../prices/pricebook.toml"))
    }

    /// Parses and checks a price book; every problem found is reported at once.
    pub fn from_toml(text: &str) -> Result<Self, PriceBookError> {
        let raw: RawBook =
            toml::from_str(text).map_err(|e| PriceBookError::Syntax(e.to_string()))?;
        let mut problems = Vec::new();
        let mut models: Vec<Model> = Vec::with_capacity(raw.model.len());
        for m in raw.model {
            let owner = format!("model `{}`", m.id);
            if m.price.is_empty() {
                problems.push(format!("{owner}: has no price"));
            }
            let mut prices: Vec<TokenPrice> = m
                .price
                .iter()
                .map(|p| {
                    let input =
                        parse_per_mtok("input_per_mtok", &owner, &p.input_per_mtok, &mut problems);
                    TokenPrice {
                        effective: p.effective,
                        input,
                        output: parse_per_mtok(
                            "output_per_mtok",
                            &owner,
                            &p.output_per_mtok,
                            &mut problems,
                        ),
                        cached_input: p.cached_input_per_mtok.as_deref().map_or(input, |c| {
                            parse_per_mtok("cached_input_per_mtok", &owner, c, &mut problems)
                        }),
                        per_request: p.per_request.as_deref().map_or(Money::ZERO, |r| {
                            parse_money("per_request", &owner, r, &mut problems)
                        }),
                        source: p.source.clone(),
                        version: version_text(&m.id, p.effective).into(),
                    }
                })
                .collect();
            prices.sort_by_key(|p| p.effective);
            if prices.windows(2).any(|w| w[0].effective == w[1].effective) {
                problems.push(format!("{owner}: two prices take effect on the same date"));
            }
            if m.max_output_tokens == 0 && m.class != "embedding" {
                problems.push(format!("{owner}: max_output_tokens is 0"));
            }
            models.push(Model {
                id: m.id.into(),
                provider: m.provider,
                class: m.class,
                context_window: m.context_window,
                max_output_tokens: m.max_output_tokens,
                tokenizer: m.tokenizer,
                aliases: m.aliases,
                prices,
            });
        }
        let mut apis = Vec::with_capacity(raw.api.len());
        for a in raw.api {
            let owner = format!("api `{}`", a.id);
            if a.price.is_empty() {
                problems.push(format!("{owner}: has no price"));
            }
            let mut prices: Vec<CallPrice> = a
                .price
                .iter()
                .map(|p| CallPrice {
                    effective: p.effective,
                    per_call: parse_money("per_call", &owner, &p.per_call, &mut problems),
                    source: p.source.clone(),
                    version: version_text(&a.id, p.effective).into(),
                })
                .collect();
            prices.sort_by_key(|p| p.effective);
            apis.push(MeteredApi {
                id: a.id.into(),
                provider: a.provider,
                unit: a.unit,
                prices,
            });
        }
        let mut model_index: FastMap<String, usize> = FastMap::default();
        for (i, m) in models.iter().enumerate() {
            for name in std::iter::once(&*m.id).chain(m.aliases.iter().map(String::as_str)) {
                let key = normalize_key(name);
                if let Some(&j) = model_index.get(&key) {
                    if j != i {
                        problems.push(format!(
                            "`{name}` names both `{}` and `{}`",
                            models[j].id, m.id
                        ));
                    }
                } else {
                    model_index.insert(key, i);
                }
            }
        }
        let mut api_index = FastMap::default();
        for (i, a) in apis.iter().enumerate() {
            if api_index.insert(normalize_key(&a.id), i).is_some() {
                problems.push(format!("api `{}` is listed twice", a.id));
            }
        }
        if !problems.is_empty() {
            return Err(PriceBookError::Invalid(problems));
        }
        Ok(PriceBook {
            version: raw.version,
            models,
            apis,
            model_index,
            api_index,
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn models(&self) -> &[Model] {
        &self.models
    }

    pub fn apis(&self) -> &[MeteredApi] {
        &self.apis
    }

    /// The distinct model classes of the book.
    pub fn classes(&self) -> BTreeSet<&str> {
        self.models.iter().map(|m| m.class.as_str()).collect()
    }

    /// Maps any spelling of a model id to its canonical model.
    pub fn resolve(&self, requested: &str) -> Result<&Model, LookupError> {
        // Every key is its own normal form, so a request spelled as one (a canonical id
        // without dots, as a proxied call routes it several times) needs no normalizing.
        if let Some(&i) = self.model_index.get(requested) {
            return Ok(&self.models[i]);
        }
        let mut key = normalize_key(requested);
        loop {
            if let Some(&i) = self.model_index.get(&key) {
                return Ok(&self.models[i]);
            }
            match strip_date_suffix(&key) {
                Some(shorter) => key = shorter,
                None => return Err(LookupError::UnknownModel(requested.to_string())),
            }
        }
    }

    pub fn resolve_api(&self, requested: &str) -> Result<&MeteredApi, LookupError> {
        self.api_index
            .get(&normalize_key(requested))
            .map(|&i| &self.apis[i])
            .ok_or_else(|| LookupError::UnknownApi(requested.to_string()))
    }
}

impl Model {
    /// The price in effect at `at` (the latest whose effective date is on or before it).
    pub fn price_at(&self, at: DateTime<Utc>) -> Result<&TokenPrice, LookupError> {
        let day = at.date_naive();
        self.prices
            .iter()
            .rev()
            .find(|p| p.effective <= day)
            .ok_or_else(|| LookupError::NoPriceInEffect {
                item: self.id.to_string(),
                date: day,
            })
    }

    pub fn version_of(&self, price: &TokenPrice) -> PriceVersion {
        PriceVersion {
            item: self.id.to_string(),
            effective: price.effective,
        }
    }

    /// [`Self::version_of`] as text, shared: `price` is one of this model's.
    pub fn version_text(&self, price: &TokenPrice) -> Arc<str> {
        price.version.clone()
    }
}

impl MeteredApi {
    pub fn price_at(&self, at: DateTime<Utc>) -> Result<&CallPrice, LookupError> {
        let day = at.date_naive();
        self.prices
            .iter()
            .rev()
            .find(|p| p.effective <= day)
            .ok_or_else(|| LookupError::NoPriceInEffect {
                item: self.id.to_string(),
                date: day,
            })
    }

    pub fn version_of(&self, price: &CallPrice) -> PriceVersion {
        PriceVersion {
            item: self.id.to_string(),
            effective: price.effective,
        }
    }

    /// [`Self::version_of`] as text, shared: `price` is one of this API's.
    pub fn version_text(&self, price: &CallPrice) -> Arc<str> {
        price.version.clone()
    }
}

/// Token usage of one call, as the provider reports it (or as counted).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// All prompt tokens, cached ones included.
    pub input_tokens: u64,
    /// The part of `input_tokens` that was read from the provider's prompt cache.
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
}

impl TokenUsage {
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

impl TokenPrice {
    /// Exact pico-dollars of a call with this usage (cached tokens never exceed the input).
    pub fn cost_pico(&self, usage: &TokenUsage) -> i128 {
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let uncached = usage.input_tokens - cached;
        self.input.times(uncached)
            + self.cached_input.times(cached)
            + self.output.times(usage.output_tokens)
            + i128::from(self.per_request.nanos()) * crate::money::PICOS_PER_NANO
    }

    /// The cost of a call with this usage, rounded once (see `money`).
    pub fn cost(&self, usage: &TokenUsage) -> Money {
        Money::from_pico_ceil(self.cost_pico(usage))
    }
}

impl CallPrice {
    pub fn cost(&self, quantity: u64) -> Money {
        Money::from_pico_ceil(
            i128::from(self.per_call.nanos()) * i128::from(quantity) * crate::money::PICOS_PER_NANO,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The ledger records this text with every cost: it must stay what `Display`
        /// printed, for every date chrono knows (years past 9999 and before 0 too).
        #[test]
        fn a_version_text_is_what_display_prints(
            days in NaiveDate::MIN.num_days_from_ce()..=NaiveDate::MAX.num_days_from_ce(),
            near in 0i32..3_660_000,
            item in "[a-z0-9./-]{0,24}",
        ) {
            for d in [days, near] {
                let Some(effective) = NaiveDate::from_num_days_from_ce_opt(d) else { continue };
                let version = PriceVersion { item: item.clone(), effective };
                proptest::prop_assert_eq!(version_text(&item, effective), version.to_string());
            }
        }
    }

    const BOOK: &str = r#"
version = "test"
[[model]]
id = "gpt-4o-mini"
provider = "openai"
class = "small"
context_window = 128000
max_output_tokens = 16384
tokenizer = "o200k_base"
aliases = ["chatgpt-4o-mini"]
[[model.price]]
effective = "2024-07-18"
input_per_mtok = "0.15"
output_per_mtok = "0.60"
cached_input_per_mtok = "0.075"
source = "test"

[[model]]
id = "claude-3-5-sonnet"
provider = "anthropic"
class = "standard"
context_window = 200000
max_output_tokens = 8192
tokenizer = "estimate"
[[model.price]]
effective = "2024-06-20"
input_per_mtok = "3"
output_per_mtok = "15"
source = "test"
[[model.price]]
effective = "2025-01-01"
input_per_mtok = "2"
output_per_mtok = "10"
source = "test"

[[api]]
id = "web_search"
provider = "perplexity"
unit = "call"
[[api.price]]
effective = "2025-01-01"
per_call = "0.005"
source = "test"
"#;

    fn book() -> PriceBook {
        PriceBook::from_toml(BOOK).unwrap()
    }

    fn check_resolve(input: &str, expect: Option<&str>) {
        let got = book().resolve(input).ok().map(|m| m.id.clone());
        assert_eq!(got.as_deref(), expect, "{input}");
    }

    #[test]
    fn normalizes_model_ids() {
        check_resolve("gpt-4o-mini", Some("gpt-4o-mini"));
        check_resolve("GPT-4o-Mini", Some("gpt-4o-mini"));
        check_resolve("openai/gpt-4o-mini", Some("gpt-4o-mini"));
        check_resolve("openai/gpt-4o-mini-2024-07-18", Some("gpt-4o-mini"));
        check_resolve("openrouter/openai/gpt-4o-mini", Some("gpt-4o-mini"));
        check_resolve("chatgpt-4o-mini", Some("gpt-4o-mini"));
        check_resolve("gpt-4o-mini-latest", Some("gpt-4o-mini"));
        check_resolve("claude-3-5-sonnet-20241022", Some("claude-3-5-sonnet"));
        check_resolve("anthropic/claude-3.5-sonnet", Some("claude-3-5-sonnet"));
        check_resolve("claude-3-5-sonnet@20240620", Some("claude-3-5-sonnet"));
        check_resolve("gpt-4o", None);
        check_resolve("gpt-4o-mini-turbo", None);
        check_resolve("", None);
    }

    /// The shipped book: the current models of the seven providers, each price with the
    /// date it took effect and the page it comes from, each model with what a hold needs.
    #[test]
    fn the_shipped_book_prices_the_seven_providers_models_with_their_sources() {
        let b = PriceBook::builtin().unwrap();
        assert!(b.models().len() >= 40, "{} models", b.models().len());
        for provider in [
            "openai",
            "anthropic",
            "google",
            "mistral",
            "deepseek",
            "perplexity",
            "xai",
        ] {
            let n = b.models().iter().filter(|m| m.provider == provider).count();
            assert!(n >= 3, "{provider}: {n} models");
        }
        let classes = b.classes();
        for m in b.models() {
            assert!(!m.prices.is_empty(), "{}", m.id);
            assert!(classes.contains(m.class.as_str()));
            assert!(m.context_window > 0, "{}", m.id);
            assert!(m.max_output_tokens <= m.context_window, "{}", m.id);
            let openai = m.provider == "openai";
            assert_eq!(
                m.tokenizer == TokenizerKind::Estimate,
                !openai,
                "{}: OpenAI's models count with their encoding, the others estimate",
                m.id
            );
            for p in &m.prices {
                assert!(
                    p.source.starts_with("https://"),
                    "{} {}: {}",
                    m.id,
                    p.effective,
                    p.source
                );
                assert!(p.cached_input <= p.input, "{} {}", m.id, p.effective);
            }
            assert!(
                m.prices.windows(2).all(|w| w[0].effective < w[1].effective),
                "{}: one price a date, in order",
                m.id
            );
        }
        for api in ["web_search", "patent_search"] {
            let a = b.apis().iter().find(|a| &*a.id == api);
            let a = a.unwrap_or_else(|| panic!("{api}"));
            assert!(a
                .prices
                .iter()
                .all(|p| p.source.starts_with("https://") && p.per_call > Money::ZERO));
        }
    }

    #[test]
    fn every_index_key_is_its_own_normal_form() {
        // What lets `resolve` look a request up as given before normalizing it.
        for b in [book(), PriceBook::builtin().unwrap()] {
            assert!(!b.model_index.is_empty());
            for key in b.model_index.keys() {
                assert_eq!(&normalize_key(key), key);
            }
        }
    }

    #[test]
    fn unknown_model_is_an_error_not_zero() {
        assert_eq!(
            book().resolve("gpt-9").unwrap_err(),
            LookupError::UnknownModel("gpt-9".into())
        );
    }

    #[test]
    fn price_follows_effective_dates() {
        let b = book();
        let m = b.resolve("claude-3-5-sonnet").unwrap();
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(
            m.price_at(at("2024-12-31T23:59:59Z"))
                .unwrap()
                .input
                .to_string(),
            "3"
        );
        assert_eq!(
            m.price_at(at("2025-01-01T00:00:00Z"))
                .unwrap()
                .input
                .to_string(),
            "2"
        );
        assert!(m.price_at(at("2024-01-01T00:00:00Z")).is_err());
        assert_eq!(
            m.version_of(m.price_at(at("2025-02-01T00:00:00Z")).unwrap())
                .to_string(),
            "claude-3-5-sonnet@2025-01-01"
        );
    }

    #[test]
    fn cost_is_exact() {
        let b = book();
        let p = b.resolve("gpt-4o-mini").unwrap().prices[0].clone();
        // 1,000,000 input at $0.15, 500,000 of them cached at $0.075, 1,000 output at $0.60.
        let usage = TokenUsage {
            input_tokens: 1_000_000,
            cached_input_tokens: 500_000,
            output_tokens: 1_000,
        };
        assert_eq!(p.cost(&usage).to_string(), "0.1131");
        // One cached token costs exactly 75 nano-dollars.
        let one = TokenUsage {
            input_tokens: 1,
            cached_input_tokens: 1,
            output_tokens: 0,
        };
        assert_eq!(p.cost(&one).nanos(), 75);
        // At $0.0015 per million, one token is 1.5 nano-dollars: rounded up once, to 2.
        let fine = TokenPrice {
            input: PicoPerToken::parse_per_mtok("0.0015").unwrap(),
            ..p.clone()
        };
        let one_input = TokenUsage {
            input_tokens: 1,
            ..TokenUsage::default()
        };
        assert_eq!(fine.cost(&one_input).nanos(), 2);
        let three = TokenUsage {
            input_tokens: 3,
            ..TokenUsage::default()
        };
        assert_eq!(fine.cost(&three).nanos(), 5);
    }

    #[test]
    fn invalid_books_name_every_problem() {
        let bad = BOOK.replace("\"0.60\"", "\"0.6000001\"").replace(
            "aliases = [\"chatgpt-4o-mini\"]",
            "aliases = [\"claude-3.5-sonnet\"]",
        );
        let err = PriceBook::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("output_per_mtok"), "{err}");
        assert!(err.contains("names both"), "{err}");
        assert!(PriceBook::from_toml("version = 1").is_err());
        assert!(PriceBook::from_toml("version = \"x\"\nbogus = 1").is_err());
    }

    #[test]
    fn metered_api_prices() {
        let b = book();
        let a = b.resolve_api("web_search").unwrap();
        let p = a.price_at("2025-06-01T00:00:00Z".parse().unwrap()).unwrap();
        assert_eq!(p.cost(3).to_string(), "0.015");
        assert!(b.resolve_api("teleport").is_err());
    }
}
