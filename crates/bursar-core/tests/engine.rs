//! The engine's promises with plain values: no overspend on any scope, exactly once,
//! nothing lost, exact money. A sink collects entries in ledger order so each test can
//! replay them and check the invariant after every entry.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bursar_core::budget::{BucketKey, Counter};
use bursar_core::config::Config;
use bursar_core::engine::{
    AuthorizeRequest, Caller, DenyCode, Engine, FinishCode, LedgerSink, Metered, Outcome, Prompt,
    Usage, MAX_FINISHED_IN_MEMORY,
};
use bursar_core::ledger::{flags, AlertEvent, Entry, EntryKind, Replay, Tags};
use bursar_core::money::Money;
use bursar_core::pricebook::{PriceBook, TokenUsage};
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use proptest::prelude::*;

#[derive(Default)]
struct VecSink {
    entries: Mutex<Vec<Entry>>,
    alerts: Mutex<Vec<AlertEvent>>,
}

impl LedgerSink for VecSink {
    type Ticket = ();
    fn append(&self, entries: Vec<Entry>, alerts: Vec<AlertEvent>) {
        self.entries.lock().extend(entries);
        self.alerts.lock().extend(alerts);
    }
}

const CONFIG: &str = r#"
[engine]
hold_ttl_secs = 60

[[plans]]
id = "pro"
features = ["chat"]
default_task = "chat"
[plans.tasks.chat]
classes = ["small", "standard"]
default_class = "small"
max_tokens = 1000

[[tenants]]
id = "acme"
plan = "pro"
[[tenants]]
id = "shadowco"
plan = "pro"
mode = "shadow"

[[teams]]
tenant = "acme"
id = "growth"
[[users]]
tenant = "acme"
id = "ann"
team = "growth"

[[keys]]
name = "ann"
tenant = "acme"
user = "ann"
kind = "member"
secret = "bsr_test_ann_0000000000000000000"
[[keys]]
name = "shadow"
tenant = "shadowco"
kind = "member"
secret = "bsr_test_shadow_00000000000000000"

[[budgets]]
id = "acme-month"
tenant = "acme"
scope = "tenant"
window = "monthly"
limit = "LIMIT_TENANT"
[[budgets]]
id = "growth-day"
tenant = "acme"
scope = "team"
value = "growth"
window = "daily"
limit = "LIMIT_TEAM"
[[budgets]]
id = "ann-day"
tenant = "acme"
scope = "user"
window = "daily"
limit = "LIMIT_USER"
[[budgets]]
id = "campaign"
tenant = "acme"
scope = "campaign"
window = "lifetime"
limit = "LIMIT_CAMPAIGN"
[[budgets]]
id = "shadow-cap"
tenant = "shadowco"
scope = "tenant"
window = "lifetime"
limit = "0.001"
"#;

fn now() -> DateTime<Utc> {
    "2026-03-10T12:00:00Z".parse().unwrap()
}

/// An engine over a configuration text, with its catalog and budgets in force.
fn build(text: &str) -> (Engine, Config) {
    let book = Arc::new(PriceBook::builtin().unwrap());
    let config = Config::parse(text, &book, now()).unwrap();
    let engine = Engine::new(config.engine.clone(), book);
    engine.set_directory(config.directory.clone());
    for k in &config.keys {
        engine.upsert_key(k.clone());
    }
    engine.set_budgets(bursar_core::engine::BudgetSet::from_budgets(
        config.budgets.clone(),
    ));
    (engine, config)
}

/// CONFIG with limits on the tenant, team, user and campaign budgets.
fn config_text(limits: [&str; 4]) -> String {
    CONFIG
        .replace("LIMIT_TENANT", limits[0])
        .replace("LIMIT_TEAM", limits[1])
        .replace("LIMIT_USER", limits[2])
        .replace("LIMIT_CAMPAIGN", limits[3])
}

fn engine(limits: [&str; 4]) -> (Engine, Config) {
    build(&config_text(limits))
}

fn caller(e: &Engine, secret: &str) -> Caller {
    e.identify(secret, now()).unwrap()
}

fn ask(prompt_tokens: u64, max_tokens: u32, campaign: Option<&str>) -> AuthorizeRequest {
    AuthorizeRequest {
        metered: Metered::Model {
            model: "gpt-4o-mini".into(),
            prompt: Prompt::Tokens(prompt_tokens),
            max_tokens: Some(max_tokens),
        },
        tags: Tags {
            campaign: campaign.map(str::to_string),
            ..Tags::default()
        },
        idempotency_key: None,
        fingerprint: None,
        ttl: None,
    }
}

/// Replays entries in order and checks held + spent ≤ limit after each one, for every
/// bucket; returns the final counters.
fn check_never_over(
    entries: &[Entry],
    limits: &HashMap<String, Money>,
) -> HashMap<BucketKey, Counter> {
    let mut replay = Replay::default();
    for (i, e) in entries.iter().enumerate() {
        replay.apply(i as u64 + 1, e);
        for b in e.buckets() {
            let c = replay.counters[b];
            let limit = limits[&*b.budget];
            assert!(
                c.used() <= limit,
                "entry {i}: bucket {b} at {} over its limit {limit}",
                c.used()
            );
        }
    }
    assert!(replay.problems.is_empty(), "{:?}", replay.problems);
    replay.counters
}

fn limits_of(config: &Config) -> HashMap<String, Money> {
    config
        .budgets
        .iter()
        .map(|b| (b.id.clone(), b.spec.limit))
        .collect()
}

#[test]
fn exactly_n_of_many_concurrent_authorizations_fit() {
    // Each call holds 1,000 prompt tokens at $0.15/M + 100 output at $0.60/M = $0.00021.
    // The user's daily budget fits exactly 137 of them.
    let hold = Money::parse("0.00021").unwrap();
    let n = 137;
    let limit = Money::from_nanos(hold.nanos() * n);
    let (engine, config) = engine(["1000", "1000", &limit.to_string(), "1000"]);
    let engine = Arc::new(engine);
    let sink = Arc::new(VecSink::default());
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let permitted = std::sync::atomic::AtomicI64::new(0);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                for _ in 0..64 {
                    match engine.authorize(&c, ask(1000, 100, Some("spring")), now(), sink.as_ref())
                    {
                        Ok((p, ())) => {
                            assert_eq!(p.held, hold);
                            permitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(d) => assert_eq!(d.code, DenyCode::BudgetExceeded, "{d}"),
                    }
                }
            });
        }
    });
    assert_eq!(permitted.into_inner(), n);
    let entries = sink.entries.lock().clone();
    let counters = check_never_over(&entries, &limits_of(&config));
    assert_eq!(counters, engine.counters());
}

