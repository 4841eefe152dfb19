//! The authorization API: authorize (reserve) → settle (actual usage) or void.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bursar_core::engine::{
    permit_of_hold, AuthorizeRequest, BudgetView, Caller, Denial, DenyCode, FinishCode,
    FinishError, Metered, Outcome, Permit, Prompt, Settlement, Usage,
};
use bursar_core::json::ToJson;
use bursar_core::ledger::{fingerprint, EntryKind, Tags};
use bursar_core::pricebook::TokenUsage;
use bursar_core::tokens::ChatMessage;
use bursar_core::Money;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;
use crate::extract::{Authed, JsonBody};
use crate::Services;

/// A permit or settlement as the answer's body, in the JSON `bursar_core::json` writes
/// by hand (byte for byte `serde_json`'s, at a fraction of its cost on this hot path).
pub struct Answer<T>(pub T);

impl<T: ToJson> IntoResponse for Answer<T> {
    fn into_response(self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.0.to_json(),
        )
            .into_response()
    }
}

/// Idempotency keys longer than this are refused: they are stored with every hold.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Messages in one authorization request.
pub const MAX_MESSAGES: usize = 10_000;

/// Ask to spend. Give `model` with one of `messages`, `prompt` or `prompt_tokens`; or
/// `api` with `quantity` for a metered, non-token API.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeBody {
    pub model: Option<String>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub messages: Option<Vec<ChatMessage>>,
    pub prompt: Option<String>,
    pub prompt_tokens: Option<u64>,
    /// The most output tokens the call may produce; set by Bursar when absent.
    pub max_tokens: Option<u32>,
    pub api: Option<String>,
    pub quantity: Option<u64>,
    #[serde(default)]
    pub tags: Tags,
    /// How long the hold lives before it expires (default from the configuration).
    pub ttl_seconds: Option<u64>,
}

/// Report what the call used.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettleBody {
    pub usage: Option<TokenUsage>,
    pub quantity: Option<u64>,
    /// The model the provider reports it used (drift is recorded and priced as used).
    pub model_used: Option<String>,
    pub latency_ms: Option<u32>,
    /// True when the usage was counted by the caller, not reported by the provider.
    #[serde(default)]
    pub estimated: bool,
}

/// The call failed. Give its usage if the provider billed anything.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoidBody {
    pub usage: Option<TokenUsage>,
    pub quantity: Option<u64>,
    pub model_used: Option<String>,
    pub reason: Option<String>,
}

/// Where an authorization stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuthorizationView {
    pub authorization_id: Uuid,
    /// `held`, `settled`, `voided`, `expired`.
    pub state: String,
    pub entries: Vec<EntryView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntryView {
    pub seq: i64,
    pub kind: String,
    pub held_delta: Money,
    pub cost_delta: Money,
}

/// "My usage vs my limits".
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub tenant: Option<String>,
    pub key_id: Uuid,
    pub budgets: Vec<BudgetView>,
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v.to_str().map_err(|_| {
        ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be visible ASCII",
        )
    })?;
    if s.is_empty() || s.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            format!("Idempotency-Key must have 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"),
        ));
    }
    Ok(Some(s.to_string()))
}

fn to_request(body: AuthorizeBody) -> Result<Metered, ApiError> {
    match (body.model, body.api) {
        (Some(model), None) => {
            if body.quantity.is_some() {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "`quantity` goes with `api`, not `model`",
                ));
            }
            let prompt =
                match (body.messages, body.prompt, body.prompt_tokens) {
                    (Some(m), None, None) => {
                        if m.len() > MAX_MESSAGES {
                            return Err(ApiError::bad_request(
                                "invalid_request",
                                format!("at most {MAX_MESSAGES} messages"),
                            ));
                        }
                        Prompt::Messages(m)
                    }
                    (None, Some(p), None) => Prompt::Text(p),
                    (None, None, Some(n)) => Prompt::Tokens(n),
                    _ => return Err(ApiError::bad_request(
                        "invalid_request",
                        "give exactly one of `messages`, `prompt` and `prompt_tokens` with `model`",
                    )),
                };
            Ok(Metered::Model {
                model: model.into(),
                prompt,
                max_tokens: body.max_tokens,
            })
        }
        (None, Some(api)) => {
            if body.messages.is_some()
                || body.prompt.is_some()
                || body.prompt_tokens.is_some()
                || body.max_tokens.is_some()
            {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "a metered `api` takes `quantity`, not prompts or tokens",
                ));
            }
            Ok(Metered::Api {
                api: api.into(),
                quantity: body.quantity.unwrap_or(1),
            })
        }
        _ => Err(ApiError::bad_request(
            "invalid_request",
            "give exactly one of `model` and `api`",
        )),
    }
}

