//! Bursar's HTTP edge: the authorization API, the admin API, usage, health, metrics and
//! the OpenAPI document.
//!
//! API boundary: wire types (request bodies) live here and are parsed strictly (unknown
//! fields refused); the decisions are the engine's. Handlers get narrow handles through
//! [`Services`]: the engine, the ledger handle, a read-only store reader and the clock.
//! A request is acknowledged only after the ledger entry it caused is durable.
//!
//! Futures that wait on PostgreSQL or Redis are boxed where they are awaited
//! (`Box::pin(shared.grant(…))`). An async function's future is as large as the largest
//! future it awaits, and every caller's future includes it: unboxed, the network
//! clients' futures made a proxied call 23 KB, copied whole when it is boxed and at
//! each state change, on every call, even on the embedded store that never awaits them.
//! One allocation is nothing beside a network round trip.

/// `metrics::counter!`/`histogram!` with a fixed name and labels, registered once: the
/// plain macros look the key up in the recorder's registry (hashing its name and labels)
/// at every call, a cost the per-call paths need not pay. The handle is taken at the
/// first use, so the recorder must be installed before (`metrics_handle`, at build).
macro_rules! fixed_metric {
    (counter!($($args:tt)*)) => {{
        static HANDLE: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
        HANDLE.get_or_init(|| metrics::counter!($($args)*))
    }};
    (histogram!($($args:tt)*)) => {{
        static HANDLE: std::sync::OnceLock<metrics::Histogram> = std::sync::OnceLock::new();
        HANDLE.get_or_init(|| metrics::histogram!($($args)*))
    }};
}

pub mod admin;
pub mod api;
pub mod error;
pub mod extract;
pub mod limiter;
pub mod proxy;
pub mod sim;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Json;
pub use axum::Router;
use bursar_core::budget::Budget;
use bursar_core::catalog::{ApiKey, Directory, FailurePolicy};
use bursar_core::config::Config;
use bursar_core::engine::{
    plan_budgets, AuthorizeRequest, BudgetSet, Caller, DenyCode, Engine, FinishCode, FinishError,
    Leases, Permit, Prepared, Rates, Settlement, Usage,
};
use bursar_core::pricebook::PriceBook;
use bursar_core::Money;
use bursar_store::{CatalogRow, LedgerHandle, Location, OpenOptions, Reader, StoreError};
use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use utoipa::OpenApi;

pub use error::ApiError;

/// Expired holds are looked for every second: a hold outlives its TTL by at most that.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The source of time; injected so tests move time instead of sleeping.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock tests set by hand.
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock(Mutex::new(at))
    }

    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock();
        *t += chrono::Duration::from_std(by).unwrap_or_default();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock()
    }
}

/// The catalog as the admin API changes it: what the file declared plus what was
/// created through the API (stored in the catalog table, which wins on restart).
#[derive(Debug, Clone, Default)]
pub struct CatalogState {
    pub directory: Directory,
    pub file_budgets: Vec<Budget>,
    pub api_budgets: HashMap<String, Budget>,
}

impl CatalogState {
    /// Every budget in force: global and tenant budgets of the file and the API, and the
    /// plan defaults of every tenant.
    pub fn budget_set(&self) -> BudgetSet {
        let mut all: HashMap<String, Budget> = HashMap::new();
        for t in self.directory.tenants.values() {
            if let Some(p) = self.directory.plans.get(&t.plan) {
                for b in plan_budgets(t, p) {
                    all.insert(b.id.clone(), b);
                }
            }
        }
        for b in self.file_budgets.iter().chain(self.api_budgets.values()) {
            all.insert(b.id.clone(), b.clone());
        }
        let mut v: Vec<Budget> = all.into_values().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        BudgetSet::from_budgets(v)
    }
}

/// Everything a handler may use; no locks of its own beyond the admin catalog.
pub struct Services {
    pub engine: Arc<Engine>,
    pub ledger: LedgerHandle,
    pub reader: Reader,
    pub clock: Arc<dyn Clock>,
    pub max_body_bytes: usize,
    pub metrics: PrometheusHandle,
    pub catalog: tokio::sync::Mutex<CatalogState>,
    /// With PostgreSQL: what the instances sharing the database coordinate through.
    pub shared: Option<bursar_store::postgres::Shared>,
    /// One lease request of this instance at a time: calls short at once wait for the
    /// first grant and usually fit in it.
    granting: tokio::sync::Mutex<()>,
    /// Holds this instance has claimed and is finishing (the sweeper leaves them be).
    finishing: Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// With Redis: rate limits counted across every instance.
    pub limiter: Option<limiter::Limiter>,
    pub proxy: proxy::Proxy,
    /// The check of the whole ledger (running in the background after a start that
    /// replayed only its tail).
    pub chain: Arc<bursar_store::ChainCheck>,
}