#[test]
fn a_hold_is_all_or_nothing_across_scopes() {
    // The campaign budget is the tightest; a denial leaves every other scope untouched.
    let (engine, _) = engine(["10", "10", "10", "0.0003"]);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    engine
        .authorize(&c, ask(1000, 100, Some("c1")), now(), &sink)
        .unwrap();
    let before = engine.counters();
    // Does not fit the campaign even shaped: 1000 prompt tokens alone cost $0.00015, and
    // $0.00009 is left, so the shaped output would be below the minimum.
    let d = engine
        .authorize(&c, ask(1000, 100, Some("c1")), now(), &sink)
        .unwrap_err();
    assert_eq!(d.code, DenyCode::BudgetExceeded);
    assert_eq!(engine.counters(), before);
    // Another campaign has its own counter.
    engine
        .authorize(&c, ask(1000, 100, Some("c2")), now(), &sink)
        .unwrap();
}

#[test]
fn max_tokens_is_shaped_to_the_plan_and_the_budget() {
    let sink = VecSink::default();
    // No max_tokens and ample budget: the plan's cap for the task (1,000), never the
    // model's whole output window (16,384).
    let (engine, _) = engine(["10", "10", "10", "10"]);
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let mut r = ask(100, 1, None);
    r.metered = Metered::Model {
        model: "gpt-4o-mini".into(),
        prompt: Prompt::Tokens(100),
        max_tokens: None,
    };
    let (p, ()) = engine.authorize(&c, r, now(), &sink).unwrap();
    assert_eq!(p.max_tokens, Some(1000));
    // Asking for more than the plan allows is capped to the plan.
    let (p, ()) = engine
        .authorize(&c, ask(100, 5000, None), now(), &sink)
        .unwrap();
    assert_eq!(p.max_tokens, Some(1000));
    // With $0.0003 left the call is shaped to what the budget can pay:
    // (0.0003 − 100 × 0.00000015) / 0.0000006 = 475 output tokens.
    let (engine, _) = self::engine(["10", "10", "0.0003", "10"]);
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let (p, ()) = engine
        .authorize(&c, ask(100, 5000, None), now(), &sink)
        .unwrap();
    assert_eq!(p.max_tokens, Some(475));
    assert!(p.held <= Money::parse("0.0003").unwrap());
    // Nothing useful is left: denied, not shaped to a uselessly small answer.
    let d = engine
        .authorize(&c, ask(100, 5000, None), now(), &sink)
        .unwrap_err();
    assert_eq!(d.code, DenyCode::BudgetExceeded);
}

/// Provider-reported usage without cached tokens.
fn usage_of(input_tokens: u64, output_tokens: u64) -> Usage {
    Usage {
        tokens: TokenUsage {
            input_tokens,
            cached_input_tokens: 0,
            output_tokens,
        },
        ..Usage::default()
    }
}

#[test]
fn finished_outcomes_in_memory_stay_bounded_between_sweeps() {
    let (engine, _) = engine(["1000000", "1000000", "1000000", "1000000"]);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let usage = usage_of(10, 1);
    let calls = MAX_FINISHED_IN_MEMORY + MAX_FINISHED_IN_MEMORY / 2;
    let mut first = None;
    let mut last = None;
    for i in 0..calls {
        // A millisecond apart, so the oldest are told apart; no sweep runs.
        let at = now() + chrono::Duration::milliseconds(i64::try_from(i).unwrap());
        let (p, ()) = engine.authorize(&c, ask(10, 16, None), at, &sink).unwrap();
        engine
            .settle("acme", p.authorization_id, usage.clone(), at, &sink)
            .unwrap();
        first.get_or_insert(p.authorization_id);
        last = Some(p.authorization_id);
        assert!(engine.finished_in_memory() <= MAX_FINISHED_IN_MEMORY);
    }
    assert_eq!(engine.finished_in_memory(), MAX_FINISHED_IN_MEMORY);
    let at = now() + chrono::Duration::milliseconds(i64::try_from(calls).unwrap());
    // The newest is answered from memory; the oldest is left to the ledger.
    let (again, ()) = engine
        .settle("acme", last.unwrap(), usage.clone(), at, &sink)
        .unwrap();
    assert!(again.replayed);
    let e = engine
        .settle("acme", first.unwrap(), usage, at, &sink)
        .unwrap_err();
    assert_eq!(e.code, FinishCode::AuthorizationNotFound);
}

/// A decision and its settle share the texts they record with where they come from (the
/// price book, the directory, the key, the budgets in force): none is copied per call.
#[test]
fn a_call_shares_the_texts_it_records_instead_of_copying_them() {
    let (engine, _) = engine(["1000000", "1000000", "1000000", "1000000"]);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let (p, ()) = engine
        .authorize(&c, ask(10, 16, Some("spring")), now(), &sink)
        .unwrap();
    let book = engine.price_book();
    let model = book.resolve("gpt-4o-mini").unwrap();
    let version = &model.price_at(now()).unwrap().version;
    let dir = engine.directory();
    let tenant = &dir.tenants["acme"].id;
    let budgets = engine.budgets();
    let same = |a: &Arc<str>, b: &Arc<str>, what: &str| {
        assert!(Arc::ptr_eq(a, b), "{what}: `{a}` is a copy of `{b}`");
    };

    same(p.model.as_ref().unwrap(), &model.id, "the permit's model");
    same(&p.price_version, version, "the permit's price version");
    let hold = sink.entries.lock()[0].clone();
    same(&hold.tenant, tenant, "the hold's tenant");
    same(
        hold.model_used.as_ref().unwrap(),
        &model.id,
        "the hold's model",
    );
    same(
        hold.price_version.as_ref().unwrap(),
        version,
        "the hold's price version",
    );
    let detail = hold.detail.as_ref().unwrap();
    same(
        detail.user.as_ref().unwrap(),
        c.key.user.as_ref().unwrap(),
        "the detail's user",
    );
    assert_eq!(detail.buckets.len(), 4, "tenant, team, user and campaign");
    for (bucket, view) in detail.buckets.iter().zip(&p.budgets) {
        let budget = budgets.get(&bucket.budget).unwrap();
        same(&bucket.budget, &budget.texts().id, "a bucket's budget");
        same(&view.value, &bucket.value, "a view's scope value");
    }
    let by_id = |id: &str| detail.buckets.iter().find(|b| &*b.budget == id).unwrap();
    same(
        &by_id("acme-month").value,
        tenant,
        "the tenant bucket's value",
    );
    same(
        &by_id("ann-day").value,
        c.key.user.as_ref().unwrap(),
        "the user bucket's value",
    );
    let team = dir.users.values().find(|u| u.id == "ann").unwrap();
    same(
        &by_id("growth-day").value,
        team.team.as_ref().unwrap(),
        "the team bucket's value",
    );

    let (s, ()) = engine
        .settle("acme", p.authorization_id, usage_of(10, 4), now(), &sink)
        .unwrap();
    same(&s.price_version, version, "the settlement's price version");
    same(
        s.model_used.as_ref().unwrap(),
        &model.id,
        "the settlement's model",
    );
    let settle = sink.entries.lock()[1].clone();
    assert_eq!(settle.kind, EntryKind::Settle);
    same(&settle.tenant, tenant, "the settle's tenant");
    same(
        settle.price_version.as_ref().unwrap(),
        version,
        "the settle's price version",
    );
    assert!(
        Arc::ptr_eq(settle.hold.as_ref().unwrap(), detail),
        "the settle names its hold's detail"
    );
}

