//! Request handling through `app().oneshot(...)`: validation, errors, auth, info routes.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::admission::Admission;
use crate::app::{app, AppState, Model};
use crate::metrics::Metrics;
use crate::request_limits::RequestLimits;
use crate::tokenizer::{tests::test_info, ModelTokenizer};
use crate::worker::health::HealthConfig;
use crate::worker::Worker;

pub fn state_with(workers: Vec<Arc<Worker>>, api_key: Option<&str>) -> Arc<AppState> {
    state_with_config(workers, api_key, RequestLimits::default(), HealthConfig::default())
}

pub fn state_with_config(
    workers: Vec<Arc<Worker>>,
    api_key: Option<&str>,
    limits: RequestLimits,
    health: HealthConfig,
) -> Arc<AppState> {
    let metrics = Arc::new(Metrics::new());
    let policy = crate::policy::from_kind(crate::cli::PolicyKind::CacheAware);
    let admission = Admission::new(4, 4, Duration::from_secs(5), metrics.queue_depth.clone());
    let state = AppState::new(workers, policy, admission, metrics, api_key.map(String::from), limits, health);
    let tokenizer = ModelTokenizer::from_info(&test_info()).unwrap();
    let _ = state.model.set(Arc::new(Model {
        name: "test-model".into(),
        aliases: vec!["org/test".into()],
        tokenizer,
    }));
    Arc::new(state)
}

