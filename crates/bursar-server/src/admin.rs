//! The admin API: tenants, teams, users, keys, budgets, alerts and usage.
//!
//! Access (promise 5): a platform admin key manages everything; a tenant admin key
//! manages its own tenant but never its plan; a member key changes nothing. A key of
//! one tenant gets 404 on every resource of another, exactly as if it did not exist.
//! Every change is committed to the catalog table before it takes effect.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use bursar_core::budget::{BucketKey, Budget, Counter, EmergencyAction};
use bursar_core::catalog::{
    ApiKey, EnforcementMode, FailurePolicy, KeyHash, KeyKind, Plan, Team, Tenant, User,
    KEY_SECRET_PREFIX,
};
use bursar_core::config::{parse_budget_spec, valid_id};
use bursar_core::engine::Engine;
use bursar_core::Money;
use bursar_store::{AlertRow, CatalogRow, UsageRow};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;
use crate::extract::{Authed, JsonBody};
use crate::{CatalogState, Services};

/// Characters of a generated key secret after its prefix: 40 alphanumerics, 238 bits.
pub const KEY_SECRET_CHARS: usize = 40;
/// The most alerts one request lists.
pub const MAX_ALERTS_LISTED: u32 = 1000;

/// A key as stored in the catalog: its hash, never its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyRecord {
    id: Uuid,
    name: Box<str>,
    sha256: String,
    prefix: Box<str>,
    tenant: Option<Arc<str>>,
    team: Option<Arc<str>>,
    user: Option<Arc<str>>,
    kind: KeyKind,
    role: Option<Arc<str>>,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_ttl_secs: Option<u32>,
}

pub fn key_row(k: &ApiKey) -> CatalogRow {
    let rec = KeyRecord {
        id: k.id,
        name: k.name.clone(),
        sha256: k.hash.to_hex(),
        prefix: k.prefix.clone(),
        tenant: k.tenant.clone(),
        team: k.team.clone(),
        user: k.user.clone(),
        kind: k.kind,
        role: k.role.clone(),
        created_at: k.created_at,
        expires_at: k.expires_at,
        revoked_at: k.revoked_at,
        cache_ttl_secs: k.cache_ttl_secs,
    };
    CatalogRow {
        kind: "key".into(),
        id: k.id.to_string(),
        body: serde_json::to_string(&rec).ok(),
    }
}

fn row<T: Serialize>(kind: &str, id: &str, value: &T) -> CatalogRow {
    CatalogRow {
        kind: kind.into(),
        id: id.into(),
        body: serde_json::to_string(value).ok(),
    }
}

/// Puts stored catalog rows in force (their order does not matter: each names its
/// object whole).
pub fn apply_catalog_rows(engine: &Engine, catalog: &mut CatalogState, rows: &[CatalogRow]) {
    for r in rows {
        apply_catalog_row(engine, catalog, r);
    }
}

/// Puts one stored catalog row in force: an API key into the engine, anything else
/// into `catalog`. An unreadable row is skipped, logged.
pub fn apply_catalog_row(engine: &Engine, catalog: &mut CatalogState, r: &CatalogRow) {
    let Some(body) = &r.body else { return };
    let ok = match r.kind.as_str() {
        "tenant" => serde_json::from_str::<Tenant>(body)
            .map(|t| {
                catalog.directory.tenants.insert(t.id.to_string(), t);
            })
            .is_ok(),
        "team" => serde_json::from_str::<Team>(body)
            .map(|t| {
                catalog
                    .directory
                    .teams
                    .insert((t.tenant.clone(), t.id.clone()), t);
            })
            .is_ok(),
        "user" => serde_json::from_str::<User>(body)
            .map(|u| {
                catalog
                    .directory
                    .users
                    .insert((u.tenant.clone(), u.id.clone()), u);
            })
            .is_ok(),
        "key" => match serde_json::from_str::<KeyRecord>(body) {
            Ok(k) => match KeyHash::from_hex(&k.sha256) {
                Some(hash) => {
                    engine.upsert_key(ApiKey {
                        id: k.id,
                        name: k.name,
                        hash,
                        prefix: k.prefix,
                        tenant: k.tenant,
                        team: k.team,
                        user: k.user,
                        kind: k.kind,
                        role: k.role,
                        created_at: k.created_at,
                        expires_at: k.expires_at,
                        revoked_at: k.revoked_at,
                        cache_ttl_secs: k.cache_ttl_secs,
                    });
                    true
                }
                None => false,
            },
            Err(_) => false,
        },
        "budget" => serde_json::from_str::<Budget>(body)
            .map(|b| {
                catalog.api_budgets.insert(b.id.clone(), b);
            })
            .is_ok(),
        _ => true,
    };
    if !ok {
        tracing::error!(kind = %r.kind, id = %r.id, "unreadable catalog row skipped");
    }
}