#[test]
fn counters_of_ended_periods_leave_memory_and_current_ones_stay() {
    let (engine, _) = engine(["10", "10", "10", "10"]);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let usage = usage_of(1_000, 100);
    let day = chrono::Duration::days(1);
    // Day 0: one call settled, one left open; day 1: one call settled.
    let (a, ()) = engine
        .authorize(&c, ask(1_000, 100, Some("launch")), now(), &sink)
        .unwrap();
    engine
        .settle("acme", a.authorization_id, usage.clone(), now(), &sink)
        .unwrap();
    let (open, ()) = engine
        .authorize(&c, ask(1_000, 100, None), now(), &sink)
        .unwrap();
    let (b, ()) = engine
        .authorize(&c, ask(1_000, 100, None), now() + day, &sink)
        .unwrap();
    engine
        .settle(
            "acme",
            b.authorization_id,
            usage.clone(),
            now() + day,
            &sink,
        )
        .unwrap();
    // Monthly (March), lifetime campaign, team and user days 0 and 1.
    assert_eq!(engine.counters_in_memory(), 6);
    let month = |at| {
        engine
            .standing_for(&c, &Tags::default(), at)
            .into_iter()
            .find(|v| &*v.budget_id == "acme-month")
            .unwrap()
    };
    let later = now() + day * 10;
    let before = month(later);

    // Ten days on: day 1's counters go; day 0's stay while the open hold is on them;
    // the month and the lifetime campaign stay.
    assert_eq!(engine.prune_counters(later), 2);
    assert_eq!(engine.counters_in_memory(), 4);
    // At most once a minute.
    engine
        .void("acme", open.authorization_id, None, later, &sink)
        .unwrap();
    assert_eq!(engine.prune_counters(later), 0);
    assert_eq!(
        engine.prune_counters(later + chrono::Duration::seconds(61)),
        2
    );
    assert_eq!(engine.counters_in_memory(), 2);
    // The month still counts everything spent in it, held money released.
    let after = month(later);
    assert_eq!(after.spent, before.spent);
    assert_eq!(after.held, Money::ZERO);
    assert_eq!(after.remaining, before.remaining + before.held);
    assert!(after.spent > Money::ZERO);
}

#[test]
fn settle_is_exactly_once_and_releases_the_rest() {
    let (engine, config) = engine(["10", "10", "10", "10"]);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let (p, ()) = engine
        .authorize(&c, ask(1000, 100, None), now(), &sink)
        .unwrap();
    let usage = Usage {
        tokens: TokenUsage {
            input_tokens: 1000,
            cached_input_tokens: 0,
            output_tokens: 40,
        },
        ..Usage::default()
    };
    let (s1, ()) = engine
        .settle("acme", p.authorization_id, usage.clone(), now(), &sink)
        .unwrap();
    assert_eq!(s1.cost, Money::parse("0.000174").unwrap());
    let (s2, ()) = engine
        .settle("acme", p.authorization_id, usage.clone(), now(), &sink)
        .unwrap();
    assert!(s2.replayed);
    assert_eq!(s2.cost, s1.cost);
    let mut other = usage;
    other.tokens.output_tokens = 41;
    let e = engine
        .settle("acme", p.authorization_id, other, now(), &sink)
        .unwrap_err();
    assert_eq!(e.code, FinishCode::AuthorizationAlreadySettled);
    let e = engine
        .void("acme", p.authorization_id, None, now(), &sink)
        .unwrap_err();
    assert_eq!(e.code, FinishCode::AuthorizationAlreadySettled);
    // Another tenant cannot see it.
    let e = engine
        .void("shadowco", p.authorization_id, None, now(), &sink)
        .unwrap_err();
    assert_eq!(e.code, FinishCode::AuthorizationNotFound);
    let entries = sink.entries.lock().clone();
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.kind == EntryKind::Settle)
            .count(),
        1
    );
    let counters = check_never_over(&entries, &limits_of(&config));
    assert!(counters
        .values()
        .all(|c| c.held == Money::ZERO && c.spent == s1.cost));
}

#[test]
fn expired_holds_are_charged_and_a_late_settle_is_reconciled_once() {
    let (engine, _) = engine(["10", "10", "10", "10"]);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let (p, ()) = engine
        .authorize(&c, ask(1000, 100, None), now(), &sink)
        .unwrap();
    let (n, _) = engine.expire_due(now() + chrono::Duration::seconds(59), &sink);
    assert_eq!(n, 0);
    let later = now() + chrono::Duration::seconds(61);
    let (n, _) = engine.expire_due(later, &sink);
    assert_eq!(n, 1);
    assert_eq!(engine.open_holds(), 0);
    let spent: Money = engine.counters().values().map(|c| c.spent).max().unwrap();
    assert_eq!(
        spent, p.held,
        "an expired hold is charged in full by default"
    );
    let usage = Usage {
        tokens: TokenUsage {
            input_tokens: 1000,
            cached_input_tokens: 0,
            output_tokens: 10,
        },
        ..Usage::default()
    };
    // The first late settle records the true cost against the expiry charge...
    let (late, ()) = engine
        .settle("acme", p.authorization_id, usage.clone(), later, &sink)
        .unwrap();
    assert_eq!(late.outcome, Outcome::Expired);
    // ...and only the first.
    let e = engine
        .settle("acme", p.authorization_id, usage, later, &sink)
        .unwrap_err();
    assert_eq!(e.code, FinishCode::AuthorizationExpired);
    let entries = sink.entries.lock().clone();
    let adjustments: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Adjustment)
        .collect();
    assert_eq!(adjustments.len(), 1, "reconciled once");
    assert!(adjustments[0].flags & flags::RECONCILED != 0);
    // Real cost 1000 × 0.15 + 10 × 0.60 per M = $0.000156.
    let spent: Money = engine.counters().values().map(|c| c.spent).max().unwrap();
    assert_eq!(spent, Money::parse("0.000156").unwrap());
}

#[test]
fn usage_above_the_hold_is_an_overage_never_refused() {
    let (engine, _) = engine(["10", "10", "10", "10"]);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let (p, ()) = engine
        .authorize(&c, ask(10, 10, None), now(), &sink)
        .unwrap();
    let usage = Usage {
        tokens: TokenUsage {
            input_tokens: 5000,
            cached_input_tokens: 0,
            output_tokens: 5000,
        },
        ..Usage::default()
    };
    let (s, ()) = engine
        .settle("acme", p.authorization_id, usage, now(), &sink)
        .unwrap();
    assert!(s.overage > Money::ZERO);
    assert_eq!(s.cost, s.released + s.overage);
    assert!(sink.entries.lock().last().unwrap().flags & flags::OVERAGE != 0);
    assert!(sink.alerts.lock().iter().any(|a| a.reason == "overage"));
}