/// Buckets (seconds) of the histograms, all of Bursar's own time per call: 1 µs to 1 s,
/// with steps of at most 1.5× from 5 µs to 1 ms, fine enough to read a p50 of a few µs.
const BUCKETS: &[f64] = &[
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_007_5,
    0.000_01,
    0.000_015,
    0.000_02,
    0.000_025,
    0.000_03,
    0.000_04,
    0.000_05,
    0.000_075,
    0.000_1,
    0.000_15,
    0.000_2,
    0.000_25,
    0.000_3,
    0.000_4,
    0.000_5,
    0.000_75,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
];

/// One Prometheus recorder per process, shared by every server in it (tests run several).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// What keeps an instance from starting.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the Redis URL is not valid: {0}")]
    Redis(limiter::LimiterDown),
}

/// Opens the store, rebuilds the engine from the ledger and the catalog, and expires
/// holds that ran out while Bursar was down.
pub async fn build(
    config: Config,
    book: Arc<PriceBook>,
    location: &Location,
    migrate: bool,
    clock: Arc<dyn Clock>,
) -> Result<(Arc<Services>, std::thread::JoinHandle<()>), BuildError> {
    let limiter = match &config.server.redis_url {
        Some(url) => Some(
            limiter::Limiter::new(
                url,
                config
                    .server
                    .redis_prefix
                    .as_deref()
                    .unwrap_or(limiter::DEFAULT_PREFIX),
            )
            .map_err(BuildError::Redis)?,
        ),
        None => None,
    };
    // The tables of the tokenizers the proxied models count with are loaded beside the
    // ledger's replay, so that no call waits for them (~0.3 s), nor every call beside it.
    let tokenizers = proxy::tokenizers_served(&config.routing, &book);
    let loading = (!tokenizers.is_empty()).then(|| {
        tokio::task::spawn_blocking(move || {
            for kind in tokenizers {
                bursar_core::tokens::load(kind);
            }
        })
    });
    let engine = Arc::new(Engine::new(config.engine.clone(), book));
    let options = OpenOptions {
        durability: config.server.durability,
        migrate,
        // On PostgreSQL, the data directory keeps only this instance's spool.
        spool_dir: config
            .server
            .data_dir
            .as_ref()
            .map(std::path::PathBuf::from),
        idempotency_window: Some(config.engine.idempotency_window),
    };
    let mut catalog = CatalogState {
        directory: config.directory.clone(),
        file_budgets: config.budgets.clone(),
        api_budgets: HashMap::new(),
    };
    // What the file declares, for rebuilding the catalog when another instance changes it.
    let file_catalog = catalog.clone();
    for k in config.keys {
        engine.upsert_key(k);
    }
    // Recovery streams the ledger into the engine, entry by entry, then the stored
    // catalog, row by row (it wins over the file's keys).
    let replay_started = std::time::Instant::now();
    let opened = bursar_store::open(
        location,
        options,
        bursar_store::Recovery {
            on_entry: |e| engine.recover_one(&e),
            on_catalog: |row| admin::apply_catalog_row(&engine, &mut catalog, &row),
            on_counters: |counters| engine.restore_counters(counters),
        },
    )
    .await?;
    engine.set_directory(catalog.directory.clone());
    engine.set_budgets(catalog.budget_set());
    // Counters of ended periods (from the stored table, or rebuilt by a whole replay)
    // leave memory now rather than at the first sweep.
    engine.prune_counters(clock.now());
    tracing::info!(
        entries = opened.entries,
        seconds = replay_started.elapsed().as_secs_f64(),
        "ledger replayed and checked"
    );
    let reader: Reader = opened.reader;
    if let Some(shared) = &opened.shared {
        // From here on this instance decides within the leases it is granted.
        engine.share_budgets();
        let closed = shared.close_dead_instances().await?;
        tracing::info!(instance = %shared.instance(), closed_dead_instances = closed, "budgets shared with other instances");
    }
    engine.restore_alert_levels(
        reader
            .alerted_levels()
            .await?
            .into_iter()
            .filter_map(|(b, l)| {
                Some((
                    bursar_core::budget::BucketKey::parse(&b)?,
                    bursar_core::budget::Level::parse(&l)?,
                ))
            }),
    );
    if let Some(loading) = loading {
        if let Err(e) = loading.await {
            tracing::warn!(error = %e, "the tokenizers were not loaded at start; the first calls that count load them");
        }
    }
    let proxy = proxy::Proxy::new(config.routing.clone());
    let services = Arc::new(Services {
        engine,
        ledger: opened.handle,
        reader,
        clock,
        max_body_bytes: config
            .server
            .max_body_bytes
            .unwrap_or(bursar_core::config::DEFAULT_MAX_BODY_BYTES),
        metrics: metrics_handle(),
        catalog: tokio::sync::Mutex::new(catalog),
        shared: opened.shared,
        chain: opened.chain,
        granting: tokio::sync::Mutex::new(()),
        finishing: Mutex::new(std::collections::HashSet::new()),
        limiter,
        proxy,
    });
    if let Some(shared) = services.shared.clone() {
        tokio::spawn(follow_other_instances(
            Arc::downgrade(&services),
            shared,
            file_catalog,
        ));
    }
    Ok((services, opened.writer))
}