/// Checks the caller may manage `tenant`; 404 when it is another tenant's.
fn require_admin(caller: &ApiKey, tenant: &str, catalog: &CatalogState) -> Result<(), ApiError> {
    let exists = catalog.directory.tenants.contains_key(tenant);
    match caller.kind {
        KeyKind::PlatformAdmin if exists => Ok(()),
        KeyKind::TenantAdmin if caller.tenant.as_deref() == Some(tenant) && exists => Ok(()),
        KeyKind::Member if caller.tenant.as_deref() == Some(tenant) && exists => Err(
            ApiError::forbidden("a member key cannot manage its tenant; use a tenant admin key"),
        ),
        _ => Err(ApiError::not_found("tenant")),
    }
}

fn require_platform(caller: &ApiKey) -> Result<(), ApiError> {
    if caller.kind == KeyKind::PlatformAdmin {
        Ok(())
    } else {
        Err(ApiError::forbidden("only a platform admin key can do this"))
    }
}

async fn commit(s: &Services, rows: Vec<CatalogRow>) -> Result<(), ApiError> {
    // While the store is away a change is refused before anything is written: a change
    // kept in the spool would land later than its caller was told it failed.
    if !s.ledger.is_healthy() {
        return Err(crate::store_away());
    }
    for r in rows {
        s.ledger.put_catalog(r).wait().await?;
    }
    Ok(())
}

/// Hands the changed catalog to the engine (swapped whole: no decision sees half of it).
fn publish(s: &Services, catalog: &CatalogState) {
    s.engine.set_directory(catalog.directory.clone());
    s.engine.set_budgets(catalog.budget_set());
}

/// Plans (platform admins and tenant admins).
#[utoipa::path(get, path = "/v1/admin/plans", responses((status = 200, body = Object)))]
pub async fn list_plans(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
) -> Result<Json<Vec<Plan>>, ApiError> {
    if caller.key.kind == KeyKind::Member {
        return Err(ApiError::forbidden("a member key cannot list plans"));
    }
    let catalog = s.catalog.lock().await;
    let mut plans: Vec<Plan> = catalog.directory.plans.values().cloned().collect();
    plans.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(plans))
}

/// Tenants the key may see.
#[utoipa::path(get, path = "/v1/admin/tenants", responses((status = 200, body = Object)))]
pub async fn list_tenants(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
) -> Result<Json<Vec<Tenant>>, ApiError> {
    let catalog = s.catalog.lock().await;
    let mut v: Vec<Tenant> = match caller.key.kind {
        KeyKind::PlatformAdmin => catalog.directory.tenants.values().cloned().collect(),
        KeyKind::TenantAdmin => caller
            .key
            .tenant
            .as_deref()
            .and_then(|t| catalog.directory.tenants.get(t))
            .cloned()
            .into_iter()
            .collect(),
        KeyKind::Member => return Err(ApiError::forbidden("a member key cannot list tenants")),
    };
    v.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(v))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantBody {
    pub id: String,
    pub name: Option<String>,
    pub plan: String,
    /// IANA time zone; calendar budget windows start at midnight there.
    pub timezone: Option<String>,
    pub mode: Option<EnforcementMode>,
    /// Platform admins only.
    pub failure_policy: Option<FailurePolicy>,
}

