//! The one error type of the HTTP edge.
//!
//! Every error has an HTTP status and a stable machine-readable `code`, and is written
//! as OpenAI-style error JSON: `{"error": {"message", "type", "code", "param"}}`. A 5xx
//! never carries internal details: those are logged once, here, with the request id.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bursar_core::engine::{Denial, DenyCode, FinishCode, FinishError};
use bursar_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
}

/// The error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// The error family (`invalid_request_error`, `authentication_error`, ...).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Bursar's stable code, e.g. `budget_exceeded`.
    pub code: &'static str,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    /// Redis could not be reached and the tenant fails closed.
    pub fn rate_limiter_unavailable(detail: String) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "rate_limiter_unavailable",
            detail,
        );
        e.retry_after = Some(std::time::Duration::from_secs(1));
        e
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            402 => "insufficient_quota",
            403 => "permission_error",
            404 => "not_found_error",
            409 => "conflict_error",
            429 => "rate_limit_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, error = %self.message, "request failed");
        }
        let message = if self.status.is_server_error() {
            match self.code {
                "store_unavailable" => {
                    "the ledger store is unavailable; no money was held (fail closed)".to_string()
                }
                "rate_limiter_unavailable" => {
                    "the rate limiter (Redis) is unavailable; no money was held (fail closed)"
                        .to_string()
                }
                _ => "internal error".to_string(),
            }
        } else {
            self.message.clone()
        };
        let body = ErrorBody {
            error: ErrorDetail {
                message,
                kind: self.kind(),
                code: self.code,
                param: None,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            // Whole seconds, rounded up: a client that waits this long will fit.
            let secs = wait.as_millis().div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

pub fn deny_status(code: DenyCode) -> StatusCode {
    match code {
        DenyCode::InvalidApiKey | DenyCode::ApiKeyRevoked | DenyCode::ApiKeyExpired => {
            StatusCode::UNAUTHORIZED
        }
        DenyCode::AdminKeyCannotSpend
        | DenyCode::TenantNotFound
        | DenyCode::FeatureNotInPlan
        | DenyCode::TaskNotInPlan
        | DenyCode::ModelClassNotAllowed => StatusCode::FORBIDDEN,
        DenyCode::UnknownModel
        | DenyCode::UnknownApi
        | DenyCode::NoPriceInEffect
        | DenyCode::PromptTooLong
        | DenyCode::InvalidRequest
        | DenyCode::ExceedsRateLimitCapacity => StatusCode::UNPROCESSABLE_ENTITY,
        DenyCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        DenyCode::BudgetExceeded => StatusCode::PAYMENT_REQUIRED,
        DenyCode::IdempotencyKeyReused => StatusCode::CONFLICT,
        // Never reaches a caller (the edge asks for the lease); if it did, try again.
        DenyCode::LeaseNeeded => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<Denial> for ApiError {
    fn from(d: Denial) -> Self {
        ApiError {
            status: deny_status(d.code),
            code: d.code.as_str(),
            message: d.message,
            retry_after: d.retry_after,
        }
    }
}

impl From<FinishError> for ApiError {
    fn from(e: FinishError) -> Self {
        let status = match e.code {
            FinishCode::AuthorizationNotFound => StatusCode::NOT_FOUND,
            FinishCode::AuthorizationExpired
            | FinishCode::AuthorizationVoided
            | FinishCode::AuthorizationAlreadySettled => StatusCode::CONFLICT,
            FinishCode::UnknownModel | FinishCode::InvalidUsage => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, e.code.as_str(), e.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
    }
}