/// How many times a call short of a lease asks for one before it is decided within
/// what it has, and how long it waits between asks for other instances to give their
/// spare back (doubling from the first, up to the longest): about half a second in
/// all, spent only near a budget's limit.
const LEASE_ROUNDS: u32 = 10;
const LEASE_WAIT_FIRST: Duration = Duration::from_millis(5);
const LEASE_WAIT_LONGEST: Duration = Duration::from_millis(100);

/// Follows what other instances say: gives back the spare leases they ask for, and
/// reads the catalog again when one changes it (so a budget, key or tenant made on one
/// instance is enforced by all at once). Ends with the services.
async fn follow_other_instances(
    services: std::sync::Weak<Services>,
    shared: bursar_store::postgres::Shared,
    file_catalog: CatalogState,
) {
    let me = shared.instance().to_string();
    loop {
        if services.strong_count() == 0 {
            return;
        }
        let mut listener = match shared.listen().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen to the other instances; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            // Wake now and then to notice that the services have stopped.
            let n = match tokio::time::timeout(Duration::from_secs(1), listener.recv()).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => break,
                Err(_) if services.strong_count() == 0 => return,
                Err(_) => continue,
            };
            let Some(services) = services.upgrade() else {
                return;
            };
            match n.channel() {
                bursar_store::postgres::LEASE_WANTED => {
                    let wanted: Vec<bursar_core::budget::BucketKey> = n
                        .payload()
                        .lines()
                        .filter_map(bursar_core::budget::BucketKey::parse)
                        .collect();
                    let spare = services.engine.take_spare_leases(Some(&wanted));
                    if let Err(e) = shared.give_back(&spare).await {
                        tracing::error!(error = %e, "giving back spare leases failed");
                    }
                }
                bursar_store::postgres::CATALOG_CHANGED if n.payload() != me => {
                    match shared.catalog().await {
                        Ok(rows) => services.reload_catalog(&file_catalog, &rows).await,
                        Err(e) => tracing::error!(error = %e, "reading the changed catalog failed"),
                    }
                }
                _ => {}
            }
        }
    }
}

impl Services {
    /// Waits until what was acknowledged so far has landed in the store, so that a read
    /// of the store sees it: an acknowledged entry may be only in the journal for a
    /// moment. Skipped while the store fails (the read then shows what landed). True
    /// when everything acknowledged before the call is known to have landed.
    pub(crate) async fn caught_up(&self) -> bool {
        self.ledger.is_healthy() && self.ledger.barrier().wait().await.is_ok()
    }

    /// Rebuilds the catalog from the file's part and the stored rows, and puts it in
    /// force.
    async fn reload_catalog(&self, file_catalog: &CatalogState, rows: &[CatalogRow]) {
        let mut catalog = self.catalog.lock().await;
        let mut fresh = file_catalog.clone();
        admin::apply_catalog_rows(&self.engine, &mut fresh, rows);
        self.engine.set_directory(fresh.directory.clone());
        self.engine.set_budgets(fresh.budget_set());
        *catalog = fresh;
        tracing::info!(
            rows = rows.len(),
            "catalog changed by another instance: reloaded"
        );
    }

