//! Proptest strategies for the core's records, shared by the tests of every crate that
//! writes them (the JSON written by hand here, the journal records in `bursar-store`).
//! Built for this crate's tests and, with the `testing` feature, for other crates' tests.

use proptest::prelude::*;

use std::sync::Arc;

use uuid::Uuid;

use crate::budget::BucketKey;
use crate::ledger::{Entry, EntryKind, HoldDetail, Tags};
use crate::pricebook::TokenUsage;
use crate::Money;

/// A hold's detail with every field drawn, its texts from `text` (callers choose how
/// hostile: escapes and control characters for JSON, any Unicode for binary records).
pub fn hold_detail<S>(text: S) -> impl Strategy<Value = HoldDetail>
where
    S: Strategy<Value = String> + Clone,
{
    let opt_text = || proptest::option::of(text.clone());
    let text_map = || proptest::collection::btree_map(text.clone(), text.clone(), 0..3);
    let buckets = proptest::collection::vec(
        (text.clone(), text.clone(), any::<i64>()).prop_map(|(budget, value, period_start)| {
            BucketKey {
                budget: budget.into(),
                value: value.into(),
                period_start,
            }
        }),
        0..5,
    );
    let tags = (
        [
            opt_text(),
            opt_text(),
            opt_text(),
            opt_text(),
            opt_text(),
            opt_text(),
        ],
        text_map(),
        text_map(),
    )
        .prop_map(
            |([workflow, campaign, agent, feature, task, end_user], custom, metadata)| Tags {
                workflow,
                campaign,
                agent,
                feature,
                task,
                end_user,
                custom,
                metadata,
            },
        );
    (
        buckets,
        tags,
        (opt_text(), opt_text(), opt_text(), opt_text()),
        any::<(i64, Option<u32>, u64, u64, u64)>(),
    )
        .prop_map(
            |(
                buckets,
                tags,
                (team, user, idempotency_key, fingerprint),
                (expires_at_ms, max_tokens, prompt_tokens, quantity, rate_tokens),
            )| HoldDetail {
                buckets: buckets.into(),
                tags,
                team: team.map(Into::into),
                user: user.map(Into::into),
                expires_at_ms,
                idempotency_key,
                fingerprint,
                max_tokens,
                prompt_tokens,
                quantity,
                rate_tokens,
            },
        )
}

/// A ledger entry with every field drawn (numbers over their whole range, of either
/// sign), its texts and its hold detail's from `text`.
pub fn entry<S>(text: S) -> impl Strategy<Value = Entry>
where
    S: Strategy<Value = String> + Clone,
{
    let opt_text = || proptest::option::of(text.clone());
    (
        (
            any::<i64>(),
            1..=6i64,
            any::<u128>(),
            text.clone(),
            any::<Option<u128>>(),
        ),
        any::<(i64, i64, i64)>(),
        (opt_text(), opt_text(), opt_text()),
        any::<(u64, u64, u64, u64, Option<u32>, u32)>(),
        proptest::option::of(hold_detail(text.clone())),
    )
        .prop_map(
            |(
                (at_ms, kind, auth, tenant, key_id),
                (held, cost, charge),
                (model_requested, model_used, price_version),
                (input_tokens, cached_input_tokens, output_tokens, quantity, latency_ms, flags),
                detail,
            )| Entry {
                at_ms,
                kind: EntryKind::from_code(kind).unwrap_or(EntryKind::Hold),
                authorization: Uuid::from_u128(auth),
                tenant: tenant.into(),
                key_id: key_id.map(Uuid::from_u128),
                held_delta: Money::from_nanos(held),
                cost_delta: Money::from_nanos(cost),
                charge_delta: Money::from_nanos(charge),
                model_requested: model_requested.map(Into::into),
                model_used: model_used.map(Into::into),
                price_version: price_version.map(Into::into),
                usage: TokenUsage {
                    input_tokens,
                    cached_input_tokens,
                    output_tokens,
                },
                quantity,
                latency_ms,
                flags,
                detail: detail.map(Arc::new),
                hold: None,
            },
        )
}