fn record_decision(outcome: &'static str, code: &'static str, started: Instant) {
    if (outcome, code) == ("permit", "ok") {
        fixed_metric!(counter!("bursar_decisions_total", "outcome" => "permit", "code" => "ok"))
            .increment(1);
    } else {
        metrics::counter!("bursar_decisions_total", "outcome" => outcome, "code" => code)
            .increment(1);
    }
    fixed_metric!(histogram!("bursar_authorize_seconds")).record(started.elapsed().as_secs_f64());
}

/// Authorize a call: hold its worst-case cost on every budget it touches.
#[utoipa::path(
    post, path = "/v1/authorizations", request_body = AuthorizeBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "retries with the same key return the first answer, for the idempotency window after the first (a week by default: `engine.idempotency_window_secs`)")),
    responses(
        (status = 200, description = "permitted", body = Permit),
        (status = 402, description = "budget exceeded", body = crate::error::ErrorBody),
        (status = 403, description = "plan, feature or model class not allowed", body = crate::error::ErrorBody),
        (status = 409, description = "idempotency key reused with another request", body = crate::error::ErrorBody),
        (status = 422, description = "invalid request", body = crate::error::ErrorBody),
        (status = 429, description = "rate limited (see Retry-After)", body = crate::error::ErrorBody),
        (status = 503, description = "store unavailable: fail closed", body = crate::error::ErrorBody),
    )
)]
pub async fn authorize(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    headers: HeaderMap,
    body: JsonBody<AuthorizeBody>,
) -> Result<Answer<Permit>, ApiError> {
    let started = Instant::now();
    let idempotency_key = idempotency_key(&headers)?;
    let ttl = body.value.ttl_seconds.map(Duration::from_secs);
    if ttl.is_some_and(|t| t.is_zero()) {
        return Err(ApiError::bad_request(
            "invalid_request",
            "ttl_seconds must be at least 1",
        ));
    }
    let tags = body.value.tags.clone();
    let req = AuthorizeRequest {
        metered: to_request(body.value)?,
        tags,
        fingerprint: idempotency_key.as_ref().map(|_| fingerprint(&body.raw)),
        idempotency_key,
        ttl,
    };
    // A key the engine has forgotten (past its memory's time or size) may still belong to
    // a hold in the ledger made within the idempotency window: a retry gets that hold,
    // never a second one. Instances sharing
    // the database claim a key's first use, so two of them receiving it at once do not
    // both decide: the other waits for the claimer's hold (`COMMIT_WAIT` at most).
    let mut claimed: Option<(&bursar_store::postgres::Shared, String, String)> = None;
    if let (Some(key), Some(tenant)) = (&req.idempotency_key, &caller.key.tenant) {
        if !s.engine.knows_idempotency_key(tenant, key) {
            let deadline = Instant::now() + bursar_store::COMMIT_WAIT;
            // A key is honoured for the idempotency window after its hold; an older
            // hold with it is another call's.
            let window = s.engine.config().idempotency_window;
            let since_ms = s
                .clock
                .now()
                .timestamp_millis()
                .saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX));
            loop {
                let found = match s
                    .reader
                    .hold_by_idempotency_key(tenant, key, since_ms)
                    .await
                {
                    Ok(found) => found,
                    // The store is away: a tenant that fails open is decided on this
                    // instance's own memory of its keys (see `Services::outage_forgives`).
                    Err(e) if s.outage_forgives(tenant, &e) => break,
                    Err(e) => return Err(e.into()),
                };
                if let Some(h) = found {
                    if h.detail.fingerprint != req.fingerprint {
                        return Err(Denial {
                            code: DenyCode::IdempotencyKeyReused,
                            message: "this Idempotency-Key was used with a different request"
                                .into(),
                            retry_after: None,
                            leases: Vec::new(),
                        }
                        .into());
                    }
                    record_decision("permit", "replayed", started);
                    return Ok(Answer(permit_of_hold(
                        h.authorization,
                        h.held,
                        h.model_used.map(Into::into),
                        h.price_version.map(Into::into),
                        &h.detail,
                        true,
                    )));
                }
                let Some(shared) = &s.shared else { break };
                let now_ms = s.clock.now().timestamp_millis();
                match Box::pin(shared.claim_idempotency_key(tenant, key, now_ms)).await {
                    Ok(true) => {
                        claimed = Some((shared, tenant.to_string(), key.clone()));
                        break;
                    }
                    Ok(false) => {}
                    Err(e) if s.outage_forgives(tenant, &e) => break,
                    Err(e) => return Err(e.into()),
                }
                if Instant::now() >= deadline {
                    return Err(Denial {
                        code: DenyCode::IdempotencyKeyReused,
                        message: "this Idempotency-Key is in use by a call another instance is still deciding; retry".into(),
                        retry_after: Some(Duration::from_secs(1)),
                        leases: Vec::new(),
                    }
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    match s.authorize(&caller, req).await {
        Ok(permit) => {
            record_decision(
                "permit",
                permit.shadow_denial.map_or("ok", |c| c.as_str()),
                started,
            );
            Ok(Answer(permit))
        }
        Err(e) => {
            record_decision("deny", e.code, started);
            // Denied, or failed: a retry is decided anew, on whichever instance (a hold
            // that was made and voided is in the ledger, which a retry asks first).
            if let Some((shared, tenant, key)) = claimed {
                if let Err(release) = Box::pin(shared.release_idempotency_key(&tenant, &key)).await
                {
                    tracing::warn!(error = %release, "could not release an idempotency claim; it lapses in a minute");
                }
            }
            Err(e)
        }
    }
}

/// Claim key (never a valid Idempotency-Key: it starts with a control character) under
/// which one instance reconciles a late report of an expired hold.
fn reconcile_claim(id: Uuid) -> String {
    format!("\u{1}reconcile {id}")
}

/// Takes up, from the ledger, an expired hold of this tenant that has not been
/// reconciled yet, so that a late settle records its true cost once. With instances
/// sharing the database, the one that claims the reconciliation does it.
async fn adopt_expired(s: &Services, tenant: &str, id: Uuid) -> Result<bool, ApiError> {
    s.caught_up().await;
    let entries = s.reader.authorization_entries(id, tenant).await?;
    let (Some(hold), Some(last)) = (entries.first(), entries.last()) else {
        return Ok(false);
    };
    if last.kind != EntryKind::Expire {
        // Not expired, or reconciled already (an adjustment follows the expiry).
        return Ok(false);
    }
    if let Some(shared) = &s.shared {
        let now_ms = s.clock.now().timestamp_millis();
        if !shared
            .claim_idempotency_key(tenant, &reconcile_claim(id), now_ms)
            .await?
        {
            return Ok(false);
        }
        // A claim is taken over once stale (its instance may have reconciled, or died,
        // a minute ago): read again.
        let again = s.reader.authorization_entries(id, tenant).await?;
        if again.last().map(|e| e.kind) != Some(EntryKind::Expire) {
            return Ok(false);
        }
    }
    Ok(s.engine.adopt_expired(hold, last))
}

/// A finished authorization no longer in memory: answer from the ledger. A retried
/// settle with the same usage gets the first settlement; anything else its conflict.
async fn finished_in_store(
    s: &Services,
    tenant: &str,
    id: Uuid,
    settle_usage: Option<&Usage>,
) -> Result<Answer<Settlement>, ApiError> {
    // While the store lags behind what was acknowledged (its writer failing or stalled),
    // an authorization it lacks, or whose finish it lacks, may be in flight to it: that
    // is "retry", not "no such authorization".
    let landed = s.caught_up().await;
    let lagging = || {
        ApiError::from(bursar_store::StoreError::Unavailable(
            "the ledger has not caught up with what this instance acknowledged; retry".into(),
        ))
    };
    if !s.reader.exists(id, tenant).await? {
        if !landed {
            return Err(lagging());
        }
        return Err(FinishError {
            code: FinishCode::AuthorizationNotFound,
            message: format!("no authorization `{id}`"),
        }
        .into());
    }
    let mut entries = s.reader.entries_of(id).await?;
    // Instances sharing the database: another one (or a concurrent call here) may have
    // claimed the hold and not yet committed its finish; wait a moment for it.
    if s.shared.is_some() {
        for _ in 0..50 {
            if entries.last().is_some_and(|e| e.1 != EntryKind::Hold) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            entries = s.reader.entries_of(id).await?;
        }
    }
    if let (Some(u), Some(row)) = (settle_usage, s.reader.settle_entry_of(id).await?) {
        if row.usage == u.tokens && row.quantity == u.quantity {
            return Ok(Answer(Settlement {
                authorization_id: id,
                outcome: Outcome::Settled,
                cost: row.cost,
                charge: row.charge,
                released: row.released,
                overage: row.cost.saturating_sub(row.released).max(Money::ZERO),
                model_used: row.model_used.map(Into::into),
                price_version: row.price_version.into(),
                drift: row.flags & bursar_core::ledger::flags::DRIFT != 0,
                replayed: true,
            }));
        }
    }
    let code = match entries
        .iter()
        .rev()
        .find(|e| e.1 != EntryKind::Adjustment)
        .map(|e| e.1)
    {
        Some(EntryKind::Settle) => FinishCode::AuthorizationAlreadySettled,
        Some(EntryKind::Void) => FinishCode::AuthorizationVoided,
        Some(EntryKind::Expire) => FinishCode::AuthorizationExpired,
        _ if !landed => return Err(lagging()),
        _ => FinishCode::AuthorizationNotFound,
    };
    Err(FinishError {
        code,
        message: format!(
            "authorization `{id}` is already finished ({})",
            code.as_str()
        ),
    }
    .into())
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            FinishCode::AuthorizationNotFound.as_str(),
            format!("`{id}` is not an authorization id"),
        )
    })
}