    /// Decides a call and, when it is permitted, waits until its hold is durable. Its
    /// rate limits are taken from Redis first when there is one (and given back if the
    /// call is then denied). With budgets shared across instances, a call short of a
    /// lease asks the store for one (and the other instances for their spare) and is
    /// decided again; after [`LEASE_ROUNDS`] it is decided within what it has.
    ///
    /// While the store is away a call is refused (503, nothing held), unless its tenant
    /// fails open: then it is decided on this instance's own accounting and answered at
    /// once, its hold queued for the store's return.
    pub async fn authorize(
        &self,
        caller: &Caller,
        req: AuthorizeRequest,
    ) -> Result<Permit, ApiError> {
        let prepared = self.engine.prepare(caller, req, self.clock.now())?;
        let mut fail_open = false;
        if !self.ledger.is_healthy() {
            if !(prepared.fail_open() && self.ledger.can_queue()) {
                return Err(store_away());
            }
            fail_open = true;
        }
        let limiter = self
            .limiter
            .as_ref()
            .filter(|_| prepared.rate_checks().len() > 0);
        match limiter {
            None => self.hold(&prepared, Rates::Local, fail_open).await,
            // Boxed: its state is not carried in every call's future.
            Some(limiter) => Box::pin(self.limited(&prepared, limiter, fail_open)).await,
        }
    }

    /// [`Services::authorize`] with a distributed rate limiter: the limits are taken in
    /// Redis first, and given back if the call is refused.
    async fn limited(
        &self,
        prepared: &Prepared<'_>,
        limiter: &limiter::Limiter,
        fail_open: bool,
    ) -> Result<Permit, ApiError> {
        let strict = prepared.enforces();
        let taken = match Box::pin(limiter.take(prepared.rate_checks(), strict)).await {
            Ok(t) => t,
            Err(e) if prepared.fail_open() => {
                // This tenant goes on under this instance's own rate-limit cells.
                tracing::warn!(error = %e, tenant = prepared.tenant(), "Redis unreachable: rate limits counted by this instance (fail open)");
                metrics::counter!("bursar_fail_open_total", "part" => "redis").increment(1);
                return self.hold(prepared, Rates::Local, fail_open).await;
            }
            Err(e) => return Err(ApiError::rate_limiter_unavailable(e.to_string())),
        };
        let r = self
            .hold(prepared, Rates::Taken(&taken.outcomes), fail_open)
            .await;
        // A call that is refused, or a retry answered with its first permit, takes nothing.
        if r.as_ref().map_or(true, |p| p.replayed) {
            Box::pin(limiter.give_back(&taken, strict)).await;
        }
        r
    }

    /// [`Services::authorize`] once the rate limits are taken: decides, and waits for the
    /// hold to be durable.
    async fn hold(
        &self,
        prepared: &Prepared<'_>,
        rates: Rates<'_>,
        mut fail_open: bool,
    ) -> Result<Permit, ApiError> {
        let decided = if fail_open {
            self.engine
                .decide(prepared, &self.ledger, Leases::FailOpen, rates)
                .map_err(ApiError::from)
        } else if let Some(shared) = &self.shared {
            // Boxed: the lease rounds' state is not carried in every call's future.
            match Box::pin(self.decide_shared(shared, prepared, rates)).await {
                // The store went away while a lease was asked for.
                Err(e)
                    if e.code == "store_unavailable"
                        && prepared.fail_open()
                        && self.ledger.can_queue() =>
                {
                    fail_open = true;
                    self.engine
                        .decide(prepared, &self.ledger, Leases::FailOpen, rates)
                        .map_err(ApiError::from)
                }
                other => other,
            }
        } else {
            self.engine
                .decide(prepared, &self.ledger, Leases::AskForMore, rates)
                .map_err(ApiError::from)
        };
        let (permit, ticket) = decided?;
        let landed = if fail_open {
            tracing::warn!(tenant = prepared.tenant(), authorization = %permit.authorization_id, "store unreachable: permitted on this instance's accounting (fail open); the hold is spooled");
            metrics::counter!("bursar_fail_open_total", "part" => "store").increment(1);
            // Answered once the hold is in the local spool (or the store): a kill -9
            // during the outage loses no decision anyone was told of.
            ticket.or_spooled().wait().await
        } else {
            let t0 = std::time::Instant::now();
            let landed = ticket.wait().await;
            fixed_metric!(histogram!("bursar_hold_durable_seconds"))
                .record(t0.elapsed().as_secs_f64());
            landed
        };
        if let Err(e) = landed {
            // Not durable in time: the hold is voided, so the call holds nothing once
            // both entries land with the store's return; the caller is refused.
            if !permit.replayed {
                let _ = self.engine.void(
                    prepared.tenant(),
                    permit.authorization_id,
                    None,
                    self.clock.now(),
                    &self.ledger,
                );
            }
            return Err(e.into());
        }
        Ok(permit)
    }