#[test]
fn drift_is_priced_as_the_model_used() {
    let (engine, _) = engine(["10", "10", "10", "10"]);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let (p, ()) = engine
        .authorize(&c, ask(1000, 100, None), now(), &sink)
        .unwrap();
    let usage = Usage {
        tokens: TokenUsage {
            input_tokens: 1000,
            cached_input_tokens: 0,
            output_tokens: 100,
        },
        model_used: Some("openai/gpt-4o-2024-08-06".into()),
        ..Usage::default()
    };
    let (s, ()) = engine
        .settle("acme", p.authorization_id, usage, now(), &sink)
        .unwrap();
    assert!(s.drift);
    assert_eq!(s.model_used.as_deref(), Some("gpt-4o"));
    assert!(s.price_version.starts_with("gpt-4o@"));
    assert!(s.cost > p.held);
}

#[test]
fn shadow_mode_records_would_be_denials_and_permits() {
    let (engine, _) = engine(["10", "10", "10", "10"]);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_shadow_00000000000000000");
    let (p, ()) = engine
        .authorize(&c, ask(100_000, 1000, None), now(), &sink)
        .unwrap();
    assert_eq!(p.shadow_denial, Some(DenyCode::BudgetExceeded));
    assert_eq!(p.max_tokens, Some(1000), "shadow mode does not shape");
    let mut wrong_class = ask(10, 10, None);
    wrong_class.metered = Metered::Model {
        model: "o3".into(),
        prompt: Prompt::Tokens(10),
        max_tokens: Some(10),
    };
    let (p2, ()) = engine.authorize(&c, wrong_class, now(), &sink).unwrap();
    assert_eq!(p2.shadow_denial, Some(DenyCode::ModelClassNotAllowed));
    let entries = sink.entries.lock();
    assert!(entries.iter().all(|e| e.flags & flags::SHADOW_DENIED != 0));
}

#[test]
fn idempotent_authorize_returns_the_first_permit() {
    let (engine, _) = engine(["10", "10", "10", "10"]);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let mut r = ask(100, 10, None);
    r.idempotency_key = Some("k1".into());
    r.fingerprint = Some("f1".into());
    let (p1, ()) = engine.authorize(&c, r.clone(), now(), &sink).unwrap();
    let (p2, ()) = engine.authorize(&c, r.clone(), now(), &sink).unwrap();
    assert_eq!(p1.authorization_id, p2.authorization_id);
    assert!(p2.replayed);
    r.fingerprint = Some("f2".into());
    assert_eq!(
        engine.authorize(&c, r, now(), &sink).unwrap_err().code,
        DenyCode::IdempotencyKeyReused
    );
    assert_eq!(sink.entries.lock().len(), 1);
}

#[test]
fn recovery_rebuilds_the_same_state() {
    let (engine, config) = engine(["10", "10", "10", "10"]);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let mut open = None;
    for i in 0..20u64 {
        let (p, ()) = engine
            .authorize(&c, ask(100 + i, 50, Some("r")), now(), &sink)
            .unwrap();
        match i % 3 {
            0 => {
                let u = Usage {
                    tokens: TokenUsage {
                        input_tokens: 100 + i,
                        cached_input_tokens: 0,
                        output_tokens: i,
                    },
                    ..Usage::default()
                };
                engine
                    .settle("acme", p.authorization_id, u, now(), &sink)
                    .unwrap();
            }
            1 => {
                engine
                    .void("acme", p.authorization_id, None, now(), &sink)
                    .unwrap();
            }
            _ => open = Some(p.authorization_id),
        }
    }
    let entries = sink.entries.lock().clone();
    let (fresh, _) = self::engine(["10", "10", "10", "10"]);
    fresh.recover(entries.iter());
    assert_eq!(fresh.counters(), engine.counters());
    assert_eq!(fresh.open_holds(), engine.open_holds());
    // A recovered open hold can be settled; a recovered settled one replays.
    let open = open.unwrap();
    fresh.void("acme", open, None, now(), &sink).unwrap();
    let _ = config;
}

#[test]
fn rolling_windows_forget_old_spend() {
    let engine = engine_with(
        "\n[[budgets]]\nid = \"roll\"\ntenant = \"acme\"\nscope = \"tenant\"\nwindow = \"rolling:1h\"\nlimit = \"0.0005\"\n",
    );
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let (p, ()) = engine
        .authorize(&c, ask(1000, 100, None), now(), &sink)
        .unwrap();
    let full = Usage {
        tokens: TokenUsage {
            input_tokens: 1000,
            cached_input_tokens: 0,
            output_tokens: 100,
        },
        ..Usage::default()
    };
    engine
        .settle("acme", p.authorization_id, full.clone(), now(), &sink)
        .unwrap();
    engine
        .authorize(&c, ask(1000, 100, None), now(), &sink)
        .unwrap();
    // $0.00042 of $0.0005 used: a third call is shaped to what is left, a big one denied.
    let d = engine
        .authorize(
            &c,
            ask(1000, 100, None),
            now() + chrono::Duration::minutes(30),
            &sink,
        )
        .unwrap_err();
    assert_eq!(d.code, DenyCode::BudgetExceeded);
    // An hour later the first calls have rolled out of the window.
    engine
        .authorize(
            &c,
            ask(1000, 100, None),
            now() + chrono::Duration::minutes(62),
            &sink,
        )
        .unwrap();
}

#[test]
fn rate_limits_say_when_to_retry() {
    let (engine, _) = build(&config_text(["10", "10", "10", "10"]).replace(
        "max_tokens = 1000\n",
        "max_tokens = 1000\n[plans.rate_limits.member]\nrequests_per_minute = 5\ntokens_per_minute = 3000\n",
    ));
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    for _ in 0..5 {
        engine
            .authorize(&c, ask(10, 10, None), now(), &sink)
            .unwrap();
    }
    let d = engine
        .authorize(&c, ask(10, 10, None), now(), &sink)
        .unwrap_err();
    assert_eq!(d.code, DenyCode::RateLimited);
    assert_eq!(d.retry_after, Some(Duration::from_secs(12)));
    let d = engine
        .authorize(
            &c,
            ask(3000, 10, None),
            now() + chrono::Duration::minutes(5),
            &sink,
        )
        .unwrap_err();
    assert_eq!(d.code, DenyCode::ExceedsRateLimitCapacity);
}

