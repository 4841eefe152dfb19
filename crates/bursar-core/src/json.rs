//! The JSON of the two answers every authorize + settle pair sends, [`Permit`] and
//! [`Settlement`], and of the detail every hold entry stores ([`HoldDetail`]), written
//! by hand.
//!
//! Through `serde_json` a permit cost about 32k instructions (callgrind, four budgets and
//! a rate limit), a tenth of the whole pair: every key escaped and written piece by piece,
//! a buffer checked at each write, the expiry formatted through `core::fmt`. Here each
//! run of fixed text is one copy and only the values that can hold any text are escaped.
//!
//! The output is byte for byte what `serde_json` writes for the derived `Serialize`, which
//! stays the schema (OpenAPI) and the reader's contract: `json_matches_serde` (a property
//! test below) holds them equal over random values, escapes and odd times included. A
//! hold's detail is the text its ledger entry stores and its hash covers, so there it
//! must be equal for a ledger written before to verify; the same test holds it.

use chrono::{DateTime, Datelike, Timelike, Utc};
use uuid::Uuid;

use crate::budget::BucketKey;
use crate::engine::{BudgetView, Outcome, Permit, RateStanding, Settlement};
use crate::ledger::{HoldDetail, Tags};
use crate::money::Money;

/// Appends `s` as a JSON string, escaped as `serde_json` does: `"` and `\`, the short
/// escapes of \b \f \n \r \t, `\u00XX` (lowercase) for the other control characters.
fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    contents(out, s);
    out.push(b'"');
}