fn parse_tz(tz: Option<&str>) -> Result<Option<Tz>, ApiError> {
    tz.map(|t| {
        t.parse::<Tz>().map_err(|_| {
            ApiError::bad_request(
                "invalid_timezone",
                format!("`{t}` is not an IANA time zone (e.g. Europe/Paris)"),
            )
        })
    })
    .transpose()
}

/// Create a tenant (platform admins only).
#[utoipa::path(post, path = "/v1/admin/tenants", request_body = TenantBody, responses((status = 201, body = Object), (status = 409, body = crate::error::ErrorBody)))]
pub async fn create_tenant(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    body: JsonBody<TenantBody>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    require_platform(&caller.key)?;
    let b = body.value;
    if !valid_id(&b.id) {
        return Err(ApiError::bad_request(
            "invalid_id",
            "ids are 1-64 characters of a-z, A-Z, 0-9, - _ . :",
        ));
    }
    let tz = parse_tz(b.timezone.as_deref())?.unwrap_or(Tz::UTC);
    let mut catalog = s.catalog.lock().await;
    if catalog.directory.tenants.contains_key(&b.id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("tenant `{}` exists", b.id),
        ));
    }
    if !catalog.directory.plans.contains_key(&b.plan) {
        return Err(ApiError::bad_request(
            "unknown_plan",
            format!("plan `{}` does not exist", b.plan),
        ));
    }
    let tenant = Tenant {
        name: b.name.unwrap_or_else(|| b.id.clone()),
        id: b.id.as_str().into(),
        plan: b.plan,
        timezone: tz,
        mode: b.mode.unwrap_or_default(),
        cache_ttl_secs: None,
        failure_policy: b.failure_policy.unwrap_or_default(),
    };
    commit(&s, vec![row("tenant", &tenant.id, &tenant)]).await?;
    catalog
        .directory
        .tenants
        .insert(tenant.id.to_string(), tenant.clone());
    publish(&s, &catalog);
    Ok((StatusCode::CREATED, Json(tenant)))
}

/// One tenant.
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant}", params(("tenant" = String, Path)), responses((status = 200, body = Object), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_tenant(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(tenant): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    let catalog = s.catalog.lock().await;
    require_admin(&caller.key, &tenant, &catalog)?;
    catalog
        .directory
        .tenants
        .get(&tenant)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::not_found("tenant"))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantPatch {
    pub name: Option<String>,
    /// Platform admins only.
    pub plan: Option<String>,
    pub timezone: Option<String>,
    pub mode: Option<EnforcementMode>,
    /// Platform admins only.
    pub failure_policy: Option<FailurePolicy>,
}