#[test]
fn shared_limits_count_a_users_keys_the_tenant_and_each_model_together() {
    let limits = "max_tokens = 1000
[[plans.limits]]
per = \"user\"
requests_per_minute = 3
[[plans.limits]]
per = \"tenant\"
requests_per_minute = 5
[[plans.limits]]
per = \"model\"
model = \"gpt-4o\"
requests_per_minute = 1
";
    let text = config_text(["10", "10", "10", "10"]).replacen("max_tokens = 1000\n", limits, 1)
        + "\n[[keys]]\nname = \"ann 2\"\ntenant = \"acme\"\nuser = \"ann\"\nkind = \"member\"\nsecret = \"bsr_test_ann_second_key_000000000\"\n"
        + "[[keys]]\nname = \"service\"\ntenant = \"acme\"\nkind = \"member\"\nsecret = \"bsr_test_service_key_000000000000\"\n";
    let (engine, _) = build(&text);
    let sink = VecSink::default();
    let ann1 = caller(&engine, "bsr_test_ann_0000000000000000000");
    let ann2 = caller(&engine, "bsr_test_ann_second_key_000000000");
    let service = caller(&engine, "bsr_test_service_key_000000000000");
    // Ann's two keys share her 3 a minute.
    for c in [&ann1, &ann2, &ann1] {
        engine
            .authorize(c, ask(10, 10, None), now(), &sink)
            .unwrap();
    }
    let d = engine
        .authorize(&ann2, ask(10, 10, None), now(), &sink)
        .unwrap_err();
    assert_eq!(d.code, DenyCode::RateLimited);
    assert!(d.message.contains("user `ann`"), "{}", d.message);
    // A key without a user is its own; the tenant's 5 a minute covers everyone.
    engine
        .authorize(&service, ask(10, 10, None), now(), &sink)
        .unwrap();
    let mut gpt4o = ask(10, 10, None);
    gpt4o.metered = Metered::Model {
        model: "gpt-4o".into(),
        prompt: Prompt::Tokens(10),
        max_tokens: Some(10),
    };
    let (p, ()) = engine
        .authorize(&service, gpt4o.clone(), now(), &sink)
        .unwrap();
    let per: Vec<&str> = p.rate_limits.iter().map(|r| r.per.as_ref()).collect();
    // The user limit falls back to the key for a key without a user.
    assert_eq!(per, vec!["key", "tenant", "model"]);
    assert_eq!(p.rate_limits[1].remaining, 0, "the tenant's 5 are used");
    let d = engine
        .authorize(&service, ask(10, 10, None), now(), &sink)
        .unwrap_err();
    assert!(d.message.contains("tenant `acme`"), "{}", d.message);
    // A minute later the tenant has room again, but gpt-4o only once a minute.
    let later = now() + chrono::Duration::seconds(60);
    engine
        .authorize(&service, gpt4o.clone(), later, &sink)
        .unwrap();
    let d = engine.authorize(&service, gpt4o, later, &sink).unwrap_err();
    assert!(d.message.contains("model `gpt-4o`"), "{}", d.message);
    engine
        .authorize(&service, ask(10, 10, None), later, &sink)
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random limits on four nested scopes and a random mix of authorize, settle, void
    /// and expiry: no bucket ever exceeds its limit, and the counters always equal a
    /// replay of the ledger.
    #[test]
    fn no_scope_is_ever_overspent(
        limits in proptest::array::uniform4(1u32..2_000),
        ops in proptest::collection::vec((0u8..4, 1u64..5_000, 1u32..2_000, 0u8..3), 1..120),
    ) {
        let limits: Vec<String> = limits.iter().map(|l| Money::from_nanos(i64::from(*l) * 1_000).to_string()).collect();
        let (engine, config) = engine([&limits[0], &limits[1], &limits[2], &limits[3]]);
        let sink = VecSink::default();
        let c = caller(&engine, "bsr_test_ann_0000000000000000000");
        let mut open: Vec<(uuid::Uuid, u64, u32)> = Vec::new();
        let mut t = now();
        for (op, prompt, max_out, campaign) in ops {
            match op {
                0 | 1 => {
                    let camp = ["a", "b", "c"][campaign as usize];
                    if let Ok((p, ())) = engine.authorize(&c, ask(prompt, max_out, Some(camp)), t, &sink) {
                        open.push((p.authorization_id, p.prompt_tokens, p.max_tokens.unwrap_or(0)));
                    }
                }
                2 => if let Some((id, pt, mt)) = open.pop() {
                    let u = Usage { tokens: TokenUsage { input_tokens: pt, cached_input_tokens: pt / 3, output_tokens: u64::from(mt) / 2 }, ..Usage::default() };
                    let (s, ()) = engine.settle("acme", id, u, t, &sink).unwrap();
                    prop_assert_eq!(s.overage, Money::ZERO);
                    prop_assert_eq!(s.outcome, Outcome::Settled);
                },
                _ => {
                    if let Some((id, _, _)) = open.first().copied() {
                        engine.void("acme", id, None, t, &sink).unwrap();
                        open.remove(0);
                    } else {
                        t += chrono::Duration::seconds(61);
                        engine.expire_due(t, &sink);
                    }
                }
            }
        }
        let entries = sink.entries.lock().clone();
        let counters = check_never_over(&entries, &limits_of(&config));
        prop_assert_eq!(counters, engine.counters());
    }

    /// The cost of a call is the same exact amount whatever spelling of the model id the
    /// caller and the provider use, and equals the sum of its ledger entries.
    #[test]
    fn cost_is_exact_across_spellings(
        input in 0u64..2_000_000,
        cached_share in 0u64..=100,
        output in 0u64..100_000,
        spelling in 0usize..6,
    ) {
        let spellings = ["gpt-4o-mini", "openai/gpt-4o-mini", "GPT-4o-Mini", "gpt-4o-mini-2024-07-18", "openrouter/openai/gpt-4o-mini", "gpt-4o-mini-latest"];
        let (engine, _) = engine(["1000000", "1000000", "1000000", "1000000"]);
        let sink = VecSink::default();
        let c = caller(&engine, "bsr_test_ann_0000000000000000000");
        let mut r = ask(10, 10, None);
        r.metered = Metered::Model { model: spellings[spelling].into(), prompt: Prompt::Tokens(10), max_tokens: Some(10) };
        let (p, ()) = engine.authorize(&c, r, now(), &sink).unwrap();
        prop_assert_eq!(p.model.as_deref(), Some("gpt-4o-mini"));
        let usage = TokenUsage { input_tokens: input, cached_input_tokens: input * cached_share / 100, output_tokens: output };
        let u = Usage { tokens: usage, model_used: Some(spellings[(spelling + 1) % 6].into()), ..Usage::default() };
        let (s, ()) = engine.settle("acme", p.authorization_id, u, now(), &sink).unwrap();
        prop_assert!(!s.drift);
        let book = PriceBook::builtin().unwrap();
        let price = book.resolve("gpt-4o-mini").unwrap().price_at(now()).unwrap().clone();
        prop_assert_eq!(s.cost, price.cost(&usage));
        // Exact: the pico-dollar total rounded up once.
        let pico = i128::from(usage.input_tokens - usage.cached_input_tokens) * 150_000
            + i128::from(usage.cached_input_tokens) * 75_000
            + i128::from(usage.output_tokens) * 600_000;
        prop_assert_eq!(i128::from(s.cost.nanos()), (pico + 999) / 1000);
        let entries = sink.entries.lock();
        let total: Money = entries.iter().map(|e| e.cost_delta).sum();
        prop_assert_eq!(total, s.cost);
        let held: Money = entries.iter().map(|e| e.held_delta).sum();
        prop_assert_eq!(held, Money::ZERO);
    }
}

