//! Exact money.
//!
//! Every amount Bursar stores, holds or reports is a [`Money`]: a signed whole number of
//! nano-dollars (10⁻⁹ USD) in an `i64`, which spans ±9.2 billion USD. Per-token prices
//! are finer than that (a cached input token of a small model costs a few hundredths of
//! a nano-dollar), so they are kept as [`PicoPerToken`] (10⁻¹² USD per token) and a
//! cost is first summed exactly in pico-dollars (`i128`), then rounded **once**.
//!
//! # The rounding rule
//!
//! A computed cost is rounded **up** to the next whole nano-dollar ([`Money::from_pico_ceil`]).
//! Rounding up once per call, never per component, means a hold computed for a worst
//! case is never smaller than the cost of any usage at or below that worst case, and a
//! total is always the exact sum of the recorded entries. No floating point is ever used.

use std::fmt;
use std::ops::{Add, AddAssign, Neg, Sub, SubAssign};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Nano-dollars per dollar.
pub const NANOS_PER_USD: i64 = 1_000_000_000;
/// Pico-dollars per nano-dollar.
pub const PICOS_PER_NANO: i128 = 1_000;
/// Decimal places a [`Money`] amount can carry.
pub const MONEY_DECIMALS: u32 = 9;
/// Decimal places a per-million-token price can carry (one pico-dollar per token).
pub const PRICE_PER_MTOK_DECIMALS: u32 = 6;

/// Why a decimal amount could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("`{0}` is not a decimal amount")]
    Malformed(String),
    #[error("`{input}` has more than {max_decimals} decimal places")]
    TooPrecise { input: String, max_decimals: u32 },
    #[error("`{0}` is out of range")]
    OutOfRange(String),
    #[error("`{0}` must not be negative")]
    Negative(String),
}

/// Parses a plain decimal (`"12"`, `"-0.5"`, `"0.000150"`) into an integer scaled by
/// 10^`decimals`, refusing more fractional digits than `decimals` (never rounding).
fn parse_scaled(input: &str, decimals: u32) -> Result<i128, AmountError> {
    let s = input.trim();
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int_part, frac_part) = match digits.split_once('.') {
        Some((i, f)) => (i, f),
        None => (digits, ""),
    };
    let well_formed = !(int_part.is_empty() && frac_part.is_empty())
        && int_part.bytes().all(|b| b.is_ascii_digit())
        && frac_part.bytes().all(|b| b.is_ascii_digit())
        && !(digits.contains('.') && frac_part.is_empty());
    if !well_formed {
        return Err(AmountError::Malformed(input.to_string()));
    }
    let frac_trimmed = frac_part.trim_end_matches('0');
    if frac_trimmed.len() > decimals as usize {
        return Err(AmountError::TooPrecise {
            input: input.to_string(),
            max_decimals: decimals,
        });
    }
    if int_part.len() > 20 {
        return Err(AmountError::OutOfRange(input.to_string()));
    }
    let mut value: i128 = 0;
    for b in int_part.bytes() {
        value = value * 10 + i128::from(b - b'0');
    }
    for i in 0..decimals as usize {
        let digit = frac_trimmed.as_bytes().get(i).map_or(0, |b| b - b'0');
        value = value * 10 + i128::from(digit);
    }
    Ok(if negative { -value } else { value })
}

/// Room for the longest amount [`format_scaled`] writes: a sign, 19 digits and a point.
const SCALED_BYTES: usize = 24;

/// Writes an integer scaled by 10^`decimals` into `buf` as a plain decimal with trailing
/// zeros trimmed (at least one fractional digit is never forced: `1` prints as `"1"`).
/// Digit by digit, in 64-bit integers: amounts are formatted on every answer, and
/// `core::fmt` with 128-bit division cost more than the rest of a decision.
fn format_scaled(value: i64, decimals: u32, buf: &mut [u8; SCALED_BYTES]) -> &str {
    // Only ASCII digits, a point and a sign are written.
    std::str::from_utf8(scaled_digits(value, decimals, buf)).unwrap_or_default()
}