/// Change a tenant. Its plan is changed by a platform admin only.
#[utoipa::path(patch, path = "/v1/admin/tenants/{tenant}", params(("tenant" = String, Path)), request_body = TenantPatch, responses((status = 200, body = Object), (status = 403, body = crate::error::ErrorBody)))]
pub async fn update_tenant(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(tenant): Path<String>,
    body: JsonBody<TenantPatch>,
) -> Result<Json<Tenant>, ApiError> {
    let b = body.value;
    let tz = parse_tz(b.timezone.as_deref())?;
    let mut catalog = s.catalog.lock().await;
    require_admin(&caller.key, &tenant, &catalog)?;
    if b.plan.is_some() || b.failure_policy.is_some() {
        require_platform(&caller.key)?;
    }
    let mut t = catalog
        .directory
        .tenants
        .get(&tenant)
        .cloned()
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    if let Some(p) = b.plan {
        if !catalog.directory.plans.contains_key(&p) {
            return Err(ApiError::bad_request(
                "unknown_plan",
                format!("plan `{p}` does not exist"),
            ));
        }
        t.plan = p;
    }
    if let Some(n) = b.name {
        t.name = n;
    }
    if let Some(tz) = tz {
        t.timezone = tz;
    }
    if let Some(m) = b.mode {
        t.mode = m;
    }
    if let Some(f) = b.failure_policy {
        t.failure_policy = f;
    }
    commit(&s, vec![row("tenant", &t.id, &t)]).await?;
    catalog
        .directory
        .tenants
        .insert(t.id.to_string(), t.clone());
    publish(&s, &catalog);
    Ok(Json(t))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TeamBody {
    pub id: String,
}

/// Create a team.
#[utoipa::path(post, path = "/v1/admin/tenants/{tenant}/teams", params(("tenant" = String, Path)), request_body = TeamBody, responses((status = 201, body = Object)))]
pub async fn create_team(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(tenant): Path<String>,
    body: JsonBody<TeamBody>,
) -> Result<(StatusCode, Json<Team>), ApiError> {
    let mut catalog = s.catalog.lock().await;
    require_admin(&caller.key, &tenant, &catalog)?;
    if !valid_id(&body.value.id) {
        return Err(ApiError::bad_request("invalid_id", "invalid team id"));
    }
    let team = Team {
        tenant: tenant.clone(),
        id: body.value.id,
    };
    commit(
        &s,
        vec![row("team", &format!("{tenant}/{}", team.id), &team)],
    )
    .await?;
    catalog
        .directory
        .teams
        .insert((tenant, team.id.clone()), team.clone());
    publish(&s, &catalog);
    Ok((StatusCode::CREATED, Json(team)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    pub id: String,
    pub team: Option<String>,
    pub role: Option<String>,
}

/// Create a user.
#[utoipa::path(post, path = "/v1/admin/tenants/{tenant}/users", params(("tenant" = String, Path)), request_body = UserBody, responses((status = 201, body = Object)))]
pub async fn create_user(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(tenant): Path<String>,
    body: JsonBody<UserBody>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let mut catalog = s.catalog.lock().await;
    require_admin(&caller.key, &tenant, &catalog)?;
    let b = body.value;
    if !valid_id(&b.id) {
        return Err(ApiError::bad_request("invalid_id", "invalid user id"));
    }
    if let Some(team) = &b.team {
        if !catalog
            .directory
            .teams
            .contains_key(&(tenant.clone(), team.clone()))
        {
            return Err(ApiError::bad_request(
                "unknown_team",
                format!("team `{team}` does not exist"),
            ));
        }
    }
    let user = User {
        tenant: tenant.clone(),
        id: b.id,
        team: b.team.map(Into::into),
        role: b.role.as_deref().unwrap_or("member").into(),
    };
    commit(
        &s,
        vec![row("user", &format!("{tenant}/{}", user.id), &user)],
    )
    .await?;
    catalog
        .directory
        .users
        .insert((tenant, user.id.clone()), user.clone());
    publish(&s, &catalog);
    Ok((StatusCode::CREATED, Json(user)))
}

/// A key as listed: never its secret or hash.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub tenant: Option<String>,
    pub team: Option<String>,
    pub user: Option<String>,
    #[schema(value_type = String)]
    pub kind: KeyKind,
    pub role: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The response cache's TTL for this key's calls, when the key has its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_ttl_secs: Option<u32>,
}

impl From<&ApiKey> for KeyView {
    fn from(k: &ApiKey) -> Self {
        KeyView {
            id: k.id,
            name: k.name.to_string(),
            prefix: k.prefix.to_string(),
            tenant: k.tenant.as_deref().map(str::to_string),
            team: k.team.as_deref().map(str::to_string),
            user: k.user.as_deref().map(str::to_string),
            kind: k.kind,
            role: k.role.as_deref().map(str::to_string),
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
            cache_ttl_secs: k.cache_ttl_secs,
        }
    }
}

/// A new key: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub secret: String,
    pub key: KeyView,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    pub name: String,
    /// `member` (default) or `tenant_admin`.
    #[schema(value_type = Option<String>)]
    pub kind: Option<KeyKind>,
    pub team: Option<String>,
    pub user: Option<String>,
    pub role: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The response cache for this key's calls (seconds, 1 to 30 days), even where its
    /// tenant has none.
    pub cache_ttl_secs: Option<u32>,
}

/// Keys of a tenant.
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant}/keys", params(("tenant" = String, Path)), responses((status = 200, body = Vec<KeyView>)))]
pub async fn list_keys(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(tenant): Path<String>,
) -> Result<Json<Vec<KeyView>>, ApiError> {
    let catalog = s.catalog.lock().await;
    require_admin(&caller.key, &tenant, &catalog)?;
    Ok(Json(
        s.engine
            .keys_of(Some(&tenant))
            .iter()
            .map(|k| KeyView::from(k.as_ref()))
            .collect(),
    ))
}