fn tenant_of(caller: &Caller) -> Result<String, ApiError> {
    caller
        .key
        .tenant
        .as_deref()
        .map(str::to_string)
        .ok_or_else(|| ApiError::forbidden("a platform admin key has no authorizations"))
}

async fn finish(
    s: &Services,
    caller: &Caller,
    id: &str,
    usage: Option<Usage>,
    settle: bool,
) -> Result<Answer<Settlement>, ApiError> {
    let id = parse_id(id)?;
    let tenant = tenant_of(caller)?;
    let settle_usage = if settle { usage.clone() } else { None };
    if let Some(shared) = &s.shared {
        // A late report of a hold this instance expired: one instance reconciles it,
        // the one that claims it (another may be taking it up from the ledger).
        if settle && s.engine.is_expired_unreconciled(&tenant, id) {
            let now_ms = s.clock.now().timestamp_millis();
            let won = shared
                .claim_idempotency_key(&tenant, &reconcile_claim(id), now_ms)
                .await?;
            // A claim is taken over once stale: the ledger says whether it was done.
            let done = !won
                || s.reader
                    .authorization_entries(id, &tenant)
                    .await?
                    .last()
                    .is_some_and(|e| e.kind != EntryKind::Expire);
            if done {
                s.engine.reconciled_elsewhere(id);
            }
        }
    }
    let mut result = s.finish(&tenant, id, usage, settle).await?;
    if let (Err(e), Some(u)) = (&result, &settle_usage) {
        // A late report of a hold expired elsewhere (or forgotten here): taken up from
        // the ledger and reconciled, as the engine does for one it remembers.
        if e.code == FinishCode::AuthorizationNotFound && adopt_expired(s, &tenant, id).await? {
            result = s.finish(&tenant, id, Some(u.clone()), true).await?;
        }
    }
    match result {
        Ok((settlement, ticket)) => {
            ticket.wait().await?;
            if settlement.outcome == Outcome::Expired {
                return Err(FinishError {
                    code: FinishCode::AuthorizationExpired,
                    message: format!(
                        "authorization `{id}` had expired and was charged by policy; the reported usage (${}) was recorded as an adjustment",
                        settlement.cost
                    ),
                }
                .into());
            }
            if settle {
                fixed_metric!(counter!("bursar_finished_total", "kind" => "settle")).increment(1);
            } else {
                fixed_metric!(counter!("bursar_finished_total", "kind" => "void")).increment(1);
            }
            if settlement.overage > Money::ZERO {
                metrics::counter!("bursar_overages_total").increment(1);
            }
            Ok(Answer(settlement))
        }
        Err(e) if e.code == FinishCode::AuthorizationNotFound => {
            finished_in_store(s, &tenant, id, settle_usage.as_ref()).await
        }
        Err(e) => Err(e.into()),
    }
}