pub async fn call(
    state: &Arc<AppState>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(path);
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Body::from(body.unwrap_or_default().to_string())).unwrap();
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn error_of(state: &Arc<AppState>, path: &str, body: &str) -> (StatusCode, Value) {
    let (status, text) = call(state, "POST", path, Some(body)).await;
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    let err = value.get("error").unwrap_or_else(|| panic!("no error object: {text}")).clone();
    for field in ["message", "type", "param", "code"] {
        assert!(err.get(field).is_some(), "{field} missing in {err}");
    }
    (status, err)
}

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400_objects() {
    let s = state_with(vec![], None);
    let (status, err) = error_of(&s, CHAT, "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["type"], "invalid_request_error");
    let (status, _) = error_of(&s, CHAT, r#"{"messages": "hi"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) =
        error_of(&s, CHAT, r#"{"messages": [{"role":"user","content":"Hello"}], "temperature": "hot"}"#)
            .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = error_of(&s, COMPLETIONS, r#"{"prompt": {"a": 1}}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = error_of(&s, COMPLETIONS, r#"{"prompt": "Hi", "frequency_penalty": "x"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn out_of_range_values_name_their_param() {
    let s = state_with(vec![], None);
    let cases = [
        (r#""temperature": 2.5"#, "temperature"),
        (r#""top_p": 0"#, "top_p"),
        (r#""top_k": -5"#, "top_k"),
        (r#""n": 17"#, "n"),
        (r#""n": 0"#, "n"),
        (r#""max_tokens": 0"#, "max_tokens"),
        (r#""max_tokens": 1000"#, "max_tokens"),
        (r#""seed": -1"#, "seed"),
        (r#""stop": ["a", ""]"#, "stop"),
        (r#""top_logprobs": 3"#, "top_logprobs"),
        (r#""logprobs": true, "top_logprobs": 50"#, "top_logprobs"),
        (r#""min_tokens": 9, "max_tokens": 2"#, "min_tokens"),
        (r#""min_p": 1.5"#, "min_p"),
        (r#""frequency_penalty": 3"#, "frequency_penalty"),
        (r#""presence_penalty": -2.5"#, "presence_penalty"),
        (r#""repetition_penalty": 0"#, "repetition_penalty"),
        (r#""logit_bias": {"one": 1}"#, "logit_bias"),
        (r#""logit_bias": {"1": 200}"#, "logit_bias"),
        (r#""logit_bias": {"99999": 1}"#, "logit_bias"),
    ];
    for (extra, param) in cases {
        let body = format!(r#"{{"messages": [{{"role":"user","content":"Hello"}}], {extra}}}"#);
        let (status, err) = error_of(&s, CHAT, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}");
        assert_eq!(err["param"], param, "{extra}: {err}");
    }
    let (status, err) = error_of(&s, COMPLETIONS, r#"{"prompt": "Hello", "logprobs": 30}"#).await;
    assert_eq!((status, err["param"].as_str()), (StatusCode::BAD_REQUEST, Some("logprobs")));
    let (status, err) = error_of(&s, COMPLETIONS, r#"{"prompt": [1, 2, 999]}"#).await;
    assert_eq!((status, err["param"].as_str()), (StatusCode::BAD_REQUEST, Some("prompt")));
    let (status, _) = error_of(&s, COMPLETIONS, r#"{"prompt": []}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = error_of(&s, CHAT, r#"{"messages": []}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = error_of(&s, CHAT, r#"{"messages": [{"content": "no role"}]}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn other_fields_pass_only_when_they_change_nothing() {
    let s = state_with(vec![], None);
    let refused = [
        (r#""response_format": {"type": "xml"}"#, "response_format", "json_schema"),
        (
            r#""response_format": {"type": "json_schema", "json_schema": {"name": "x"}}"#,
            "response_format",
            "schema",
        ),
        (
            r#""response_format": {"type": "json_object"}, "guided_regex": "a+""#,
            "guided_regex",
            "at most one",
        ),
        (r#""guided_choice": []"#, "guided_choice", "non-empty"),
        (r#""tools": [{"type": "function"}]"#, "tools", "unique name"),
        (r#""tool_choice": "required""#, "tool_choice", "requires tools"),
        (r#""max_token": 5"#, "max_token", "unknown field"),
    ];
    for (extra, param, why) in refused {
        let body = format!(r#"{{"messages": [{{"role":"user","content":"Hello"}}], {extra}}}"#);
        let (status, err) = error_of(&s, CHAT, &body).await;
        assert_eq!((status, err["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{extra}");
        assert!(err["message"].as_str().unwrap().contains(why), "{err}");
    }
    let (status, err) = error_of(&s, COMPLETIONS, r#"{"prompt": "Hello", "suffix": "bye"}"#).await;
    assert_eq!((status, err["param"].as_str()), (StatusCode::BAD_REQUEST, Some("suffix")));
    // known fields with no effect, no-op values and the sampling options: valid (503: no worker to run it)
    let accepted = r#"{"messages": [{"role":"user","content":"Hello"}], "user": "u", "store": false,
        "response_format": {"type": "text"}, "tool_choice": "none", "frequency_penalty": 0.5,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "presence_penalty": -0.5, "repetition_penalty": 1.1, "min_p": 0.1, "logit_bias": {"5": -100}}"#;
    let (status, _) = error_of(&s, CHAT, accepted).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let tools = r#"{"messages": [{"role":"user","content":"Hello"}], "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f"}}]}"#;
    // the test template ignores `tools`, so they are described in a system message: too long for 64 tokens
    let (status, err) = error_of(&s, CHAT, tools).await;
    assert_eq!((status, err["code"].as_str()), (StatusCode::BAD_REQUEST, Some("context_length_exceeded")));
}

#[tokio::test]
async fn prompt_over_context_length_is_400() {
    let s = state_with(vec![], None);
    let long = vec!["Hello"; 80].join(" ");
    let (status, err) = error_of(&s, COMPLETIONS, &json!({"prompt": long}).to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["code"], "context_length_exceeded");
}

#[tokio::test]
async fn template_errors_are_400() {
    let s = state_with(vec![], None);
    let (status, err) =
        error_of(&s, CHAT, r#"{"messages": [{"role":"user","content":[{"type":"image_url"}]}]}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["param"], "messages");
}

#[tokio::test]
async fn valid_request_without_workers_is_503() {
    let s = state_with(vec![], None);
    let (status, _) = error_of(&s, CHAT, r#"{"messages": [{"role":"user","content":"Hello"}]}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn unknown_route_and_method() {
    let s = state_with(vec![], None);
    let (status, err) = error_of(&s, "/v1/nope", "{}").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(err["message"].as_str().unwrap().contains("/v1/nope"));
    let (status, text) = call(&s, "GET", CHAT, None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(text.contains("\"error\""));
}

async fn send(state: &Arc<AppState>, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {bytes:?}"));
    (status, headers, value)
}

fn post(path: &str) -> axum::http::request::Builder {
    Request::post(path).header(header::CONTENT_TYPE, "application/json")
}

#[tokio::test]
async fn a_30_mb_prompt_is_refused_at_once() {
    let s = state_with(vec![], None);
    let big = format!(r#"{{"prompt": "{}"}}"#, "Hello ".repeat(5 << 20));
    let started = std::time::Instant::now();
    let req = post(COMPLETIONS).header(header::CONTENT_LENGTH, big.len()).body(Body::from(big)).unwrap();
    let (status, _, v) = send(&s, req).await;
    assert!(started.elapsed() < Duration::from_millis(100), "took {:?}", started.elapsed());
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["code"], "request_too_large");
    // Without a Content-Length the body is read up to the limit only.
    let big = format!(r#"{{"prompt": "{}"}}"#, "Hello ".repeat(5 << 20));
    let (status, _, _) = send(&s, post(COMPLETIONS).body(Body::from(big)).unwrap()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn a_prompt_that_cannot_fit_is_refused_before_tokenizing() {
    // Context 64 x 32 bytes per token: at most 2048 bytes. The body limit is lifted to reach the check.
    let limits = RequestLimits { max_body_bytes: Some(64 << 20), ..Default::default() };
    let s = state_with_config(vec![], None, limits, HealthConfig::default());
    // 1.5 MB, 256k tokens: tokenizing them would take seconds; the bytes are counted in microseconds.
    let prompt = "Hello ".repeat(1 << 18);
    let started = std::time::Instant::now();
    for (path, body) in [
        (COMPLETIONS, json!({"prompt": prompt})),
        (CHAT, json!({"messages": [{"role": "user", "content": prompt}]})),
    ] {
        let (status, err) = error_of(&s, path, &body.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(err["code"], "context_length_exceeded");
        assert!(err["message"].as_str().unwrap().contains("bytes"), "{err}");
    }
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_missing_body_is_408_after_the_body_timeout() {
    let limits = RequestLimits { body_read_timeout: Duration::from_millis(200), ..Default::default() };
    let s = state_with_config(vec![], None, limits, HealthConfig::default());
    let never =
        Body::from_stream(futures_util::stream::pending::<Result<axum::body::Bytes, std::io::Error>>());
    let req = post(COMPLETIONS).header(header::CONTENT_LENGTH, 100).body(never).unwrap();
    let started = std::time::Instant::now();
    let (status, _, v) = send(&s, req).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(v["error"]["code"], "request_timeout");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn encoded_bodies_are_415_and_big_heads_431_with_error_objects() {
    let s = state_with(vec![], None);
    let req = post(COMPLETIONS)
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(vec![0x1f_u8, 0x8b]))
        .unwrap();
    let (status, _, v) = send(&s, req).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(v["error"]["code"], "unsupported_content_encoding");
    let req = post(COMPLETIONS).header("x-big", "a".repeat(70 << 10)).body(Body::from("{}")).unwrap();
    let (status, _, v) = send(&s, req).await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(v["error"]["code"], "headers_too_large");
    let mut req = Request::get("/health");
    for i in 0..150 {
        req = req.header(format!("x-{i}"), "1");
    }
    let (status, _, _) = send(&s, req.body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
}

#[tokio::test]
async fn a_model_the_server_does_not_serve_is_404() {
    let s = state_with(vec![], None);
    for name in ["test-model", "org/test"] {
        let (status, text) = call(&s, "GET", &format!("/v1/models/{name}"), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["id"], "test-model");
    }
    let (status, text) = call(&s, "GET", "/v1/models/gpt-4o", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["code"], "model_not_found");
    let chat = r#"{"model": "gpt-4o", "messages": [{"role":"user","content":"Hello"}]}"#;
    let (status, err) = error_of(&s, CHAT, chat).await;
    assert_eq!(
        (status, err["code"].as_str(), err["param"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"), Some("model"))
    );
    let (status, _) = error_of(&s, COMPLETIONS, r#"{"model": "gpt-4o", "prompt": "Hi"}"#).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // its own names pass (503: no worker to run it)
    let (status, _) = error_of(&s, COMPLETIONS, r#"{"model": "org/test", "prompt": "Hi"}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn models_health_metrics() {
    let s = state_with(vec![], None);
    let (status, text) = call(&s, "GET", "/v1/models", None).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["data"][0]["id"], "test-model");
    assert_eq!(v["data"][0]["max_model_len"], 64);
    let (status, text) = call(&s, "GET", "/v1/tokenizer", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["model"]["type"], "WordLevel");
    // No healthy worker: not ready.
    assert_eq!(call(&s, "GET", "/health", None).await.0, StatusCode::SERVICE_UNAVAILABLE);
    s.metrics.record_worker_info(0, &test_info());
    let (status, text) = call(&s, "GET", "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("saw_requests_total{endpoint=\"/v1/models\",status=\"200\"} 1"), "{text}");
    let format = "format=\"int4-bdr:b32+center+scale+s4+w16\"";
    assert!(
        text.contains(&format!("saw_worker_kv_bytes{{{format},per=\"token\",worker=\"0\"}} 4320")),
        "{text}"
    );
    assert!(
        text.contains(&format!("saw_worker_kv_bytes{{{format},per=\"request\",worker=\"0\"}} 491520")),
        "{text}"
    );
}