fn engine_with(extra: &str) -> Engine {
    build(&(config_text(["10", "10", "10", "10"]) + extra)).0
}

#[test]
fn unused_budget_rolls_over_to_the_next_period() {
    let engine = engine_with(
        "\n[[budgets]]\nid = \"daily-roll\"\ntenant = \"acme\"\nscope = \"tenant\"\nwindow = \"daily\"\nlimit = \"0.0003\"\nrollover = true\n",
    );
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    // Day 1: spend $0.000156 of $0.0003.
    let (p, ()) = engine
        .authorize(&c, ask(1000, 100, None), now(), &sink)
        .unwrap();
    let u = Usage {
        tokens: TokenUsage {
            input_tokens: 1000,
            cached_input_tokens: 0,
            output_tokens: 10,
        },
        ..Usage::default()
    };
    engine
        .settle("acme", p.authorization_id, u, now(), &sink)
        .unwrap();
    // Day 2: the limit is $0.0003 + the $0.000144 left over.
    let tomorrow = now() + chrono::Duration::days(1);
    let (p, ()) = engine
        .authorize(&c, ask(1000, 100, None), tomorrow, &sink)
        .unwrap();
    let view = p
        .budgets
        .iter()
        .find(|b| &*b.budget_id == "daily-roll")
        .unwrap();
    assert_eq!(view.limit, Money::parse("0.000444").unwrap());
    // Without rollover the same second call would not have fitted whole ($0.00021 hold).
    let (p2, ()) = engine
        .authorize(&c, ask(1000, 100, None), tomorrow, &sink)
        .unwrap();
    assert_eq!(p2.max_tokens, Some(100));
}

#[test]
fn emergency_thresholds_block_or_downgrade() {
    let engine = engine_with(
        "\n[[budgets]]\nid = \"guard\"\ntenant = \"acme\"\nscope = \"tenant\"\nwindow = \"lifetime\"\nlimit = \"0.01\"\nwarn_percent = 40\nemergency_percent = 50\nemergency_action = \"downgrade\"\n",
    );
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let big = |model: &str| AuthorizeRequest {
        metered: Metered::Model {
            model: model.into(),
            prompt: Prompt::Tokens(1000),
            max_tokens: Some(100),
        },
        ..ask(0, 0, None)
    };
    // Below 50 %: the model asked for.
    let (p, ()) = engine.authorize(&c, big("gpt-4o"), now(), &sink).unwrap();
    assert_eq!(p.model.as_deref(), Some("gpt-4o"));
    assert!(p.downgraded_from.is_none());
    // Spend past 50 % of $0.01.
    let u = Usage {
        tokens: TokenUsage {
            input_tokens: 2000,
            cached_input_tokens: 0,
            output_tokens: 100,
        },
        ..Usage::default()
    };
    engine
        .settle("acme", p.authorization_id, u, now(), &sink)
        .unwrap();
    // In emergency: moved to the cheapest model of an allowed class, priced as such.
    let (p, ()) = engine.authorize(&c, big("gpt-4o"), now(), &sink).unwrap();
    assert_eq!(p.downgraded_from.as_deref(), Some("gpt-4o"));
    assert_ne!(p.model.as_deref(), Some("gpt-4o"));
    assert!(p.price_version.starts_with(p.model.as_deref().unwrap()));
    assert!(sink.entries.lock().last().unwrap().flags & flags::DOWNGRADED != 0);

    // With `block`, nothing is permitted from the emergency threshold on.
    let engine = engine_with(
        "\n[[budgets]]\nid = \"guard\"\ntenant = \"acme\"\nscope = \"tenant\"\nwindow = \"lifetime\"\nlimit = \"0.001\"\nwarn_percent = 40\nemergency_percent = 50\nemergency_action = \"block\"\n",
    );
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    // $0.0005 usable: a $0.00021 hold fits twice, the third is shaped, then denied.
    engine
        .authorize(&c, ask(1000, 100, None), now(), &sink)
        .unwrap();
    engine
        .authorize(&c, ask(1000, 100, None), now(), &sink)
        .unwrap();
    let (p, ()) = engine
        .authorize(&c, ask(100, 100, None), now(), &sink)
        .unwrap();
    assert!(p.held <= Money::parse("0.00008").unwrap());
    let d = engine
        .authorize(&c, ask(1000, 100, None), now(), &sink)
        .unwrap_err();
    assert_eq!(d.code, DenyCode::BudgetExceeded);
}

#[test]
fn mode_off_checks_nothing_but_records_spend() {
    let engine = engine_with("");
    let mut dir = engine.directory().as_ref().clone();
    dir.tenants.get_mut("acme").unwrap().mode = bursar_core::catalog::EnforcementMode::Off;
    engine.set_directory(dir);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let mut r = ask(10, 10, None);
    r.metered = Metered::Model {
        model: "o3".into(),
        prompt: Prompt::Tokens(10),
        max_tokens: Some(10),
    };
    let (p, ()) = engine.authorize(&c, r, now(), &sink).unwrap();
    assert_eq!(p.shadow_denial, None);
    assert_eq!(sink.entries.lock().len(), 1);
}

#[test]
fn a_shared_instance_decides_within_its_leases_and_asks_before_anything_changes() {
    let (engine, _) = engine(["1000", "1000", "1000", "1000"]);
    engine.share_budgets();
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let hold = Money::parse("0.00021").unwrap();
    let half = Money::from_nanos(hold.nanos() / 2);

    // No lease yet: every budget the call touches is asked for, the whole worst case,
    // and nothing is held or written.
    let d = engine
        .authorize(&c, ask(1000, 100, Some("spring")), now(), &sink)
        .unwrap_err();
    assert_eq!(d.code, DenyCode::LeaseNeeded);
    assert_eq!(d.leases.len(), 4, "tenant, team, user and campaign");
    assert!(d
        .leases
        .iter()
        .all(|w| w.shortfall == hold && w.percent == 100));
    assert!(sink.entries.lock().is_empty());
    assert_eq!(engine.open_holds(), 0);

    // A lease of one and a half calls: one fits whole; the next asks for the rest.
    for w in &d.leases {
        engine.add_lease(&w.bucket, hold + half);
    }
    let (p, ()) = engine
        .authorize(&c, ask(1000, 100, Some("spring")), now(), &sink)
        .unwrap();
    assert_eq!((p.held, p.max_tokens), (hold, Some(100)));
    let d = engine
        .authorize(&c, ask(1000, 100, Some("spring")), now(), &sink)
        .unwrap_err();
    assert_eq!(d.code, DenyCode::LeaseNeeded);
    assert!(d.leases.iter().all(|w| w.shortfall == hold - half));
    // Decided within what it has, half a call does not even pay the prompt: denied.
    let d = engine
        .authorize_within(&c, ask(1000, 100, Some("spring")), now(), &sink, false)
        .unwrap_err();
    assert_eq!(d.code, DenyCode::BudgetExceeded);

    // The unused half goes back; a settle below the hold frees room to give back too.
    let spare = engine.take_spare_leases(None);
    assert_eq!(spare.len(), 4);
    assert!(spare.iter().all(|(_, m)| *m == half));
    assert!(engine.take_spare_leases(None).is_empty(), "given back once");
    let usage = Usage {
        tokens: TokenUsage {
            input_tokens: 1000,
            cached_input_tokens: 0,
            output_tokens: 0,
        },
        ..Usage::default()
    };
    let (s, ()) = engine
        .settle("acme", p.authorization_id, usage, now(), &sink)
        .unwrap();
    let freed = hold - s.cost;
    let spare = engine.take_spare_leases(None);
    assert!(spare.iter().all(|(_, m)| *m == freed), "{spare:?}");
}