/// Settle an authorization with the call's real usage; the rest of the hold is released.
#[utoipa::path(
    post, path = "/v1/authorizations/{id}/settle", request_body = SettleBody,
    params(("id" = String, Path, description = "authorization id")),
    responses(
        (status = 200, description = "settled (or the first settlement, replayed)", body = Settlement),
        (status = 404, description = "authorization_not_found", body = crate::error::ErrorBody),
        (status = 409, description = "authorization_already_settled, authorization_voided or authorization_expired", body = crate::error::ErrorBody),
        (status = 422, description = "invalid usage or unknown model", body = crate::error::ErrorBody),
        (status = 503, description = "store_unavailable: the store is away, or has not caught up with what was acknowledged (retry)", body = crate::error::ErrorBody),
    )
)]
pub async fn settle(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
    body: JsonBody<SettleBody>,
) -> Result<Answer<Settlement>, ApiError> {
    let b = body.value;
    let usage = Usage {
        tokens: b.usage.unwrap_or_default(),
        quantity: b.quantity.unwrap_or(0),
        model_used: b.model_used.map(Into::into),
        latency_ms: b.latency_ms,
        estimated: b.estimated,
    };
    finish(&s, &caller, &id, Some(usage), true).await
}

/// Void an authorization: the call failed; it is recorded at its true cost (usually $0).
#[utoipa::path(
    post, path = "/v1/authorizations/{id}/void", request_body = VoidBody,
    params(("id" = String, Path, description = "authorization id")),
    responses(
        (status = 200, description = "voided", body = Settlement),
        (status = 404, description = "authorization_not_found", body = crate::error::ErrorBody),
        (status = 409, description = "already finished", body = crate::error::ErrorBody),
        (status = 503, description = "store_unavailable: the store is away, or has not caught up with what was acknowledged (retry)", body = crate::error::ErrorBody),
    )
)]
pub async fn void(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
    body: JsonBody<VoidBody>,
) -> Result<Answer<Settlement>, ApiError> {
    let b = body.value;
    let usage = (b.usage.is_some() || b.quantity.is_some()).then(|| Usage {
        tokens: b.usage.unwrap_or_default(),
        quantity: b.quantity.unwrap_or(0),
        model_used: b.model_used.map(Into::into),
        latency_ms: None,
        estimated: false,
    });
    finish(&s, &caller, &id, usage, false).await
}

