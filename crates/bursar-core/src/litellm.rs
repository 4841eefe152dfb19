//! Import of LiteLLM's `model_prices_and_context_window.json`.
//!
//! LiteLLM keeps prices as JSON numbers in USD per token (`1.5e-07`). Bursar reads each
//! number's text (never an `f64` value), converts it exactly to pico-dollars per token,
//! and rounds **up** to a whole pico-dollar only when the source is finer than that, so an
//! imported price is never below the source. The result is a price book in Bursar's own
//! TOML format, which then loads through [`crate::pricebook::PriceBook::from_toml`].

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use chrono::NaiveDate;
use serde::Deserialize;

/// Per-token prices as LiteLLM writes them.
#[derive(Debug, Deserialize)]
struct Entry {
    litellm_provider: Option<String>,
    mode: Option<String>,
    input_cost_per_token: Option<serde_json::Number>,
    output_cost_per_token: Option<serde_json::Number>,
    cache_read_input_token_cost: Option<serde_json::Number>,
    max_input_tokens: Option<serde_json::Value>,
    max_tokens: Option<serde_json::Value>,
    max_output_tokens: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("not LiteLLM JSON: {0}")]
    Json(String),
    #[error("no model in the file has token prices")]
    Empty,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub toml: String,
    pub models: usize,
    pub skipped: Vec<String>,
}

/// Converts a decimal number text (`0.00000015`, `1.5e-07`) in USD per token to
/// pico-dollars per token, rounding up below one pico-dollar.
pub fn per_token_to_picos(text: &str) -> Option<i64> {
    let t = text.trim().to_ascii_lowercase();
    let (mantissa, exp) = match t.split_once('e') {
        Some((m, e)) => (m.to_string(), e.parse::<i32>().ok()?),
        None => (t.clone(), 0),
    };
    if mantissa.starts_with('-') {
        return None;
    }
    let (int, frac) = mantissa.split_once('.').unwrap_or((&mantissa, ""));
    if !(int.bytes().all(|b| b.is_ascii_digit()) && frac.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let digits: String = format!("{int}{frac}");
    // value = digits × 10^(exp − len(frac)); picos = value × 10^12.
    let scale = exp - frac.len() as i32 + 12;
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Some(0);
    }
    let n: i128 = digits.parse().ok()?;
    if scale >= 0 {
        let v = n.checked_mul(10i128.checked_pow(scale as u32)?)?;
        i64::try_from(v).ok()
    } else {
        let d = 10i128.checked_pow((-scale) as u32)?;
        i64::try_from(n / d + i128::from(n % d != 0)).ok()
    }
}

fn picos_to_per_mtok(p: i64) -> String {
    // One pico-dollar per token is one micro-dollar per million tokens.
    let int = p / 1_000_000;
    let frac = p % 1_000_000;
    if frac == 0 {
        int.to_string()
    } else {
        format!("{int}.{}", format!("{frac:06}").trim_end_matches('0'))
    }
}

fn as_u32(v: &Option<serde_json::Value>) -> Option<u32> {
    v.as_ref()
        .and_then(|v| v.as_u64())
        .and_then(|n| u32::try_from(n).ok())
}

fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Converts LiteLLM's JSON into a Bursar price book effective from `effective`.
pub fn import(json: &str, effective: NaiveDate, source: &str) -> Result<Imported, ImportError> {
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| ImportError::Json(e.to_string()))?;
    // Plain ids first, so `gpt-4o` wins over `azure/gpt-4o` when both normalize alike.
    let mut names: Vec<&String> = raw.keys().collect();
    names.sort_by_key(|n| (n.contains('/'), n.len(), n.to_string()));
    let mut seen = HashSet::new();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Imported from LiteLLM's model_prices_and_context_window.json by `bursar prices import`.\n# Source: {source}\nversion = {}\n",
        toml_str(&format!("litellm-{effective}"))
    );
    let mut models = 0;
    let mut skipped = Vec::new();
    for name in names {
        if name == "sample_spec" {
            continue;
        }
        let Ok(e) = serde_json::from_value::<Entry>(raw[name].clone()) else {
            skipped.push(format!("{name}: unreadable entry"));
            continue;
        };
        let mode = e.mode.as_deref().unwrap_or("chat");
        if !matches!(mode, "chat" | "completion" | "embedding" | "responses") {
            continue;
        }
        let (Some(inp), Some(outp)) = (
            e.input_cost_per_token
                .as_ref()
                .and_then(|n| per_token_to_picos(&n.to_string())),
            e.output_cost_per_token
                .as_ref()
                .map_or(Some(0), |n| per_token_to_picos(&n.to_string())),
        ) else {
            skipped.push(format!("{name}: no token prices"));
            continue;
        };
        let cached = e
            .cache_read_input_token_cost
            .as_ref()
            .and_then(|n| per_token_to_picos(&n.to_string()))
            .unwrap_or(inp);
        let id = name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase();
        let id: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.:".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let key = id.replace(['.', '_', ':'], "-");
        if id.is_empty() || !seen.insert(key) {
            continue;
        }
        let provider = e
            .litellm_provider
            .clone()
            .unwrap_or_else(|| "unknown".into());
        let class = if mode == "embedding" {
            "embedding"
        } else if id.starts_with("o1")
            || id.starts_with("o3")
            || id.starts_with("o4")
            || id.contains("reason")
        {
            "reasoning"
        } else if outp < 2_000_000 {
            "small"
        } else if outp < 30_000_000 {
            "standard"
        } else {
            "premium"
        };
        let tokenizer = if provider == "openai"
            || provider == "azure"
            || provider == "text-completion-openai"
        {
            if id.starts_with("gpt-4-")
                || id == "gpt-4"
                || id.starts_with("gpt-3.5")
                || id.starts_with("text-embedding")
            {
                "cl100k_base"
            } else {
                "o200k_base"
            }
        } else {
            "estimate"
        };
        let context = as_u32(&e.max_input_tokens)
            .or(as_u32(&e.max_tokens))
            .unwrap_or(8192);
        let max_out = if mode == "embedding" {
            0
        } else {
            as_u32(&e.max_output_tokens)
                .or(as_u32(&e.max_tokens))
                .unwrap_or(4096)
                .max(1)
        };
        let _ = writeln!(
            out,
            "[[model]]\nid = {}\nprovider = {}\nclass = \"{class}\"\ncontext_window = {context}\nmax_output_tokens = {max_out}\ntokenizer = \"{tokenizer}\"\naliases = []\n[[model.price]]\neffective = \"{effective}\"\ninput_per_mtok = \"{}\"\noutput_per_mtok = \"{}\"\ncached_input_per_mtok = \"{}\"\nsource = {}\n",
            toml_str(&id),
            toml_str(&provider),
            picos_to_per_mtok(inp),
            picos_to_per_mtok(outp),
            picos_to_per_mtok(cached),
            toml_str(&format!("LiteLLM `{name}`, imported {effective}")),
        );
        models += 1;
    }
    if models == 0 {
        return Err(ImportError::Empty);
    }
    Ok(Imported {
        toml: out,
        models,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricebook::PriceBook;

    #[test]
    fn number_text_converts_exactly() {
        assert_eq!(per_token_to_picos("1.5e-07"), Some(150_000));
        assert_eq!(per_token_to_picos("0.00000015"), Some(150_000));
        assert_eq!(per_token_to_picos("7.5e-8"), Some(75_000));
        assert_eq!(per_token_to_picos("3E-06"), Some(3_000_000));
        assert_eq!(per_token_to_picos("0"), Some(0));
        // Finer than a pico-dollar rounds up, never down.
        assert_eq!(per_token_to_picos("1e-13"), Some(1));
        assert_eq!(per_token_to_picos("-1e-6"), None);
        assert_eq!(per_token_to_picos("abc"), None);
    }

    #[test]
    fn imports_a_litellm_file_into_a_loadable_book() {
        let json = r#"{
          "sample_spec": {"input_cost_per_token": 0},
          "gpt-4o-mini": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1.5e-07,
              "output_cost_per_token": 6e-07, "cache_read_input_token_cost": 7.5e-08,
              "max_input_tokens": 128000, "max_output_tokens": 16384},
          "azure/gpt-4o-mini": {"litellm_provider": "azure", "mode": "chat", "input_cost_per_token": 1.65e-07,
              "output_cost_per_token": 6.6e-07},
          "claude-3-5-sonnet-20241022": {"litellm_provider": "anthropic", "mode": "chat",
              "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05, "max_input_tokens": 200000, "max_output_tokens": 8192},
          "text-embedding-3-small": {"litellm_provider": "openai", "mode": "embedding", "input_cost_per_token": 2e-08, "output_cost_per_token": 0},
          "dall-e-3": {"litellm_provider": "openai", "mode": "image_generation"},
          "broken": {"mode": "chat"}
        }"#;
        let day = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        let imp = import(json, day, "test").unwrap();
        assert_eq!(imp.models, 3, "{}", imp.toml);
        let book = PriceBook::from_toml(&imp.toml).unwrap();
        let m = book.resolve("openai/gpt-4o-mini-2024-07-18").unwrap();
        assert_eq!(m.prices[0].input.to_string(), "0.15");
        assert_eq!(m.prices[0].cached_input.to_string(), "0.075");
        assert_eq!(m.tokenizer, crate::pricebook::TokenizerKind::O200kBase);
        let c = book.resolve("claude-3-5-sonnet-20241022").unwrap();
        assert_eq!(c.prices[0].output.to_string(), "15");
        assert_eq!(c.class, "standard");
        assert_eq!(
            book.resolve("text-embedding-3-small").unwrap().class,
            "embedding"
        );
        assert!(imp.skipped.iter().any(|s| s.starts_with("broken")));
        assert!(import("[1,2]", day, "x").is_err());
        assert_eq!(import("{}", day, "x"), Err(ImportError::Empty));
    }
}
