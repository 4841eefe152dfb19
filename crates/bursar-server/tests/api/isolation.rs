//! Promise 5: a tenant's key never reads or changes another tenant's data; a member key
//! never changes budgets.

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;
use crate::store_test;

store_test!(a_tenant_key_gets_404_on_every_resource_of_another_tenant);
async fn a_tenant_key_gets_404_on_every_resource_of_another_tenant(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    // Resources of tenant b that exist.
    let p = app
        .authorize(
            B_MEMBER,
            json!({"model": "gpt-4o-mini", "prompt_tokens": 10, "max_tokens": 10}),
        )
        .await;
    let auth_b = p.body["authorization_id"].as_str().unwrap().to_string();
    let key = app
        .post("/v1/admin/tenants/b/keys", B_ADMIN, json!({"name": "x"}))
        .await;
    let key_b = key.body["key"]["id"].as_str().unwrap().to_string();
    let r = app
        .post(
            "/v1/admin/tenants/b/budgets",
            B_ADMIN,
            json!({"id": "bb", "scope": "tenant", "window": "daily", "limit": "5"}),
        )
        .await;
    assert_eq!(r.status, 201);

    let budget = json!({"id": "evil", "scope": "tenant", "window": "daily", "limit": "1"});
    let calls: Vec<(Method, String, Option<serde_json::Value>)> = vec![
        (Method::GET, "/v1/admin/tenants/b".into(), None),
        (
            Method::PATCH,
            "/v1/admin/tenants/b".into(),
            Some(json!({"mode": "off"})),
        ),
        (
            Method::POST,
            "/v1/admin/tenants/b/teams".into(),
            Some(json!({"id": "t"})),
        ),
        (
            Method::POST,
            "/v1/admin/tenants/b/users".into(),
            Some(json!({"id": "u"})),
        ),
        (Method::GET, "/v1/admin/tenants/b/keys".into(), None),
        (
            Method::POST,
            "/v1/admin/tenants/b/keys".into(),
            Some(json!({"name": "n"})),
        ),
        (
            Method::POST,
            format!("/v1/admin/tenants/b/keys/{key_b}/revoke"),
            Some(json!({})),
        ),
        (Method::GET, "/v1/admin/tenants/b/budgets".into(), None),
        (
            Method::POST,
            "/v1/admin/tenants/b/budgets".into(),
            Some(budget),
        ),
        (Method::GET, "/v1/admin/tenants/b/budgets/bb".into(), None),
        (
            Method::DELETE,
            "/v1/admin/tenants/b/budgets/bb".into(),
            None,
        ),
        (Method::GET, "/v1/admin/tenants/b/alerts".into(), None),
        (Method::GET, "/v1/admin/tenants/b/usage".into(), None),
        (Method::GET, format!("/v1/authorizations/{auth_b}"), None),
        (
            Method::POST,
            format!("/v1/authorizations/{auth_b}/settle"),
            Some(json!({})),
        ),
        (
            Method::POST,
            format!("/v1/authorizations/{auth_b}/void"),
            Some(json!({})),
        ),
    ];
    for key in [A_ADMIN, A_MEMBER] {
        for (method, path, body) in &calls {
            let r = app
                .send(method.clone(), path, key, body.as_ref(), None)
                .await;
            assert_eq!(
                r.status, 404,
                "{method} {path} with a tenant-a key: {:?}",
                r.body
            );
        }
    }
    // Nothing of b changed: its hold is still open, its key active, its budget there.
    let v = app
        .get(&format!("/v1/authorizations/{auth_b}"), B_MEMBER)
        .await;
    assert_eq!(v.body["state"], "held");
    let keys = app.get("/v1/admin/tenants/b/keys", B_ADMIN).await;
    assert!(keys
        .body
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["revoked_at"].is_null()));
    assert_eq!(
        app.get("/v1/admin/tenants/b/budgets/bb", B_ADMIN)
            .await
            .status,
        200
    );
    // The tenant list of a tenant admin holds only its own tenant.
    let list = app.get("/v1/admin/tenants", A_ADMIN).await;
    assert_eq!(list.body.as_array().unwrap().len(), 1);
    assert_eq!(list.body[0]["id"], "a");
}