    /// Whether a keyed authorize of `tenant` goes on without the store's answer to `e`
    /// (the look-up of its Idempotency-Key in the ledger, or its claim): yes when the
    /// store is away and the tenant fails open. The key is then known from this
    /// instance's memory only: a retry during the outage gets its first permit from
    /// there, but a key first used before what the engine remembers (10k keys, a day),
    /// or on another instance, may be held a second time. That is the fail-open
    /// trade-off (promise 6 over promise 2 while the store is away), counted in
    /// `bursar_fail_open_total{part="idempotency"}`; both holds land in the ledger.
    pub fn outage_forgives(&self, tenant: &str, e: &StoreError) -> bool {
        let forgives = e.is_transient() && self.fails_open(tenant) && self.ledger.can_queue();
        if forgives {
            tracing::warn!(error = %e, tenant, "store unreachable: an Idempotency-Key is checked against this instance's memory only (fail open)");
            metrics::counter!("bursar_fail_open_total", "part" => "idempotency").increment(1);
        }
        forgives
    }

    /// Whether `tenant` takes calls on while the store or Redis is away.
    fn fails_open(&self, tenant: &str) -> bool {
        self.engine
            .directory()
            .tenants
            .get(tenant)
            .is_some_and(|t| t.failure_policy == FailurePolicy::FailOpen)
    }

    /// A decision with shared budgets: a call a larger lease would let through waits
    /// for the lease rounds.
    async fn decide_shared(
        &self,
        shared: &bursar_store::postgres::Shared,
        prepared: &Prepared<'_>,
        rates: Rates<'_>,
    ) -> Result<(Permit, bursar_store::Ticket), ApiError> {
        for round in 0..LEASE_ROUNDS {
            match self
                .engine
                .decide(prepared, &self.ledger, Leases::AskForMore, rates)
            {
                Err(d) if d.code == DenyCode::LeaseNeeded => {}
                other => return Ok(other?),
            }
            let (short, final_answer) = {
                let _one_at_a_time = self.granting.lock().await;
                // A grant made while this call waited may already be enough.
                let d = match self
                    .engine
                    .decide(prepared, &self.ledger, Leases::AskForMore, rates)
                {
                    Err(d) if d.code == DenyCode::LeaseNeeded => d,
                    other => return Ok(other?),
                };
                let granted = Box::pin(shared.grant(&d.leases)).await?;
                let mut short = Vec::new();
                let mut final_answer = false;
                for g in &granted {
                    self.engine.add_lease(&g.bucket, g.amount);
                    let wanted = d
                        .leases
                        .iter()
                        .find(|w| w.bucket == g.bucket)
                        .map_or(Money::ZERO, |w| w.shortfall);
                    if g.amount < wanted {
                        if g.others_outstanding + g.amount < wanted {
                            // Even all the others hold could not make it fit: decide now.
                            final_answer = true;
                        }
                        short.push(g.bucket.clone());
                    }
                }
                (short, final_answer)
            };
            if short.is_empty() {
                continue;
            }
            if final_answer {
                break;
            }
            if round + 1 < LEASE_ROUNDS {
                // Room may sit unused on other instances: ask for it, give it a moment.
                Box::pin(shared.ask_for_spare(&short)).await?;
                tokio::time::sleep((LEASE_WAIT_FIRST * 2u32.pow(round)).min(LEASE_WAIT_LONGEST))
                    .await;
            }
        }
        Ok(self
            .engine
            .decide(prepared, &self.ledger, Leases::WithinHeld, rates)?)
    }