/// [`string`] without its quotes.
fn contents(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // Most texts need no escape: one pass that does not branch per byte tells.
    let plain = !bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn money(out: &mut Vec<u8>, m: Money) {
    out.push(b'"');
    m.write_to(out);
    out.push(b'"');
}

fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn boolean(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

fn uuid(out: &mut Vec<u8>, id: &Uuid) {
    out.push(b'"');
    out.extend_from_slice(
        id.hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    out.push(b'"');
}

/// Two digits, zero-padded.
fn two(out: &mut Vec<u8>, n: u32) {
    // Values here are below 100 (a leap second is 60).
    let n = n % 100;
    out.push(b'0' + (n / 10) as u8);
    out.push(b'0' + (n % 10) as u8);
}

/// RFC 3339 as chrono's `Serialize` writes a UTC time: fractional seconds only as
/// precise as needed (3, 6 or 9 digits), `Z` for the offset.
fn time(out: &mut Vec<u8>, t: &DateTime<Utc>) {
    let year = t.year();
    if !(0..=9999).contains(&year) {
        // A signed, wider year: chrono's own writer (never on a real permit).
        if serde_json::to_writer(&mut *out, t).is_err() {
            out.extend_from_slice(b"null");
        }
        return;
    }
    let year = year.unsigned_abs();
    out.push(b'"');
    two(out, year / 100);
    two(out, year % 100);
    out.push(b'-');
    two(out, t.month());
    out.push(b'-');
    two(out, t.day());
    out.push(b'T');
    let mut sec = t.second();
    let mut nano = t.nanosecond();
    if nano >= 1_000_000_000 {
        sec += 1;
        nano -= 1_000_000_000;
    }
    two(out, t.hour());
    out.push(b':');
    two(out, t.minute());
    out.push(b':');
    two(out, sec);
    let (digits, frac) = if nano == 0 {
        (0, 0)
    } else if nano.is_multiple_of(1_000_000) {
        (3, nano / 1_000_000)
    } else if nano.is_multiple_of(1_000) {
        (6, nano / 1_000)
    } else {
        (9, nano)
    };
    if digits > 0 {
        out.push(b'.');
        let mut buf = [b'0'; 9];
        let mut f = frac;
        for d in buf[..digits].iter_mut().rev() {
            *d = b'0' + (f % 10) as u8;
            f /= 10;
        }
        out.extend_from_slice(&buf[..digits]);
    }
    out.extend_from_slice(b"Z\"");
}

fn budget(out: &mut Vec<u8>, b: &BudgetView) {
    out.extend_from_slice(b"{\"budget_id\":");
    string(out, &b.budget_id);
    out.extend_from_slice(b",\"scope\":");
    string(out, &b.scope);
    out.extend_from_slice(b",\"value\":");
    string(out, &b.value);
    out.extend_from_slice(b",\"window\":");
    string(out, &b.window);
    out.extend_from_slice(b",\"period_start\":");
    int(out, b.period_start);
    out.extend_from_slice(b",\"limit\":");
    money(out, b.limit);
    out.extend_from_slice(b",\"spent\":");
    money(out, b.spent);
    out.extend_from_slice(b",\"held\":");
    money(out, b.held);
    out.extend_from_slice(b",\"remaining\":");
    money(out, b.remaining);
    out.extend_from_slice(b",\"level\":");
    string(out, b.level.as_str());
    out.push(b'}');
}

fn rate(out: &mut Vec<u8>, r: &RateStanding) {
    out.extend_from_slice(b"{\"dimension\":");
    string(out, &r.dimension);
    out.extend_from_slice(b",\"per\":");
    string(out, &r.per);
    out.extend_from_slice(b",\"limit_per_minute\":");
    int(out, r.limit_per_minute);
    out.extend_from_slice(b",\"remaining\":");
    int(out, r.remaining);
    out.extend_from_slice(b",\"reset_ms\":");
    int(out, r.reset_ms);
    out.push(b'}');
}

/// A bucket as its `Serialize` writes it: the string `budget|value|period_start`.
fn bucket(out: &mut Vec<u8>, b: &BucketKey) {
    out.push(b'"');
    contents(out, &b.budget);
    out.push(b'|');
    contents(out, &b.value);
    out.push(b'|');
    int(out, b.period_start);
    out.push(b'"');
}

fn opt_int(out: &mut Vec<u8>, n: Option<impl itoa::Integer>) {
    match n {
        Some(n) => int(out, n),
        None => out.extend_from_slice(b"null"),
    }
}

fn text_map(out: &mut Vec<u8>, m: &std::collections::BTreeMap<String, String>) {
    out.push(b'{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, k);
        out.push(b':');
        string(out, v);
    }
    out.push(b'}');
}

/// Tags as their `Serialize` writes them: only the fields that are set.
fn tags(out: &mut Vec<u8>, t: &Tags) {
    let Tags {
        workflow,
        campaign,
        agent,
        feature,
        task,
        end_user,
        custom,
        metadata,
    } = t;
    out.push(b'{');
    let mut first = true;
    let mut key = |out: &mut Vec<u8>, k: &[u8]| {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(k);
    };
    let texts: [(&[u8], &Option<String>); 6] = [
        (b"\"workflow\":", workflow),
        (b"\"campaign\":", campaign),
        (b"\"agent\":", agent),
        (b"\"feature\":", feature),
        (b"\"task\":", task),
        (b"\"end_user\":", end_user),
    ];
    for (k, v) in texts {
        if let Some(v) = v {
            key(out, k);
            string(out, v);
        }
    }
    if !custom.is_empty() {
        key(out, b"\"custom\":");
        text_map(out, custom);
    }
    if !metadata.is_empty() {
        key(out, b"\"metadata\":");
        text_map(out, metadata);
    }
    out.push(b'}');
}

fn list<T>(out: &mut Vec<u8>, items: &[T], one: fn(&mut Vec<u8>, &T)) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        one(out, item);
    }
    out.push(b']');
}

/// A value whose JSON is written here, as `serde_json::to_vec` writes it.
pub trait ToJson {
    fn to_json(&self) -> Vec<u8>;
}

impl ToJson for HoldDetail {
    fn to_json(&self) -> Vec<u8> {
        // Taken apart by name: a field added to the detail fails to compile here until
        // it is written.
        let HoldDetail {
            buckets,
            tags: t,
            team,
            user,
            expires_at_ms,
            idempotency_key,
            fingerprint,
            max_tokens,
            prompt_tokens,
            quantity,
            rate_tokens,
        } = self;
        let mut out = Vec::with_capacity(192 + 48 * buckets.len());
        out.extend_from_slice(b"{\"buckets\":");
        list(&mut out, buckets, bucket);
        out.extend_from_slice(b",\"tags\":");
        tags(&mut out, t);
        out.extend_from_slice(b",\"team\":");
        opt_string(&mut out, team.as_deref());
        out.extend_from_slice(b",\"user\":");
        opt_string(&mut out, user.as_deref());
        out.extend_from_slice(b",\"expires_at_ms\":");
        int(&mut out, *expires_at_ms);
        if let Some(k) = idempotency_key {
            out.extend_from_slice(b",\"idempotency_key\":");
            string(&mut out, k);
        }
        if let Some(f) = fingerprint {
            out.extend_from_slice(b",\"fingerprint\":");
            string(&mut out, f);
        }
        out.extend_from_slice(b",\"max_tokens\":");
        opt_int(&mut out, *max_tokens);
        out.extend_from_slice(b",\"prompt_tokens\":");
        int(&mut out, *prompt_tokens);
        out.extend_from_slice(b",\"quantity\":");
        int(&mut out, *quantity);
        out.extend_from_slice(b",\"rate_tokens\":");
        int(&mut out, *rate_tokens);
        out.push(b'}');
        out
    }
}

impl ToJson for Permit {
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(320 + 260 * self.budgets.len());
        out.extend_from_slice(b"{\"authorization_id\":");
        uuid(&mut out, &self.authorization_id);
        out.extend_from_slice(b",\"model\":");
        opt_string(&mut out, self.model.as_deref());
        out.extend_from_slice(b",\"api\":");
        opt_string(&mut out, self.api.as_deref());
        out.extend_from_slice(b",\"price_version\":");
        string(&mut out, &self.price_version);
        out.extend_from_slice(b",\"held\":");
        money(&mut out, self.held);
        out.extend_from_slice(b",\"prompt_tokens\":");
        int(&mut out, self.prompt_tokens);
        out.extend_from_slice(b",\"max_tokens\":");
        match self.max_tokens {
            Some(n) => int(&mut out, n),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"quantity\":");
        int(&mut out, self.quantity);
        out.extend_from_slice(b",\"expires_at\":");
        time(&mut out, &self.expires_at);
        out.extend_from_slice(b",\"downgraded_from\":");
        opt_string(&mut out, self.downgraded_from.as_deref());
        out.extend_from_slice(b",\"shadow_denial\":");
        opt_string(&mut out, self.shadow_denial.map(|c| c.as_str()));
        out.extend_from_slice(b",\"budgets\":");
        list(&mut out, &self.budgets, budget);
        if !self.rate_limits.is_empty() {
            out.extend_from_slice(b",\"rate_limits\":");
            list(&mut out, &self.rate_limits, rate);
        }
        out.extend_from_slice(b",\"replayed\":");
        boolean(&mut out, self.replayed);
        out.push(b'}');
        out
    }
}