/// Create a key; its secret is in this answer and nowhere else.
#[utoipa::path(post, path = "/v1/admin/tenants/{tenant}/keys", params(("tenant" = String, Path)), request_body = KeyBody, responses((status = 201, body = CreatedKey)))]
pub async fn create_key(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(tenant): Path<String>,
    body: JsonBody<KeyBody>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let catalog = s.catalog.lock().await;
    require_admin(&caller.key, &tenant, &catalog)?;
    let b = body.value;
    let kind = b.kind.unwrap_or(KeyKind::Member);
    if kind == KeyKind::PlatformAdmin {
        return Err(ApiError::bad_request(
            "invalid_request",
            "platform admin keys are declared in the configuration file",
        ));
    }
    if b.name.is_empty() || b.name.len() > 200 {
        return Err(ApiError::bad_request(
            "invalid_request",
            "name must have 1 to 200 characters",
        ));
    }
    if let Some(team) = &b.team {
        if !catalog
            .directory
            .teams
            .contains_key(&(tenant.clone(), team.clone()))
        {
            return Err(ApiError::bad_request(
                "unknown_team",
                format!("team `{team}` does not exist"),
            ));
        }
    }
    if let Some(user) = &b.user {
        if !catalog
            .directory
            .users
            .contains_key(&(tenant.clone(), user.clone()))
        {
            return Err(ApiError::bad_request(
                "unknown_user",
                format!("user `{user}` does not exist"),
            ));
        }
    }
    let now = s.clock.now();
    if b.expires_at.is_some_and(|e| e <= now) {
        return Err(ApiError::bad_request(
            "invalid_request",
            "expires_at is in the past",
        ));
    }
    if b.cache_ttl_secs
        .is_some_and(|t| t == 0 || u64::from(t) > bursar_core::config::MAX_CACHE_TTL_SECS)
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "cache_ttl_secs must be 1 to {}",
                bursar_core::config::MAX_CACHE_TTL_SECS
            ),
        ));
    }
    let secret = format!(
        "{KEY_SECRET_PREFIX}{}",
        Alphanumeric.sample_string(&mut rand::rng(), KEY_SECRET_CHARS)
    );
    let key = ApiKey {
        id: Uuid::now_v7(),
        name: b.name.into(),
        hash: KeyHash::of(&secret),
        prefix: secret.chars().take(8).collect::<String>().into(),
        tenant: Some(tenant.into()),
        team: b.team.map(Into::into),
        user: b.user.map(Into::into),
        kind,
        role: b.role.map(Into::into),
        created_at: now,
        expires_at: b.expires_at,
        revoked_at: None,
        cache_ttl_secs: b.cache_ttl_secs,
    };
    commit(&s, vec![key_row(&key)]).await?;
    let view = KeyView::from(&key);
    s.engine.upsert_key(key);
    Ok((StatusCode::CREATED, Json(CreatedKey { secret, key: view })))
}