    /// Settles (`usage` given, `settle`) or voids a hold. With instances sharing the
    /// database the hold is claimed first: exactly one instance finishes it, and a hold
    /// another instance made is taken over from its ledger entry.
    pub async fn finish(
        &self,
        tenant: &str,
        id: uuid::Uuid,
        usage: Option<Usage>,
        settle: bool,
    ) -> Result<Result<(Settlement, bursar_store::Ticket), FinishError>, StoreError> {
        // While the store is away a finish is still taken (and spooled): the call it
        // records happened. A tenant that fails open is answered once it is in the
        // local spool; others wait for the store (their ticket), at most a moment.
        let answer_now = !self.ledger.is_healthy() && self.fails_open(tenant);
        let r = match &self.shared {
            // A hold permitted failing open was claimed with it: no claim to take.
            Some(_) if self.engine.is_fail_open_hold(id) => {
                Ok(self.finish_here(tenant, id, usage, settle))
            }
            Some(_) if !self.ledger.is_healthy() => Err(store_away_error()),
            Some(shared) => {
                let run = || self.finish_here(tenant, id, usage.clone(), settle);
                self.finishing.lock().insert(id);
                let r = Box::pin(self.claim_and_finish(shared, tenant, id, run)).await;
                self.finishing.lock().remove(&id);
                r
            }
            None => Ok(self.finish_here(tenant, id, usage, settle)),
        };
        match r {
            Ok(Ok((settlement, ticket))) if answer_now => Ok(Ok((settlement, ticket.or_spooled()))),
            other => other,
        }
    }

    /// Settles or voids in this instance's engine.
    fn finish_here(
        &self,
        tenant: &str,
        id: uuid::Uuid,
        usage: Option<Usage>,
        settle: bool,
    ) -> Result<(Settlement, bursar_store::Ticket), FinishError> {
        let now = self.clock.now();
        if settle {
            self.engine
                .settle(tenant, id, usage.unwrap_or_default(), now, &self.ledger)
        } else {
            self.engine.void(tenant, id, usage, now, &self.ledger)
        }
    }

    async fn claim_and_finish(
        &self,
        shared: &bursar_store::postgres::Shared,
        tenant: &str,
        id: uuid::Uuid,
        run: impl Fn() -> Result<(Settlement, bursar_store::Ticket), FinishError>,
    ) -> Result<Result<(Settlement, bursar_store::Ticket), FinishError>, StoreError> {
        let not_here = FinishError {
            code: FinishCode::AuthorizationNotFound,
            message: format!("authorization `{id}` is finished or being finished elsewhere"),
        };
        if !self.engine.is_open(tenant, id) {
            match run() {
                Err(e) if e.code == FinishCode::AuthorizationNotFound => {}
                // Finished here before: the engine answers (a retry, a late settle).
                other => return Ok(other),
            }
            if shared.claim(&[id]).await?.is_empty() {
                return Ok(Err(not_here));
            }
            let adopted = match shared.hold_entry(id, tenant).await? {
                Some(entry) => self.engine.adopt_hold(&entry),
                None => false,
            };
            if !adopted {
                shared.unclaim(id).await?;
                return Ok(Err(not_here));
            }
        } else if shared.claim(&[id]).await?.is_empty() {
            return Ok(Err(not_here));
        }
        let r = run();
        if r.is_err() {
            // Refused (bad usage, say): the hold stays open, and claimable.
            shared.unclaim(id).await?;
        }
        Ok(r)
    }