impl ToJson for Settlement {
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(320);
        out.extend_from_slice(b"{\"authorization_id\":");
        uuid(&mut out, &self.authorization_id);
        out.extend_from_slice(b",\"outcome\":");
        string(
            &mut out,
            match self.outcome {
                Outcome::Settled => "settled",
                Outcome::Voided => "voided",
                Outcome::Expired => "expired",
            },
        );
        out.extend_from_slice(b",\"cost\":");
        money(&mut out, self.cost);
        out.extend_from_slice(b",\"charge\":");
        money(&mut out, self.charge);
        out.extend_from_slice(b",\"released\":");
        money(&mut out, self.released);
        out.extend_from_slice(b",\"overage\":");
        money(&mut out, self.overage);
        out.extend_from_slice(b",\"model_used\":");
        opt_string(&mut out, self.model_used.as_deref());
        out.extend_from_slice(b",\"price_version\":");
        string(&mut out, &self.price_version);
        out.extend_from_slice(b",\"drift\":");
        boolean(&mut out, self.drift);
        out.extend_from_slice(b",\"replayed\":");
        boolean(&mut out, self.replayed);
        out.push(b'}');
        out
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::Arc;

    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;
    use crate::budget::Level;
    use crate::engine::DenyCode;

    /// Any text, control characters, quotes, backslashes and non-ASCII made likely.
    fn text() -> impl Strategy<Value = String> + Clone {
        prop_oneof![
            "[a-z0-9_./@-]{0,24}",
            proptest::collection::vec(
                prop_oneof![
                    Just('"'),
                    Just('\\'),
                    Just('/'),
                    Just('\u{7f}'),
                    Just('é'),
                    Just('€'),
                    Just('😀'),
                    proptest::char::range('\0', '\u{1f}'),
                    proptest::char::any(),
                ],
                0..12
            )
            .prop_map(|cs| cs.into_iter().collect()),
        ]
    }

    fn money() -> impl Strategy<Value = Money> {
        prop_oneof![
            Just(Money::ZERO),
            any::<i64>().prop_map(Money::from_nanos),
            (0i64..10_000_000_000).prop_map(Money::from_nanos),
        ]
    }

    fn time() -> impl Strategy<Value = DateTime<Utc>> {
        let nanos = prop_oneof![
            Just(0u32),
            (0u32..1000).prop_map(|ms| ms * 1_000_000),
            (0u32..1_000_000).prop_map(|us| us * 1_000),
            0u32..1_000_000_000,
            // A leap second, as chrono represents one.
            1_000_000_000u32..2_000_000_000,
        ];
        let secs = prop_oneof![
            0i64..253_402_300_800,
            // Before year 0 and after 9999: written with a sign.
            -100_000_000_000i64..-62_167_219_200,
            253_402_300_800i64..300_000_000_000,
        ];
        (secs, nanos).prop_map(|(s, n)| {
            // A leap second exists only at a minute's last second.
            let n = if n >= 1_000_000_000 && s.rem_euclid(60) != 59 {
                n - 1_000_000_000
            } else {
                n
            };
            Utc.timestamp_opt(s, n)
                .single()
                .unwrap_or_else(|| Utc.timestamp_opt(s, 0).single().unwrap_or_default())
        })
    }