store_test!(a_member_key_never_changes_budgets);
async fn a_member_key_never_changes_budgets(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let body = json!({"id": "mine", "scope": "tenant", "window": "daily", "limit": "1000"});
    let r = app
        .post("/v1/admin/tenants/a/budgets", A_MEMBER, body)
        .await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    let r = app
        .send(
            Method::DELETE,
            "/v1/admin/tenants/a/budgets/a-month",
            A_MEMBER,
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 403);
    let r = app
        .send(
            Method::PATCH,
            "/v1/admin/tenants/a",
            A_MEMBER,
            Some(&json!({"mode": "off"})),
            None,
        )
        .await;
    assert_eq!(r.status, 403);
    let r = app
        .post(
            "/v1/admin/tenants/a/keys",
            A_MEMBER,
            json!({"name": "k", "kind": "tenant_admin"}),
        )
        .await;
    assert_eq!(r.status, 403);
    // A member reads its own usage.
    let u = app.get("/v1/usage", A_MEMBER).await;
    assert_eq!(u.status, 200);
    assert!(u.body["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["budget_id"] == "a-month"));
}

store_test!(only_a_platform_admin_sets_a_plan);
async fn only_a_platform_admin_sets_a_plan(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let r = app
        .send(
            Method::PATCH,
            "/v1/admin/tenants/a",
            A_ADMIN,
            Some(&json!({"plan": "free"})),
            None,
        )
        .await;
    assert_eq!(r.status, 403);
    let r = app
        .send(
            Method::PATCH,
            "/v1/admin/tenants/a",
            ADMIN,
            Some(&json!({"plan": "free"})),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["plan"], "free");
    // The free plan allows only small models for 100 tokens: the plan is inherited at once.
    let p = app
        .authorize(A_MEMBER, json!({"model": "gpt-4o", "prompt_tokens": 10}))
        .await;
    assert_eq!(p.status, 403);
    let p = app
        .authorize(
            A_MEMBER,
            json!({"model": "gpt-4o-mini", "prompt_tokens": 10}),
        )
        .await;
    assert_eq!(p.body["max_tokens"], 100);
    // A platform admin key does not spend.
    let p = app
        .authorize(ADMIN, json!({"model": "gpt-4o-mini", "prompt_tokens": 10}))
        .await;
    assert_eq!((p.status, p.code()), (403, "admin_key_cannot_spend"));
}

store_test!(secrets_are_shown_once_and_never_listed);
async fn secrets_are_shown_once_and_never_listed(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let k = app
        .post("/v1/admin/tenants/a/keys", A_ADMIN, json!({"name": "once"}))
        .await;
    let secret = k.body["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("bsr_") && secret.len() == 44);
    let list = app.get("/v1/admin/tenants/a/keys", A_ADMIN).await;
    let text = list.body.to_string();
    assert!(!text.contains(&secret));
    assert!(!text.contains("sha256"));
    let stored: Vec<u8> = match &app.place.location {
        bursar_store::Location::Sqlite(path) => {
            let mut bytes = std::fs::read(path).unwrap();
            bytes.extend(std::fs::read(path.with_extension("db-wal")).unwrap_or_default());
            bytes
        }
        bursar_store::Location::Postgres(url) => {
            // Every text the database holds, table by table.
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'",
            )
            .fetch_all(&mut c)
            .await
            .unwrap();
            let mut all = Vec::new();
            for t in tables {
                let q = format!("SELECT COALESCE(string_agg(x::text, ''), '') FROM \"{t}\" x");
                let text: String = sqlx::query_scalar(sqlx::AssertSqlSafe(q))
                    .fetch_one(&mut c)
                    .await
                    .unwrap();
                all.extend(text.into_bytes());
            }
            all
        }
    };
    assert!(!stored.is_empty());
    assert!(
        !stored.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the secret is not stored"
    );
}

store_test!(a_tenant_admin_builds_its_tenant_through_the_api);
/// A tenant admin creates a team, a user in it and a key for the user; the user's calls
/// then count against a budget of the team, which a member key cannot change.
async fn a_tenant_admin_builds_its_tenant_through_the_api(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    // (what, body, the answer's status and code)
    let steps = [
        ("teams", json!({"id": "growth"}), 201, ""),
        ("users", json!({"id": "bea", "team": "growth"}), 201, ""),
        // A user in a team that does not exist is refused.
        (
            "users",
            json!({"id": "bob", "team": "nowhere"}),
            422,
            "unknown_team",
        ),
        // The team's budget fits one call of $0.00021.
        (
            "budgets",
            json!({"id": "growth-day", "scope": "team", "value": "growth", "window": "daily", "limit": "0.00021"}),
            201,
            "",
        ),
        ("keys", json!({"name": "bea's", "user": "bea"}), 201, ""),
    ];
    let mut secret = String::new();
    for (what, body, status, code) in steps {
        let r = app
            .post(&format!("/v1/admin/tenants/b/{what}"), B_ADMIN, body)
            .await;
        assert_eq!((r.status, r.code()), (status, code), "{what}: {:?}", r.body);
        if what == "keys" {
            secret = r.body["secret"].as_str().unwrap().to_string();
        }
    }
    let ask = json!({"model": "gpt-4o-mini", "prompt_tokens": 1000, "max_tokens": 100});
    let p = app.authorize(&secret, ask.clone()).await;
    assert_eq!(p.status, 200, "{:?}", p.body);
    let view = p.body["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["budget_id"] == "b.growth-day")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (view["value"].as_str(), view["remaining"].as_str()),
        (Some("growth"), Some("0"))
    );
    let d = app.authorize(&secret, ask.clone()).await;
    assert_eq!((d.status, d.code()), (402, "budget_exceeded"));
    // Outside the team, the tenant's other keys are not held by it.
    assert_eq!(app.authorize(B_MEMBER, ask).await.status, 200);
    // A member key of the team cannot lift its budget.
    let r = app
        .post(
            "/v1/admin/tenants/b/budgets",
            &secret,
            json!({"id": "growth-day", "scope": "team", "value": "growth", "window": "daily", "limit": "100"}),
        )
        .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
}