    /// Expires due holds and waits until the expiries are durable. With instances
    /// sharing the database, holds are claimed first (one another instance finished
    /// is forgotten) and dead instances closed. (Spare leases go back when another
    /// instance asks for them.)
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        // What the engine forgets below (keys, outcomes past their time) is then in the
        // store, where it is looked up: not only in the journal. An idempotency key is
        // forgotten only once its hold is known to be there (the barrier resolved).
        let mark = self.engine.idempotency_mark();
        if self.caught_up().await {
            self.engine.idempotency_landed(mark);
        }
        let now = self.clock.now();
        let (n, ticket) = match &self.shared {
            None => self.engine.expire_due(now, &self.ledger),
            Some(shared) => {
                let mut due = self.engine.due_holds(now);
                {
                    let finishing = self.finishing.lock();
                    due.retain(|id| !finishing.contains(id));
                }
                // Holds permitted failing open are claimed already, by this instance.
                let (mut expiring, others): (Vec<_>, Vec<_>) = due
                    .into_iter()
                    .partition(|id| self.engine.is_fail_open_hold(*id));
                if self.ledger.is_healthy() {
                    let claimed = shared.claim(&others).await?;
                    let unclaimed: Vec<_> = others
                        .into_iter()
                        .filter(|id| !claimed.contains(id))
                        .collect();
                    // Finished elsewhere: forgotten here. Claimed by another instance and
                    // not finished yet (or by one that died, until it is closed): kept,
                    // and tried again at the next sweep.
                    let open = shared.still_open(&unclaimed).await?;
                    for id in unclaimed.iter().filter(|id| !open.contains(id)) {
                        self.engine.forget_finished_elsewhere(*id);
                    }
                    shared.close_dead_instances().await?;
                    shared
                        .forget_old_idempotency_claims(now.timestamp_millis())
                        .await?;
                    // Levels and alerts judge the use of every instance.
                    let everywhere = shared
                        .use_everywhere(&self.engine.counted_buckets())
                        .await?;
                    if let Some(t) = self
                        .engine
                        .note_use_everywhere(everywhere, now, &self.ledger)
                    {
                        t.wait().await?;
                    }
                    expiring.extend(claimed);
                }
                self.engine.expire(&expiring, now, &self.ledger)
            }
        };
        if let Some(t) = ticket {
            t.wait().await?;
        }
        metrics::gauge!("bursar_open_holds").set(self.engine.open_holds() as f64);
        Ok(n)
    }
}

/// The store is away and the caller's tenant fails closed.
fn store_away_error() -> StoreError {
    StoreError::Unavailable("the ledger store is unreachable".into())
}

fn store_away() -> ApiError {
    store_away_error().into()
}