/// Where an authorization stands, with its ledger entries.
#[utoipa::path(
    get, path = "/v1/authorizations/{id}",
    params(("id" = String, Path, description = "authorization id")),
    responses((status = 200, body = AuthorizationView), (status = 404, body = crate::error::ErrorBody))
)]
pub async fn get_authorization(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> Result<Json<AuthorizationView>, ApiError> {
    let id = parse_id(&id)?;
    let tenant = tenant_of(&caller)?;
    s.caught_up().await;
    if !s.reader.exists(id, &tenant).await? {
        return Err(FinishError {
            code: FinishCode::AuthorizationNotFound,
            message: format!("no authorization `{id}`"),
        }
        .into());
    }
    let entries = s.reader.entries_of(id).await?;
    let state = match entries
        .iter()
        .rev()
        .find(|e| e.1 != EntryKind::Adjustment)
        .map(|e| e.1)
    {
        Some(EntryKind::Settle) => "settled",
        Some(EntryKind::Void) => "voided",
        Some(EntryKind::Expire) => "expired",
        _ => "held",
    };
    Ok(Json(AuthorizationView {
        authorization_id: id,
        state: state.into(),
        entries: entries
            .into_iter()
            .map(|(seq, kind, held, cost)| EntryView {
                seq,
                kind: kind.as_str().into(),
                held_delta: held,
                cost_delta: cost,
            })
            .collect(),
    }))
}

/// My usage against my limits: every budget this key's calls touch, now.
#[utoipa::path(get, path = "/v1/usage", responses((status = 200, body = UsageView)))]
pub async fn usage(State(s): State<Arc<Services>>, Authed(caller): Authed) -> Json<UsageView> {
    let budgets = s
        .engine
        .standing_for(&caller, &Tags::default(), s.clock.now());
    Json(UsageView {
        tenant: caller.key.tenant.as_deref().map(str::to_string),
        key_id: caller.key.id,
        budgets,
    })
}
