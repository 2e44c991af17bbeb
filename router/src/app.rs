//! Shared state and the HTTP router.

use std::sync::{Arc, OnceLock};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{watch, Semaphore};

use crate::admission::Admission;
use crate::conn;
use crate::error::ApiError;
use crate::metrics::{Metrics, RequestCount};
use crate::policy::Policy;
use crate::request_limits::{self, RequestLimits};
use crate::routes;
use crate::tokenizer::ModelTokenizer;
use crate::worker::health::HealthConfig;
use crate::worker::Worker;

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
    pub limits: RequestLimits,
    /// `limits.max_concurrent_tokenizations` permits (routes::blocking).
    pub tokenize_slots: Semaphore,
    pub health: HealthConfig,
    /// Set when the drain time is over: open generations end with "the server is shutting down".
    pub stop_generations: watch::Sender<bool>,
    /// Unix time the router started (the `created` of /v1/models).
    pub created: u64,
}

impl AppState {
    pub fn new(
        workers: Vec<Arc<Worker>>,
        policy: Box<dyn Policy>,
        admission: Admission,
        metrics: Arc<Metrics>,
        api_key: Option<String>,
        limits: RequestLimits,
        health: HealthConfig,
    ) -> Self {
        AppState {
            model: OnceLock::new(),
            workers,
            policy,
            admission,
            metrics,
            api_key,
            tokenize_slots: Semaphore::new(limits.max_concurrent_tokenizations.max(1)),
            limits,
            health,
            stop_generations: watch::Sender::new(false),
            created: routes::unix_now(),
        }
    }

    /// The model, or 503 while no worker has come up yet.
    pub fn model(&self) -> Result<Arc<Model>, ApiError> {
        self.model.get().cloned().ok_or_else(|| ApiError::unavailable("the model is still loading"))
    }
}

pub fn app(state: Arc<AppState>) -> Router {
    let generation = Router::new()
        .route("/v1/chat/completions", post(routes::chat::chat_completions))
        .route("/v1/completions", post(routes::completions::completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), request_limits::read_body));
    // The key is checked first: nobody unauthenticated gets a body read.
    let v1 = generation
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
        // request_limits::read_body has buffered the body within its own limit.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(conn::check_headers))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

async fn require_api_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if !given.and_then(bearer_token).is_some_and(|k| constant_time_eq(k, key)) {
            let mut response = ApiError::unauthorized().into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

/// The credentials of `Authorization: Bearer <token>`; the scheme is case-insensitive (RFC 9110).
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares keys without an early exit, so response time does not leak how much matched.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn count_requests(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    const ENDPOINTS: [&str; 5] =
        ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"];
    let endpoint = ENDPOINTS.into_iter().find(|&p| p == request.uri().path()).unwrap_or("other");
    // Counted on drop, so that a client who leaves before the response is counted too.
    let mut count = RequestCount::new(state.metrics.clone(), endpoint);
    let response = next.run(request).await;
    count.status = Some(response.status());
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
