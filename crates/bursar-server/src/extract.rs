//! Extractors: the caller's key and strictly parsed JSON bodies, each failing with a
//! clear, stable error in Bursar's error format.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use bursar_core::engine::Caller;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::Services;

/// The key presented as `Authorization: Bearer …` (OpenAI SDKs) or `x-api-key`
/// (Anthropic SDKs).
pub struct Authed(pub Caller);

impl FromRequestParts<Arc<Services>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Arc<Services>) -> Result<Self, ApiError> {
        identify(s, &parts.headers).map(Authed)
    }
}

/// The caller of a request, by its key (unknown, revoked and expired keys are 401s).
pub fn identify(s: &Services, headers: &axum::http::HeaderMap) -> Result<Caller, ApiError> {
    let Some(secret) = secret_of(headers) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "send an API key as `Authorization: Bearer <key>` or `x-api-key`",
        ));
    };
    Ok(s.engine.identify(secret, s.clock.now())?)
}

/// The key of a request: `Authorization: Bearer …`, else `x-api-key`.
fn secret_of(headers: &axum::http::HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    bearer
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        })
        .filter(|s| !s.is_empty())
}

/// A JSON body parsed into `T` (whose unknown fields are refused), plus its raw bytes for
/// fingerprinting.
pub struct JsonBody<T> {
    pub value: T,
    pub raw: Bytes,
}

impl<T: DeserializeOwned> FromRequest<Arc<Services>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, s: &Arc<Services>) -> Result<Self, ApiError> {
        let raw = Bytes::from_request(req, s).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the request body is larger than {} bytes", s.max_body_bytes),
                )
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text())
            }
        })?;
        let value = parse_json(&raw)?;
        Ok(JsonBody { value, raw })
    }
}

/// Parses JSON: malformed text is 400 `invalid_json`; well-formed JSON of the wrong shape
/// (unknown or missing fields, wrong types, negative counts) is 422 `invalid_request`.
pub fn parse_json<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(raw).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::bad_request("invalid_request", format!("invalid request: {e}"))
        }
        _ => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("malformed JSON: {e}"),
        ),
    })
}