/// [`format_scaled`]'s bytes, for a writer of bytes (no UTF-8 check to pay).
fn scaled_digits(value: i64, decimals: u32, buf: &mut [u8; SCALED_BYTES]) -> &[u8] {
    let scale = 10u64.pow(decimals);
    let abs = value.unsigned_abs();
    let mut int = abs / scale;
    let mut frac = abs % scale;
    let mut width = if frac == 0 { 0 } else { decimals };
    while frac != 0 && frac.is_multiple_of(10) {
        frac /= 10;
        width -= 1;
    }
    let mut at = buf.len();
    for _ in 0..width {
        at -= 1;
        buf[at] = b'0' + (frac % 10) as u8;
        frac /= 10;
    }
    if width > 0 {
        at -= 1;
        buf[at] = b'.';
    }
    loop {
        at -= 1;
        buf[at] = b'0' + (int % 10) as u8;
        int /= 10;
        if int == 0 {
            break;
        }
    }
    if value < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

/// An exact amount of US dollars, in whole nano-dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

impl Money {
    pub const ZERO: Money = Money(0);
    pub const MAX: Money = Money(i64::MAX);

    pub const fn from_nanos(nanos: i64) -> Self {
        Money(nanos)
    }

    /// Appends the amount as [`fmt::Display`] writes it (the text of its JSON string).
    pub fn write_to(self, out: &mut Vec<u8>) {
        self.with_text(|t| out.extend_from_slice(t));
    }

    /// Hands the amount's text, as [`fmt::Display`] writes it, to `f`, for a caller that
    /// copies it into a buffer of its own.
    pub fn with_text<R>(self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(scaled_digits(
            self.0,
            MONEY_DECIMALS,
            &mut [0; SCALED_BYTES],
        ))
    }

    pub const fn nanos(self) -> i64 {
        self.0
    }

    /// Whole dollars; for configuration defaults and tests.
    pub const fn from_usd(usd: i64) -> Self {
        Money(usd * NANOS_PER_USD)
    }

    /// Rounds an exact pico-dollar amount **up** to the next nano-dollar: the one rounding
    /// rule of Bursar (see the module documentation). Saturates at the bounds of `Money`.
    pub fn from_pico_ceil(pico: i128) -> Self {
        let nanos =
            pico.div_euclid(PICOS_PER_NANO) + i128::from(pico.rem_euclid(PICOS_PER_NANO) != 0);
        Money(nanos.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
    }

    /// Parses a decimal string of dollars, refusing more than nine decimal places.
    pub fn parse(input: &str) -> Result<Self, AmountError> {
        let scaled = parse_scaled(input, MONEY_DECIMALS)?;
        i64::try_from(scaled)
            .map(Money)
            .map_err(|_| AmountError::OutOfRange(input.to_string()))
    }

    /// Like [`Money::parse`] but refuses negative amounts (limits, prices, fees).
    pub fn parse_non_negative(input: &str) -> Result<Self, AmountError> {
        let m = Self::parse(input)?;
        if m.0 < 0 {
            return Err(AmountError::Negative(input.to_string()));
        }
        Ok(m)
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    pub fn saturating_add(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }

    pub fn saturating_sub(self, other: Money) -> Money {
        Money(self.0.saturating_sub(other.0))
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn max(self, other: Money) -> Money {
        Money(self.0.max(other.0))
    }

    pub fn min(self, other: Money) -> Money {
        Money(self.0.min(other.0))
    }

    /// `self × numerator / denominator`, rounded down; for threshold percentages.
    pub fn mul_div_floor(self, numerator: i64, denominator: i64) -> Money {
        if denominator == 0 {
            return Money::ZERO;
        }
        let v = i128::from(self.0) * i128::from(numerator) / i128::from(denominator);
        Money(v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(format_scaled(
            self.0,
            MONEY_DECIMALS,
            &mut [0; SCALED_BYTES],
        ))
    }
}

impl Add for Money {
    type Output = Money;
    fn add(self, rhs: Money) -> Money {
        self.saturating_add(rhs)
    }
}

impl Sub for Money {
    type Output = Money;
    fn sub(self, rhs: Money) -> Money {
        self.saturating_sub(rhs)
    }
}

impl AddAssign for Money {
    fn add_assign(&mut self, rhs: Money) {
        *self = *self + rhs;
    }
}

impl SubAssign for Money {
    fn sub_assign(&mut self, rhs: Money) {
        *self = *self - rhs;
    }
}

impl Neg for Money {
    type Output = Money;
    fn neg(self) -> Money {
        Money(self.0.saturating_neg())
    }
}

impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, |a, b| a + b)
    }
}

/// Money travels as a decimal string (`"0.00015"`) so no JSON reader turns it into a float.
impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(format_scaled(
            self.0,
            MONEY_DECIMALS,
            &mut [0; SCALED_BYTES],
        ))
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Money::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Money {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "USD as an exact decimal string, up to 9 decimal places",
            ))
            .examples(["0.000150"])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Money {}

/// A per-token price in pico-dollars (10⁻¹² USD). One pico-dollar per token is one
/// micro-dollar per million tokens, so a per-million-token price with up to six decimals
/// is held exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PicoPerToken(i64);

impl PicoPerToken {
    pub const ZERO: PicoPerToken = PicoPerToken(0);

    pub const fn from_picos(p: i64) -> Self {
        PicoPerToken(p)
    }

    pub const fn picos(self) -> i64 {
        self.0
    }

    /// Parses a price in USD per million tokens (`"0.15"`), at most six decimals.
    pub fn parse_per_mtok(input: &str) -> Result<Self, AmountError> {
        let scaled = parse_scaled(input, PRICE_PER_MTOK_DECIMALS)?;
        if scaled < 0 {
            return Err(AmountError::Negative(input.to_string()));
        }
        i64::try_from(scaled)
            .map(PicoPerToken)
            .map_err(|_| AmountError::OutOfRange(input.to_string()))
    }

    /// Exact pico-dollars for `tokens` tokens.
    pub fn times(self, tokens: u64) -> i128 {
        i128::from(self.0) * i128::from(tokens)
    }
}

impl fmt::Display for PicoPerToken {
    /// Displays as USD per million tokens, the unit price books use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(format_scaled(
            self.0,
            PRICE_PER_MTOK_DECIMALS,
            &mut [0; SCALED_BYTES],
        ))
    }
}

