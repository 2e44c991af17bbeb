//! HTTP handlers.

pub mod chat;
pub mod completions;
mod sse;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::app::{AppState, Model};
use crate::error::ApiError;
use crate::openai::{ModelCard, ModelList};

pub async fn models(State(state): State<Arc<AppState>>) -> Result<Json<ModelList>, ApiError> {
    let model = state.model()?;
    Ok(Json(ModelList { object: "list", data: vec![card(&state, &model)] }))
}

/// `GET /v1/models/{id}` (ids may hold slashes, as HF names do): the served model's card under any of its names, else 404.
pub async fn model_card(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    let model = state.model()?;
    if !model.serves(&id) {
        return Err(ApiError::model_not_found(&id, &model.name));
    }
    Ok(Json(card(&state, &model)))
}

fn card(state: &AppState, model: &Model) -> ModelCard {
    ModelCard {
        id: model.name.clone(),
        object: "model",
        created: state.created,
        owned_by: "saw",
        max_model_len: model.tokenizer.context_length,
    }
}

/// The served model's HF tokenizer JSON (not an OpenAI route; saw's load tests use it).
pub async fn tokenizer(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    let model = state.model()?;
    Ok(([(header::CONTENT_TYPE, "application/json")], model.tokenizer.json.clone()))
}

/// 200 when the model is known and at least one worker takes requests, else 503.
pub async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let healthy = state.workers.iter().filter(|w| w.is_healthy()).count();
    let ready = state.model.get().is_some() && healthy > 0;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let workers: Vec<_> = state
        .workers
        .iter()
        .map(|w| json!({"index": w.index, "url": w.url, "healthy": w.is_healthy(), "inflight": w.inflight()}))
        .collect();
    (status, Json(json!({"status": if ready { "ok" } else { "unavailable" }, "workers": workers})))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

/// Runs CPU-bound request preparation (templating, tokenizing) on the blocking pool, at most
/// `--max-concurrent-tokenizations` at once.
pub async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    // The semaphore is never closed, so acquiring only waits.
    let _slot = state.tokenize_slots.acquire().await.map_err(|e| ApiError::internal(e.to_string()))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))
}

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A fresh response id, e.g. `chatcmpl-1f3a...`.
pub fn response_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}-{:x}{n:x}", nanos as u64)
}
