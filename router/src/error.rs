//! OpenAI-style error objects and the JSON body extractor that produces them.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

/// An error returned to the client as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// A 400 naming the offending request field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::bad_request(message);
        e.param = Some(param.to_string());
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message);
        e.code = Some("not_found");
        e
    }

    pub fn payload_too_large(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message);
        e.code = Some("request_too_large");
        e
    }

    pub fn request_timeout(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", message);
        e.code = Some("request_timeout");
        e
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error", message);
        e.code = Some("unsupported_content_encoding");
        e
    }

    pub fn headers_too_large(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "invalid_request_error", message);
        e.code = Some("headers_too_large");
        e
    }

    /// A prompt that cannot fit in the context (tokens, or bytes before tokenizing).
    pub fn context_length_exceeded(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::invalid_param(param, message);
        e.code = Some("context_length_exceeded");
        e
    }

    pub fn model_not_found(requested: &str, served: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{requested}` does not exist; this server serves `{served}`."),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    pub fn unauthorized() -> Self {
        let mut e =
            Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid or missing API key");
        e.code = Some("invalid_api_key");
        e
    }

    pub fn too_many_requests(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
        e.code = Some("rate_limit_exceeded");
        e.retry_after = Some(1);
        e
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message);
        e.retry_after = Some(5);
        e
    }

    /// A worker failed or misbehaved.
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "server_error", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Like `axum::Json`, but malformed bodies and wrong types give a 400 OpenAI error (axum's own
/// rejection is a 422 plain-text body). The body limits are request_limits.rs's, before this.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            ApiError::new(rejection.status(), "invalid_request_error", rejection.body_text())
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}