/// Revoke a key at once.
#[utoipa::path(post, path = "/v1/admin/tenants/{tenant}/keys/{key}/revoke", params(("tenant" = String, Path), ("key" = String, Path)), responses((status = 200, body = KeyView)))]
pub async fn revoke_key(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path((tenant, key_id)): Path<(String, String)>,
) -> Result<Json<KeyView>, ApiError> {
    let catalog = s.catalog.lock().await;
    require_admin(&caller.key, &tenant, &catalog)?;
    let id = Uuid::parse_str(&key_id).map_err(|_| ApiError::not_found("key"))?;
    let key = s
        .engine
        .key_by_id(&id)
        .filter(|k| k.tenant.as_deref() == Some(tenant.as_str()))
        .ok_or_else(|| ApiError::not_found("key"))?;
    let mut k = key.as_ref().clone();
    if k.revoked_at.is_none() {
        k.revoked_at = Some(s.clock.now());
    }
    commit(&s, vec![key_row(&k)]).await?;
    let view = KeyView::from(&k);
    s.engine.upsert_key(k);
    Ok(Json(view))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetBody {
    pub id: String,
    /// tenant, team, user, api_key, end_user, workflow, campaign, agent, feature, task, tag:NAME
    pub scope: String,
    /// One value of the scope; absent: every value has its own counter.
    pub value: Option<String>,
    /// daily, weekly, monthly, lifetime, rolling:Nm|Nh|Nd
    pub window: String,
    /// USD, exact decimal string.
    pub limit: String,
    pub warn_percent: Option<u8>,
    pub emergency_percent: Option<u8>,
    #[schema(value_type = Option<String>)]
    pub emergency_action: Option<EmergencyAction>,
    #[serde(default)]
    pub rollover: bool,
}

/// A budget with its live counters.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetDetail {
    #[schema(value_type = Object)]
    pub budget: Budget,
    pub buckets: Vec<BucketView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BucketView {
    pub value: String,
    pub period_start: i64,
    pub held: Money,
    pub spent: Money,
}

fn bucket_views(v: Vec<(BucketKey, Counter)>) -> Vec<BucketView> {
    v.into_iter()
        .map(|(k, c)| BucketView {
            value: k.value.to_string(),
            period_start: k.period_start,
            held: c.held,
            spent: c.spent,
        })
        .collect()
}

/// Budgets of a tenant (plan defaults included).
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant}/budgets", params(("tenant" = String, Path)), responses((status = 200, body = Object)))]
pub async fn list_budgets(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(tenant): Path<String>,
) -> Result<Json<Vec<Budget>>, ApiError> {
    let catalog = s.catalog.lock().await;
    require_admin(&caller.key, &tenant, &catalog)?;
    let set = s.engine.budgets();
    let mut v: Vec<Budget> = set
        .by_tenant
        .get(&tenant)
        .map(|b| b.iter().map(|b| b.as_ref().clone()).collect())
        .unwrap_or_default();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(v))
}

/// Create or replace a budget of a tenant (tenant admins and platform admins).
#[utoipa::path(post, path = "/v1/admin/tenants/{tenant}/budgets", params(("tenant" = String, Path)), request_body = BudgetBody, responses((status = 201, body = Object), (status = 403, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
pub async fn create_budget(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(tenant): Path<String>,
    body: JsonBody<BudgetBody>,
) -> Result<(StatusCode, Json<Budget>), ApiError> {
    let mut catalog = s.catalog.lock().await;
    require_admin(&caller.key, &tenant, &catalog)?;
    let b = body.value;
    if !valid_id(&b.id) {
        return Err(ApiError::bad_request(
            "invalid_id",
            "ids are 1-64 characters of a-z, A-Z, 0-9, - _ . :",
        ));
    }
    if b.scope == "global" {
        return Err(ApiError::bad_request(
            "invalid_scope",
            "a tenant budget cannot be global",
        ));
    }
    let spec = parse_budget_spec(
        &b.scope,
        b.value.as_deref(),
        &b.window,
        &b.limit,
        b.warn_percent,
        b.emergency_percent,
        b.emergency_action,
        b.rollover,
    )
    .map_err(|problems| {
        let code = if problems.iter().any(|p| p.contains("decimal places")) {
            "amount_too_precise"
        } else {
            "invalid_budget"
        };
        ApiError::bad_request(code, problems.join("; "))
    })?;
    let id = format!("{tenant}.{}", b.id);
    let budget = Budget::new(id.clone(), Some(tenant), spec);
    commit(&s, vec![row("budget", &id, &budget)]).await?;
    catalog.api_budgets.insert(id, budget.clone());
    s.engine.set_budgets(catalog.budget_set());
    Ok((StatusCode::CREATED, Json(budget)))
}