    fn level() -> impl Strategy<Value = Level> {
        prop_oneof![
            Just(Level::Normal),
            Just(Level::Warn),
            Just(Level::Emergency),
            Just(Level::Blocked),
        ]
    }

    fn budget() -> impl Strategy<Value = BudgetView> {
        (
            (text(), text(), text(), text()),
            any::<i64>(),
            (money(), money(), money(), money()),
            level(),
        )
            .prop_map(
                |(
                    (id, scope, value, window),
                    period_start,
                    (limit, spent, held, remaining),
                    level,
                )| {
                    BudgetView {
                        budget_id: Arc::from(id),
                        scope: Arc::from(scope),
                        value: Arc::from(value),
                        window: Arc::from(window),
                        period_start,
                        limit,
                        spent,
                        held,
                        remaining,
                        level,
                    }
                },
            )
    }

    fn rate() -> impl Strategy<Value = RateStanding> {
        (text(), text(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
            |(dimension, per, limit_per_minute, remaining, reset_ms)| RateStanding {
                dimension: Cow::Owned(dimension),
                per: Cow::Owned(per),
                limit_per_minute,
                remaining,
                reset_ms,
            },
        )
    }

    fn permit() -> impl Strategy<Value = Permit> {
        (
            (
                any::<u128>(),
                proptest::option::of(text()),
                proptest::option::of(text()),
                text(),
            ),
            (
                money(),
                any::<u64>(),
                proptest::option::of(any::<u32>()),
                any::<u64>(),
            ),
            (time(), proptest::option::of(text())),
            proptest::option::of(proptest::sample::select(vec![
                DenyCode::InvalidApiKey,
                DenyCode::ApiKeyRevoked,
                DenyCode::ApiKeyExpired,
                DenyCode::AdminKeyCannotSpend,
                DenyCode::TenantNotFound,
                DenyCode::FeatureNotInPlan,
                DenyCode::TaskNotInPlan,
                DenyCode::ModelClassNotAllowed,
                DenyCode::UnknownModel,
                DenyCode::UnknownApi,
                DenyCode::NoPriceInEffect,
                DenyCode::PromptTooLong,
                DenyCode::InvalidRequest,
                DenyCode::RateLimited,
                DenyCode::ExceedsRateLimitCapacity,
                DenyCode::BudgetExceeded,
                DenyCode::IdempotencyKeyReused,
                DenyCode::LeaseNeeded,
            ])),
            proptest::collection::vec(budget(), 0..6),
            proptest::collection::vec(rate(), 0..3),
            any::<bool>(),
        )
            .prop_map(
                |(
                    (id, model, api, price_version),
                    (held, prompt_tokens, max_tokens, quantity),
                    (expires_at, downgraded_from),
                    shadow_denial,
                    budgets,
                    rate_limits,
                    replayed,
                )| Permit {
                    authorization_id: Uuid::from_u128(id),
                    model: model.map(Into::into),
                    api: api.map(Into::into),
                    price_version: price_version.into(),
                    held,
                    prompt_tokens,
                    max_tokens,
                    quantity,
                    expires_at,
                    downgraded_from: downgraded_from.map(Into::into),
                    shadow_denial,
                    budgets,
                    rate_limits,
                    replayed,
                },
            )
    }

    fn settlement() -> impl Strategy<Value = Settlement> {
        (
            any::<u128>(),
            prop_oneof![
                Just(Outcome::Settled),
                Just(Outcome::Voided),
                Just(Outcome::Expired),
            ],
            (money(), money(), money(), money()),
            (proptest::option::of(text()), text()),
            (any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(
                    id,
                    outcome,
                    (cost, charge, released, overage),
                    (model_used, price_version),
                    (drift, replayed),
                )| {
                    Settlement {
                        authorization_id: Uuid::from_u128(id),
                        outcome,
                        cost,
                        charge,
                        released,
                        overage,
                        model_used: model_used.map(Into::into),
                        price_version: price_version.into(),
                        drift,
                        replayed,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn json_matches_serde(p in permit(), s in settlement(), d in crate::testing::hold_detail(text())) {
            let ours = String::from_utf8(p.to_json()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let serde = serde_json::to_string(&p).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(ours, serde);
            let ours = String::from_utf8(s.to_json()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let serde = serde_json::to_string(&s).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(ours, serde);
            let ours = String::from_utf8(d.to_json()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let serde = serde_json::to_string(&d).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(ours, serde);
        }
    }

    #[test]
    fn every_control_character_is_escaped_as_serde_json_does() {
        let all: String = (0u8..=0x7f).map(char::from).collect();
        let mut out = Vec::new();
        string(&mut out, &all);
        assert_eq!(
            out,
            serde_json::to_vec(&all).unwrap_or_default(),
            "the escape of some character differs"
        );
    }
}