/// Runs the sweeper until the process ends.
pub fn spawn_sweeper(services: Arc<Services>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            match services.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(expired = n, "expired holds past their TTL"),
                Err(e) => tracing::error!(error = %e, "expiring holds failed"),
            }
        }
    })
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Bursar",
        description = "AI spend governance gateway: authorization, admin and usage APIs."
    ),
    paths(
        api::authorize,
        api::settle,
        api::void,
        api::get_authorization,
        api::usage,
        proxy::chat_completions,
        proxy::messages,
        proxy::embeddings,
        proxy::models,
        admin::list_plans,
        admin::list_tenants,
        admin::create_tenant,
        admin::get_tenant,
        admin::update_tenant,
        admin::create_team,
        admin::create_user,
        admin::list_keys,
        admin::create_key,
        admin::revoke_key,
        admin::list_budgets,
        admin::create_budget,
        admin::get_budget,
        admin::delete_budget,
        admin::list_alerts,
        admin::tenant_usage,
        healthz,
        readyz,
        metrics_text,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail))
)]
pub struct ApiDoc;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the ledger accepts writes and, when rate limits are in Redis, Redis
/// answers. Either failing answers 503 with what fails: calls of tenants that fail
/// closed are refused meanwhile (those that fail open go on, counted by the instance).
/// So does a ledger the background check found altered.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready: `{\"ready\": true, \"store\": \"up\", \"redis\": \"up\", \"ledger\": \"verified\"}` (`redis` is `none` without Redis; `ledger` is `checking` while the whole ledger is checked in the background after a start; `spooled`: batches of this instance's spool waiting for the store)"), (status = 503, description = "the store or Redis is failing, or the ledger does not verify (`ledger`: `broken`), named in the same body")))]
pub async fn readyz(State(s): State<Arc<Services>>) -> impl IntoResponse {
    let store = s.ledger.is_healthy();
    let redis = match &s.limiter {
        Some(l) => Some(l.ping().await),
        None => None,
    };
    let up = |ok: bool| if ok { "up" } else { "unreachable" };
    // A ledger that does not verify is not served from, as a start refuses one whose
    // tail does not.
    let ready = store && redis.unwrap_or(true) && !s.chain.is_broken();
    let body = serde_json::json!({
        "ready": ready,
        "store": up(store),
        "redis": redis.map_or("none", up),
        "ledger": s.chain.state(),
        "spooled": s.ledger.spooled(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics_text(State(s): State<Arc<Services>>) -> impl IntoResponse {
    metrics::gauge!("bursar_open_holds").set(s.engine.open_holds() as f64);
    metrics::gauge!("bursar_api_keys").set(s.engine.key_count() as f64);
    metrics::gauge!("bursar_counters_in_memory").set(s.engine.counters_in_memory() as f64);
    metrics::gauge!("bursar_runtime_workers")
        .set(tokio::runtime::Handle::current().metrics().num_workers() as f64);
    if let Some(keys) = s.reader.idempotency_keys_remembered() {
        metrics::gauge!("bursar_idempotency_keys_remembered").set(keys as f64);
    }
    metrics::counter!("bursar_token_counts_from_cache_total")
        .absolute(bursar_core::tokens::counted_from_cache());
    s.metrics.render()
}

async fn openapi_json() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

async fn fallback() -> ApiError {
    ApiError::not_found("route")
}

pub fn router(services: Arc<Services>) -> Router {
    let limit = services.max_body_bytes;
    let routes = Router::new()
        .route("/v1/authorizations", post(api::authorize))
        .route("/v1/authorizations/{id}", get(api::get_authorization))
        .route("/v1/authorizations/{id}/settle", post(api::settle))
        .route("/v1/authorizations/{id}/void", post(api::void))
        .route("/v1/usage", get(api::usage))
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route("/v1/messages", post(proxy::messages))
        .route("/v1/embeddings", post(proxy::embeddings))
        .route("/v1/models", get(proxy::models))
        .route("/v1/admin/plans", get(admin::list_plans))
        .route(
            "/v1/admin/tenants",
            get(admin::list_tenants).post(admin::create_tenant),
        )
        .route(
            "/v1/admin/tenants/{tenant}",
            get(admin::get_tenant).patch(admin::update_tenant),
        )
        .route("/v1/admin/tenants/{tenant}/teams", post(admin::create_team))
        .route("/v1/admin/tenants/{tenant}/users", post(admin::create_user))
        .route(
            "/v1/admin/tenants/{tenant}/keys",
            get(admin::list_keys).post(admin::create_key),
        )
        .route(
            "/v1/admin/tenants/{tenant}/keys/{key}/revoke",
            post(admin::revoke_key),
        )
        .route(
            "/v1/admin/tenants/{tenant}/budgets",
            get(admin::list_budgets).post(admin::create_budget),
        )
        .route(
            "/v1/admin/tenants/{tenant}/budgets/{budget}",
            get(admin::get_budget).delete(admin::delete_budget),
        )
        .route("/v1/admin/tenants/{tenant}/alerts", get(admin::list_alerts))
        .route("/v1/admin/tenants/{tenant}/usage", get(admin::tenant_usage))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
        .fallback(fallback)
        .with_state(services);
    // The layers wrap the whole router once. Added with `Router::layer` they would wrap
    // every route, each in a box of its own that every request clones (an allocation a
    // layer, a request).
    let layered = tower::ServiceBuilder::new()
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            tower_http::request_id::MakeRequestUuid,
        ))
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        // The span's fields are read only when it is enabled (the log level lets INFO
        // through): the request's id is not copied for a span nobody records.
        .layer(tracing_http_span())
        .layer(DefaultBodyLimit::max(limit))
        .service(routes);
    Router::new().fallback_service(layered)
}

fn tracing_http_span() -> tower_http::trace::TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    impl Fn(&axum::http::Request<axum::body::Body>) -> tracing::Span + Clone,
> {
    tower_http::trace::TraceLayer::new_for_http().make_span_with(
        |req: &axum::http::Request<axum::body::Body>| {
            tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
                request_id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
            )
        },
    )
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    services: Arc<Services>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(services.clone());
    axum::serve(no_delay(listener), app)
        .with_graceful_shutdown(shutdown)
        .await?;
    // What was acknowledged is in the store before the process ends (not only in the
    // journal, which the next start would land).
    services.caught_up().await;
    Ok(())
}

/// Serves any router (the simulated provider's, say) until `shutdown` resolves.
pub async fn serve_router(
    listener: TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(no_delay(listener), app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Sends each answer as soon as it is written (`TCP_NODELAY`). With Nagle's algorithm
/// on, the last segment of an answer written in two parts waits for the client's ACK of
/// the first, which a client delaying its ACKs holds back up to 40 ms.
fn no_delay(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    })
}

/// Keys are stored in the catalog with their hash, never the secret.
pub fn key_row(key: &ApiKey) -> CatalogRow {
    admin::key_row(key)
}