fn find_budget(s: &Services, tenant: &str, budget: &str) -> Result<Budget, ApiError> {
    let set = s.engine.budgets();
    set.by_tenant
        .get(tenant)
        .and_then(|v| {
            v.iter()
                .find(|b| b.id == budget || b.id == format!("{tenant}.{budget}"))
        })
        .map(|b| b.as_ref().clone())
        .ok_or_else(|| ApiError::not_found("budget"))
}

/// A budget and its counters.
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant}/budgets/{budget}", params(("tenant" = String, Path), ("budget" = String, Path)), responses((status = 200, body = BudgetDetail)))]
pub async fn get_budget(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path((tenant, budget)): Path<(String, String)>,
) -> Result<Json<BudgetDetail>, ApiError> {
    let catalog = s.catalog.lock().await;
    require_admin(&caller.key, &tenant, &catalog)?;
    let b = find_budget(&s, &tenant, &budget)?;
    let buckets = bucket_views(s.engine.buckets_of(&b.id));
    Ok(Json(BudgetDetail { budget: b, buckets }))
}

/// Delete a budget created through the API.
#[utoipa::path(delete, path = "/v1/admin/tenants/{tenant}/budgets/{budget}", params(("tenant" = String, Path), ("budget" = String, Path)), responses((status = 204), (status = 409, body = crate::error::ErrorBody)))]
pub async fn delete_budget(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path((tenant, budget)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let mut catalog = s.catalog.lock().await;
    require_admin(&caller.key, &tenant, &catalog)?;
    let b = find_budget(&s, &tenant, &budget)?;
    if !catalog.api_budgets.contains_key(&b.id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "budget_not_deletable",
            "this budget comes from the configuration file or the plan; change it there",
        ));
    }
    commit(
        &s,
        vec![CatalogRow {
            kind: "budget".into(),
            id: b.id.clone(),
            body: None,
        }],
    )
    .await?;
    catalog.api_budgets.remove(&b.id);
    s.engine.set_budgets(catalog.budget_set());
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub limit: Option<u32>,
    /// Unix milliseconds.
    pub since_ms: Option<i64>,
}

/// Alerts of a tenant, newest first.
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant}/alerts", params(("tenant" = String, Path)), responses((status = 200, body = Object)))]
pub async fn list_alerts(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(tenant): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<AlertRow>>, ApiError> {
    {
        let catalog = s.catalog.lock().await;
        require_admin(&caller.key, &tenant, &catalog)?;
    }
    s.caught_up().await;
    Ok(Json(
        s.reader
            .alerts(Some(&tenant), q.limit.unwrap_or(100).min(MAX_ALERTS_LISTED))
            .await?,
    ))
}

/// Spend of a tenant by model since a time.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantUsage {
    pub tenant: String,
    pub since_ms: i64,
    pub cost: Money,
    pub charge: Money,
    pub margin: Money,
    #[schema(value_type = Object)]
    pub by_model: Vec<UsageRow>,
    #[schema(value_type = Object)]
    pub budgets: BTreeMap<String, Vec<BucketView>>,
}

/// Spend, charge and margin of a tenant by model.
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant}/usage", params(("tenant" = String, Path)), responses((status = 200, body = TenantUsage)))]
pub async fn tenant_usage(
    State(s): State<Arc<Services>>,
    Authed(caller): Authed,
    Path(tenant): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<TenantUsage>, ApiError> {
    {
        let catalog = s.catalog.lock().await;
        require_admin(&caller.key, &tenant, &catalog)?;
    }
    let since_ms = q.since_ms.unwrap_or(0);
    s.caught_up().await;
    let by_model = s.reader.usage_by_model(&tenant, since_ms).await?;
    let cost: Money = by_model.iter().map(|r| r.cost).sum();
    let charge: Money = by_model.iter().map(|r| r.charge).sum();
    let set = s.engine.budgets();
    let mut budgets = BTreeMap::new();
    for b in set.by_tenant.get(&tenant).into_iter().flatten() {
        budgets.insert(b.id.clone(), bucket_views(s.engine.buckets_of(&b.id)));
    }
    Ok(Json(TenantUsage {
        tenant,
        since_ms,
        cost,
        charge,
        margin: charge - cost,
        by_model,
        budgets,
    }))
}
