//! Shared state and the HTTP router.

use std::sync::{Arc, OnceLock};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::admission::Admission;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::routes;
use crate::tokenizer::ModelTokenizer;
use crate::worker::Worker;

/// Request bodies larger than this get a 413 (long prompts fit many times over).
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// What the router knows about the model, from the first worker that answered `Info`.
pub struct Model {
    /// The name clients see (`--served-model-name`, `--model`, or the worker's model id).
    pub name: String,
    /// Other names requests may give it: `--model` and the worker's model id.
    pub aliases: Vec<String>,
    pub tokenizer: ModelTokenizer,
}

impl Model {
    pub fn serves(&self, name: &str) -> bool {
        name == self.name || self.aliases.iter().any(|a| a == name)
    }

    /// 404 `model_not_found` for a model this server does not serve (none given, or "": the served one).
    pub fn check_name(&self, requested: Option<&str>) -> Result<(), ApiError> {
        match requested {
            Some(name) if !name.is_empty() && !self.serves(name) => {
                Err(ApiError::model_not_found(name, &self.name))
            }
            _ => Ok(()),
        }
    }
}

pub struct AppState {
    pub model: OnceLock<Arc<Model>>,
    pub workers: Vec<Arc<Worker>>,
    pub policy: Box<dyn Policy>,
    pub admission: Admission,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    /// Unix time the router started (the `created` of /v1/models).
    pub created: u64,
}

impl AppState {
    /// The model, or 503 while no worker has come up yet.
    pub fn model(&self) -> Result<Arc<Model>, ApiError> {
        self.model.get().cloned().ok_or_else(|| ApiError::unavailable("the model is still loading"))
    }
}

pub fn app(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(routes::chat::chat_completions))
        .route("/v1/completions", post(routes::completions::completions))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{*id}", get(routes::model_card))
        .route("/v1/tokenizer", get(routes::tokenizer))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .merge(v1)
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

async fn require_api_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let ok =
            given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|k| constant_time_eq(k.trim(), key));
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// Compares keys without an early exit, so response time does not leak how much matched.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn count_requests(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let endpoint = match request.uri().path() {
        p @ ("/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/health" | "/metrics") => {
            p.to_string()
        }
        _ => "other".to_string(),
    };
    let response = next.run(request).await;
    state.metrics.requests.with_label_values(&[endpoint.as_str(), response.status().as_str()]).inc();
    response
}

async fn unknown_route(method: Method, request: Request) -> ApiError {
    ApiError::not_found(format!("unknown route: {method} {}", request.uri().path()))
}

async fn method_not_allowed(method: Method, request: Request) -> ApiError {
    let mut e = ApiError::bad_request(format!("method {method} is not allowed on {}", request.uri().path()));
    e.status = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    e
}