/// Every budget scope holds the calls it covers to its limit, each value on a counter of
/// its own: a budget that fits exactly one call denies a second call with the same value,
/// naming itself, and lets a call with another value (or without the feature tag, or
/// through another key) through. The global budget covers every call.
#[test]
fn every_budget_scope_limits_the_calls_it_covers_and_only_those() {
    type Tag = fn(&mut Tags);
    // (scope, the budget's own value, the tags of the covered calls, what else: another
    // value's tags, or None for another key of the tenant).
    let cases: [(&str, Option<&str>, Tag, Option<Tag>); 8] = [
        (
            "global",
            None,
            |_| {},
            Some(|t| t.end_user = Some("u9".into())),
        ),
        ("api_key", None, |_| {}, None),
        (
            "end_user",
            None,
            |t| t.end_user = Some("u1".into()),
            Some(|t| t.end_user = Some("u2".into())),
        ),
        (
            "workflow",
            None,
            |t| t.workflow = Some("run-1".into()),
            Some(|t| t.workflow = Some("run-2".into())),
        ),
        (
            "agent",
            None,
            |t| t.agent = Some("CONTENT".into()),
            Some(|t| t.agent = Some("SEO".into())),
        ),
        (
            "feature",
            Some("chat"),
            |t| t.feature = Some("chat".into()),
            Some(|_| {}),
        ),
        // A call without a task tag is of the plan's default task, `chat`.
        (
            "task",
            Some("chat"),
            |_| {},
            Some(|t| t.task = Some("summarize".into())),
        ),
        (
            "tag:env",
            None,
            |t| {
                t.custom.insert("env".into(), "prod".into());
            },
            Some(|t| {
                t.custom.insert("env".into(), "dev".into());
            }),
        ),
    ];
    let bob = "bsr_test_bob_0000000000000000000";
    for (scope, value, covered, other) in cases {
        let tenant = if scope == "global" {
            ""
        } else {
            "tenant = \"acme\"\n"
        };
        let value = value.map_or(String::new(), |v| format!("value = \"{v}\"\n"));
        // The plan gains a second task.
        let text = config_text(["10", "10", "10", "10"]).replacen(
            "max_tokens = 1000\n",
            "max_tokens = 1000\n[plans.tasks.summarize]\nclasses = [\"small\"]\ndefault_class = \"small\"\nmax_tokens = 1000\n",
            1,
        );
        let (engine, _) = build(&format!(
            "{text}\n[[keys]]\nname = \"bob\"\ntenant = \"acme\"\nkind = \"member\"\nsecret = \"{bob}\"\n\
             \n[[budgets]]\nid = \"under-test\"\n{tenant}scope = \"{scope}\"\n{value}window = \"daily\"\nlimit = \"0.00021\"\n"
        ));
        let sink = VecSink::default();
        let ann = caller(&engine, "bsr_test_ann_0000000000000000000");
        let call = |tags: Tag| {
            let mut r = ask(1000, 100, None);
            tags(&mut r.tags);
            r
        };
        // $0.00021: the first call takes the whole budget.
        let (p, ()) = engine
            .authorize(&ann, call(covered), now(), &sink)
            .unwrap_or_else(|d| panic!("{scope}: {d}"));
        let view = p.budgets.iter().find(|b| &*b.budget_id == "under-test");
        let view = view.unwrap_or_else(|| panic!("{scope}: not applied: {:?}", p.budgets));
        assert_eq!(&*view.scope, scope);
        assert_eq!(view.remaining, Money::ZERO, "{scope}");
        let d = engine
            .authorize(&ann, call(covered), now(), &sink)
            .unwrap_err();
        assert_eq!(d.code, DenyCode::BudgetExceeded, "{scope}: {d}");
        assert!(d.message.contains("`under-test`"), "{scope}: {d}");
        let elsewhere = match other {
            Some(tags) => engine.authorize(&ann, call(tags), now(), &sink),
            None => engine.authorize(&caller(&engine, bob), call(covered), now(), &sink),
        };
        if scope == "global" {
            assert_eq!(elsewhere.unwrap_err().code, DenyCode::BudgetExceeded);
        } else {
            elsewhere.unwrap_or_else(|d| panic!("{scope}: another value is not limited: {d}"));
        }
    }
}

#[test]
fn under_the_release_policy_an_expired_hold_costs_nothing_until_a_late_settle() {
    let text = config_text(["10", "10", "10", "10"]).replacen(
        "hold_ttl_secs = 60\n",
        "hold_ttl_secs = 60\nexpiry_policy = \"release\"\n",
        1,
    );
    let (engine, config) = build(&text);
    let sink = VecSink::default();
    let c = caller(&engine, "bsr_test_ann_0000000000000000000");
    let (p, ()) = engine
        .authorize(&c, ask(1000, 100, None), now(), &sink)
        .unwrap();
    let later = now() + chrono::Duration::seconds(61);
    assert_eq!(engine.expire_due(later, &sink).0, 1);
    assert_eq!(engine.open_holds(), 0);
    let expire = sink.entries.lock().last().cloned().unwrap();
    assert_eq!(expire.kind, EntryKind::Expire);
    assert_eq!(expire.cost_delta, Money::ZERO, "released, not charged");
    assert_eq!(expire.held_delta, -p.held);
    for c in engine.counters().values() {
        assert_eq!((c.held, c.spent), (Money::ZERO, Money::ZERO));
    }
    // A settle that comes late records what the call cost, once.
    let usage = usage_of(1000, 10);
    let (late, ()) = engine
        .settle("acme", p.authorization_id, usage.clone(), later, &sink)
        .unwrap();
    assert_eq!(late.outcome, Outcome::Expired);
    let spent: Money = engine.counters().values().map(|c| c.spent).max().unwrap();
    assert_eq!(spent, Money::parse("0.000156").unwrap());
    let entries = sink.entries.lock().clone();
    check_never_over(&entries, &limits_of(&config));
}