impl Serialize for PicoPerToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(format_scaled(
            self.0,
            PRICE_PER_MTOK_DECIMALS,
            &mut [0; SCALED_BYTES],
        ))
    }
}

impl<'de> Deserialize<'de> for PicoPerToken {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PicoPerToken::parse_per_mtok(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check_parse(input: &str, expect: Result<i64, ()>) {
        assert_eq!(
            Money::parse(input).map(Money::nanos).map_err(|_| ()),
            expect,
            "{input}"
        );
    }

    #[test]
    fn parses_decimal_dollars() {
        check_parse("1", Ok(1_000_000_000));
        check_parse("0.5", Ok(500_000_000));
        check_parse("-2.25", Ok(-2_250_000_000));
        check_parse("0.000000001", Ok(1));
        check_parse("0.0000000010", Ok(1));
        check_parse("0.0000000001", Err(()));
        check_parse("1e3", Err(()));
        check_parse("", Err(()));
        check_parse(".", Err(()));
        check_parse("1.", Err(()));
        check_parse("NaN", Err(()));
        check_parse("99999999999", Err(()));
    }

    #[test]
    fn too_precise_is_its_own_error() {
        assert!(matches!(
            Money::parse("0.1234567891"),
            Err(AmountError::TooPrecise { .. })
        ));
        assert!(matches!(
            PicoPerToken::parse_per_mtok("0.1234567"),
            Err(AmountError::TooPrecise { .. })
        ));
    }

    #[test]
    fn rounds_up_once() {
        assert_eq!(Money::from_pico_ceil(0).nanos(), 0);
        assert_eq!(Money::from_pico_ceil(1).nanos(), 1);
        assert_eq!(Money::from_pico_ceil(1000).nanos(), 1);
        assert_eq!(Money::from_pico_ceil(1001).nanos(), 2);
        assert_eq!(Money::from_pico_ceil(-1).nanos(), 0);
    }

    #[test]
    fn displays_trimmed() {
        assert_eq!(Money::from_nanos(150).to_string(), "0.00000015");
        assert_eq!(Money::from_usd(3).to_string(), "3");
        assert_eq!(Money::from_nanos(-1_500_000_000).to_string(), "-1.5");
        assert_eq!(
            PicoPerToken::parse_per_mtok("0.075").unwrap().to_string(),
            "0.075"
        );
    }

    proptest! {
        #[test]
        fn display_parse_round_trips(n in any::<i64>()) {
            let m = Money::from_nanos(n);
            prop_assert_eq!(Money::parse(&m.to_string()), Ok(m));
        }

        #[test]
        fn formats_as_the_exact_decimal(n in any::<i64>()) {
            // The plain decimal, computed another way: the digits of |n| with the point
            // put in, then trailing zeros (and a bare point) trimmed.
            let digits = format!("{:010}", n.unsigned_abs());
            let (int, frac) = digits.split_at(digits.len() - 9);
            let frac = frac.trim_end_matches('0');
            let sign = if n < 0 { "-" } else { "" };
            let expect = if frac.is_empty() {
                format!("{sign}{int}")
            } else {
                format!("{sign}{int}.{frac}")
            };
            let m = Money::from_nanos(n);
            prop_assert_eq!(m.to_string(), expect.clone());
            prop_assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{expect}\""));
            let p = PicoPerToken(n);
            let digits = format!("{:07}", n.unsigned_abs());
            let (int, frac) = digits.split_at(digits.len() - 6);
            let frac = frac.trim_end_matches('0');
            let expect = if frac.is_empty() { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") };
            prop_assert_eq!(p.to_string(), expect);
        }

        #[test]
        fn ceil_is_smallest_cover(p in -1_000_000_000_000i128..1_000_000_000_000i128) {
            let m = Money::from_pico_ceil(p);
            prop_assert!(i128::from(m.nanos()) * PICOS_PER_NANO >= p);
            prop_assert!(i128::from(m.nanos() - 1) * PICOS_PER_NANO < p);
        }
    }
}
