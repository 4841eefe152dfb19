//! Every bad input gets a clear error with a stable code, and loses nothing recorded.

use std::time::Duration;

use bursar_core::ledger::EntryKind;
use bursar_core::Money;
use serde_json::json;

use crate::helpers::*;
use crate::store_test;

struct Case {
    body: &'static str,
    status: u16,
    code: &'static str,
}

store_test!(bad_authorize_requests);
async fn bad_authorize_requests(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let cases = [
        Case {
            body: "{not json",
            status: 400,
            code: "invalid_json",
        },
        Case {
            body: "",
            status: 400,
            code: "invalid_json",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini","prompt_tokens":5,"colour":"red"}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"prompt_tokens":5}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini"}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini","prompt_tokens":5,"api":"web_search"}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini","prompt_tokens":-5}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini","prompt_tokens":"five"}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini","prompt_tokens":5,"max_tokens":-1}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini","prompt_tokens":5,"max_tokens":0}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini","prompt_tokens":999999999999}"#,
            status: 422,
            code: "prompt_too_long",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini","prompt_tokens":200000}"#,
            status: 422,
            code: "prompt_too_long",
        },
        Case {
            body: r#"{"model":"gpt-5-turbo-ultra","prompt_tokens":5}"#,
            status: 422,
            code: "unknown_model",
        },
        Case {
            body: r#"{"api":"teleport","quantity":1}"#,
            status: 422,
            code: "unknown_api",
        },
        Case {
            body: r#"{"api":"web_search","quantity":0}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"api":"web_search","quantity":99999999999}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini","prompt_tokens":5,"tags":{"planet":"mars"}}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini","prompt_tokens":5,"ttl_seconds":0}"#,
            status: 422,
            code: "invalid_request",
        },
        Case {
            body: r#"{"model":"gpt-4o-mini","messages":[{"role":"user"}]}"#,
            status: 422,
            code: "invalid_request",
        },
    ];
    for c in &cases {
        let r = app
            .raw_post("/v1/authorizations", A_MEMBER, c.body.as_bytes().to_vec())
            .await;
        assert_eq!(
            (r.status, r.code()),
            (c.status, c.code),
            "{} → {:?}",
            c.body,
            r.body
        );
        assert!(!r.body["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    // None of them held anything.
    assert_eq!(app.services.engine.open_holds(), 0);
    let entries = app.entries().await;
    assert!(entries.is_empty());
}

store_test!(oversized_bodies_and_missing_keys);
async fn oversized_bodies_and_missing_keys(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let big = format!(
        r#"{{"model":"gpt-4o-mini","prompt":"{}"}}"#,
        "a".repeat(2 << 20)
    );
    let r = app
        .raw_post("/v1/authorizations", A_MEMBER, big.into_bytes())
        .await;
    assert_eq!((r.status, r.code()), (413, "body_too_large"));
    let r = app
        .http
        .post(format!("{}/v1/authorizations", app.base))
        .json(&json!({"model": "gpt-4o-mini", "prompt_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_api_key");
    let r = app.get("/v1/nowhere", A_MEMBER).await;
    assert_eq!(r.status, 404);
}

store_test!(bad_settles_each_have_their_code_and_lose_nothing);
async fn bad_settles_each_have_their_code_and_lose_nothing(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let ask = json!({"model": "gpt-4o-mini", "prompt_tokens": 100, "max_tokens": 10});
    let usage =
        json!({"usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 10}});
    // Unknown, and not even an id.
    let r = app
        .settle(
            A_MEMBER,
            "0190c6a5-0000-7000-8000-000000000000",
            usage.clone(),
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "authorization_not_found"));
    let r = app.settle(A_MEMBER, "not-an-id", usage.clone()).await;
    assert_eq!((r.status, r.code()), (404, "authorization_not_found"));
    let r = app
        .post(
            "/v1/authorizations/0190c6a5-0000-7000-8000-000000000000/void",
            A_MEMBER,
            json!({}),
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "authorization_not_found"));
    // Voided, then settled.
    let p = app.authorize(A_MEMBER, ask.clone()).await;
    let voided = p.body["authorization_id"].as_str().unwrap().to_string();
    let v = app
        .post(
            &format!("/v1/authorizations/{voided}/void"),
            A_MEMBER,
            json!({"reason": "provider 500"}),
        )
        .await;
    assert_eq!((v.status, v.body["cost"].as_str()), (200, Some("0")));
    let r = app.settle(A_MEMBER, &voided, usage.clone()).await;
    assert_eq!((r.status, r.code()), (409, "authorization_voided"));
    // Settled, then settled with other usage, then voided.
    let p = app.authorize(A_MEMBER, ask.clone()).await;
    let settled = p.body["authorization_id"].as_str().unwrap().to_string();
    assert_eq!(
        app.settle(A_MEMBER, &settled, usage.clone()).await.status,
        200
    );
    let other =
        json!({"usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 9}});
    let r = app.settle(A_MEMBER, &settled, other).await;
    assert_eq!((r.status, r.code()), (409, "authorization_already_settled"));
    let r = app
        .post(
            &format!("/v1/authorizations/{settled}/void"),
            A_MEMBER,
            json!({}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "authorization_already_settled"));
    // Impossible usage: refused, and the hold stays open (it will expire and be charged).
    let p = app.authorize(A_MEMBER, ask.clone()).await;
    let open = p.body["authorization_id"].as_str().unwrap().to_string();
    let r = app
        .settle(
            A_MEMBER,
            &open,
            json!({"usage": {"input_tokens": 10, "cached_input_tokens": 20, "output_tokens": 1}}),
        )
        .await;
    assert_eq!((r.status, r.code()), (422, "invalid_usage"));
    let r = app
        .settle(A_MEMBER, &open, json!({"usage": {"input_tokens": 10, "cached_input_tokens": 0, "output_tokens": 1}, "model_used": "gpt-nine"}))
        .await;
    assert_eq!((r.status, r.code()), (422, "unknown_model"));
    let r = app
        .settle(A_MEMBER, &open, json!({"usage": {"input_tokens": -1}}))
        .await;
    assert_eq!((r.status, r.code()), (422, "invalid_request"));
    // More tokens than any model reads or writes.
    let r = app
        .settle(A_MEMBER, &open, json!({"usage": {"input_tokens": 1_000_000_000_000u64, "cached_input_tokens": 0, "output_tokens": 1}}))
        .await;
    assert_eq!((r.status, r.code()), (422, "invalid_usage"));
    assert_eq!(app.services.engine.open_holds(), 1);
    let v = app.verify().await;
    assert!(v.ok(), "{:?}", v.problems);
    assert_eq!(v.entries, 5);
    // Expired (and charged by policy), then voided: refused, and the charge stands.
    app.clock.advance(Duration::from_secs(61));
    app.services.sweep().await.unwrap();
    assert_eq!(app.services.engine.open_holds(), 0);
    let r = app
        .post(
            &format!("/v1/authorizations/{open}/void"),
            A_MEMBER,
            json!({}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "authorization_expired"));
    let entries = app.entries().await;
    assert_eq!(
        entries.len(),
        6,
        "the expiry, and nothing for the refused void"
    );
    assert_eq!(entries[5].kind, EntryKind::Expire);
    assert!(entries[5].cost_delta > Money::ZERO);
}

store_test!(bad_admin_input);
async fn bad_admin_input(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    let cases = [
        (
            json!({"id": "x", "scope": "tenant", "window": "daily", "limit": "0.0000000001"}),
            "amount_too_precise",
        ),
        (
            json!({"id": "x", "scope": "tenant", "window": "daily", "limit": "-3"}),
            "invalid_budget",
        ),
        (
            json!({"id": "x", "scope": "tenant", "window": "daily", "limit": "lots"}),
            "invalid_budget",
        ),
        (
            json!({"id": "x", "scope": "tenant", "window": "hourly", "limit": "3"}),
            "invalid_budget",
        ),
        (
            json!({"id": "x", "scope": "galaxy", "window": "daily", "limit": "3"}),
            "invalid_budget",
        ),
        (
            json!({"id": "x", "scope": "tenant", "window": "daily", "limit": "3", "warn_percent": 95, "emergency_percent": 90}),
            "invalid_budget",
        ),
        (
            json!({"id": "x y", "scope": "tenant", "window": "daily", "limit": "3"}),
            "invalid_id",
        ),
        (
            json!({"id": "x", "scope": "global", "window": "daily", "limit": "3"}),
            "invalid_scope",
        ),
    ];
    for (body, code) in cases {
        let r = app
            .post("/v1/admin/tenants/a/budgets", A_ADMIN, body.clone())
            .await;
        assert_eq!((r.status, r.code()), (422, code), "{body} → {:?}", r.body);
    }
    let r = app
        .post(
            "/v1/admin/tenants",
            ADMIN,
            json!({"id": "c", "plan": "pro", "timezone": "Europe/Atlantis"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (422, "invalid_timezone"));
    let r = app
        .post(
            "/v1/admin/tenants",
            ADMIN,
            json!({"id": "c", "plan": "platinum"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (422, "unknown_plan"));
    let r = app
        .post(
            "/v1/admin/tenants",
            ADMIN,
            json!({"id": "a", "plan": "pro"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "already_exists"));
    let r = app
        .post(
            "/v1/admin/tenants",
            A_ADMIN,
            json!({"id": "c", "plan": "pro"}),
        )
        .await;
    assert_eq!(r.status, 403);
    let r = app
        .post(
            "/v1/admin/tenants",
            ADMIN,
            json!({"id": "c", "plan": "pro", "timezone": "Asia/Tokyo"}),
        )
        .await;
    assert_eq!(r.status, 201);
}

store_test!(operations_endpoints);
async fn operations_endpoints(place: Place) {
    let app = spawn_app_at(CONFIG, place).await;
    assert_eq!(app.get("/healthz", "").await.status, 200);
    assert_eq!(app.get("/readyz", "").await.status, 200);
    app.authorize(
        A_MEMBER,
        json!({"model": "gpt-4o-mini", "prompt_tokens": 5}),
    )
    .await;
    let m = app.get("/metrics", "").await;
    let text = m.body.as_str().unwrap();
    assert!(text.contains("bursar_decisions_total"), "{text}");
    let doc = app.get("/openapi.json", "").await;
    assert_eq!(doc.status, 200);
    for path in [
        "/v1/authorizations",
        "/v1/authorizations/{id}/settle",
        "/v1/admin/tenants/{tenant}/budgets",
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/embeddings",
        "/v1/models",
    ] {
        assert!(
            doc.body["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc.body["components"]["schemas"]["Permit"].is_object());
}