#[test]
fn a_key_is_refused_from_its_expiry_on() {
    let engine = engine_with(
        "\n[[keys]]\nname = \"temp\"\ntenant = \"acme\"\nkind = \"member\"\nsecret = \"bsr_test_temp_000000000000000000\"\nexpires_at = \"2026-03-10T13:00:00Z\"\n",
    );
    let secret = "bsr_test_temp_000000000000000000";
    let before = "2026-03-10T12:59:59Z".parse().unwrap();
    assert!(engine.identify(secret, before).is_ok());
    for at in ["2026-03-10T13:00:00Z", "2026-04-01T00:00:00Z"] {
        let d = engine.identify(secret, at.parse().unwrap()).unwrap_err();
        assert_eq!(d.code, DenyCode::ApiKeyExpired, "{at}");
        assert_eq!(d.code.as_str(), "api_key_expired");
    }
    // Keys without an expiry are unaffected.
    let far = "2030-01-01T00:00:00Z".parse().unwrap();
    assert!(engine
        .identify("bsr_test_ann_0000000000000000000", far)
        .is_ok());
}

/// One budget of a random hierarchy: its scope (an index into `PROP_SCOPES`), whether it
/// names one value (else every value has its own counter), its tenant, its window and
/// its limit in µ$.
type PropBudget = (usize, bool, usize, bool, u32);
const PROP_SCOPES: [&str; 8] = [
    "global", "tenant", "team", "user", "api_key", "campaign", "tag:env", "workflow",
];

/// The configuration of a random hierarchy: `tenants` tenants of `teams` teams of
/// `users` users, a key per user and one per tenant without a user, and `budgets`.
fn hierarchy(
    tenants: usize,
    teams: usize,
    users: usize,
    budgets: &[PropBudget],
) -> (String, Vec<(String, String)>) {
    let mut text = String::from(
        "[engine]\nhold_ttl_secs = 60\n\n[[plans]]\nid = \"pro\"\ndefault_task = \"chat\"\n[plans.tasks.chat]\nclasses = [\"small\", \"standard\"]\ndefault_class = \"small\"\nmax_tokens = 2000\n",
    );
    let mut keys = Vec::new();
    let mut n = 0;
    let mut key = |text: &mut String, tenant: &str, user: Option<&str>| {
        n += 1;
        let secret = format!("bsr_prop_key_{n:020}");
        let user_line = user.map_or(String::new(), |u| format!("user = \"{u}\"\n"));
        text.push_str(&format!("[[keys]]\nname = \"k{n}\"\ntenant = \"{tenant}\"\n{user_line}kind = \"member\"\nsecret = \"{secret}\"\n"));
        keys.push((tenant.to_string(), secret));
    };
    for t in 0..tenants {
        let tenant = format!("t{t}");
        text.push_str(&format!("[[tenants]]\nid = \"{tenant}\"\nplan = \"pro\"\n"));
        key(&mut text, &tenant, None);
        for g in 0..teams {
            text.push_str(&format!(
                "[[teams]]\ntenant = \"{tenant}\"\nid = \"g{g}\"\n"
            ));
            for u in 0..users {
                let user = format!("u{g}{u}");
                text.push_str(&format!(
                    "[[users]]\ntenant = \"{tenant}\"\nid = \"{user}\"\nteam = \"g{g}\"\n"
                ));
                key(&mut text, &tenant, Some(&user));
            }
        }
    }
    for (i, &(scope, one, tenant, daily, limit)) in budgets.iter().enumerate() {
        let scope = PROP_SCOPES[scope];
        let tenant = tenant % tenants;
        let tenant_line = if scope == "global" {
            String::new()
        } else {
            format!("tenant = \"t{tenant}\"\n")
        };
        // The value a budget may name: one its calls have.
        let value = match scope {
            "tenant" => Some(format!("t{tenant}")),
            "team" => Some("g0".to_string()),
            "user" => Some("u00".to_string()),
            "campaign" | "tag:env" | "workflow" => Some("a".to_string()),
            _ => None,
        };
        let value_line = match value.filter(|_| one) {
            Some(v) => format!("value = \"{v}\"\n"),
            None => String::new(),
        };
        let window = if daily { "daily" } else { "lifetime" };
        let limit = Money::from_nanos(i64::from(limit) * 1_000);
        text.push_str(&format!("[[budgets]]\nid = \"b{i}\"\n{tenant_line}scope = \"{scope}\"\n{value_line}window = \"{window}\"\nlimit = \"{limit}\"\n"));
    }
    (text, keys)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Promise 1 over random hierarchies (tenants, teams, users, keys), random budgets
    /// on any scope, and random calls, settles, voids and expiries: after every entry,
    /// no bucket holds and spends more than its limit, and the engine's counters are a
    /// replay of the ledger.
    #[test]
    fn no_scope_of_a_random_hierarchy_is_ever_overspent(
        shape in (1usize..=2, 1usize..=2, 1usize..=2),
        budgets in proptest::collection::vec((0usize..8, any::<bool>(), 0usize..2, any::<bool>(), 1u32..3_000), 1..7),
        ops in proptest::collection::vec((0u8..5, 0usize..16, 1u64..5_000, 1u32..2_000, 0u8..3), 1..150),
    ) {
        let (tenants, teams, users) = shape;
        let (text, keys) = hierarchy(tenants, teams, users, &budgets);
        let (engine, config) = build(&text);
        let sink = VecSink::default();
        let mut open: Vec<(String, uuid::Uuid, u64, u32)> = Vec::new();
        let mut t = now();
        for (op, who, prompt, max_out, tag) in ops {
            match op {
                0..=2 => {
                    let (tenant, secret) = &keys[who % keys.len()];
                    let c = caller(&engine, secret);
                    let value = ["a", "b", "c"][tag as usize];
                    let mut r = ask(prompt, max_out, Some(value));
                    r.tags.workflow = Some(value.to_string());
                    r.tags.custom.insert("env".into(), value.to_string());
                    if let Ok((p, ())) = engine.authorize(&c, r, t, &sink) {
                        open.push((tenant.clone(), p.authorization_id, p.prompt_tokens, p.max_tokens.unwrap_or(0)));
                    }
                }
                3 => if let Some((tenant, id, pt, mt)) = open.pop() {
                    let u = usage_of(pt, u64::from(mt) / 2);
                    let (s, ()) = engine.settle(&tenant, id, u, t, &sink).unwrap();
                    prop_assert_eq!(s.outcome, Outcome::Settled);
                },
                _ => {
                    if open.is_empty() {
                        t += chrono::Duration::seconds(61);
                        engine.expire_due(t, &sink);
                    } else {
                        let (tenant, id, _, _) = open.remove(0);
                        engine.void(&tenant, id, None, t, &sink).unwrap();
                    }
                }
            }
        }
        let entries = sink.entries.lock().clone();
        let counters = check_never_over(&entries, &limits_of(&config));
        prop_assert_eq!(counters, engine.counters());
    }
}
