//! Proptest strategies for the core's records, shared by the tests of every crate that
//! writes them (the JSON written by hand here, the journal records in `bursar-store`).
//! Built for this crate's tests and, with the `testing` feature, for other crates' tests.

use proptest::prelude::*;

use crate::budget::BucketKey;
use crate::ledger::{HoldDetail, Tags};

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
                budget,
                value,
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
                buckets,
                tags,
                team,
                user,
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
