//! End-to-end through the router against in-process fake workers: streaming, stop strings,
//! echo logprobs, cancellation, retries, admission.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tonic::Status;
use tower::ServiceExt;

use crate::app::{app, AppState};
use crate::app_tests::{call, state_with, state_with_config};
use crate::fake_worker::{self, Observed, Script};
use crate::request_limits::RequestLimits;
use crate::worker::health::{self, HealthConfig};
use crate::worker::token::WorkerToken;
use crate::worker::Worker;

// Token ids of the test vocabulary (tokenizer::tests): The capital is Paris .
const ANSWER: [u32; 5] = [6, 7, 8, 9, 10];
// The test tokenizer joins words with spaces, also after the prompt: hence the leading space.
const ANSWER_TEXT: &str = " The capital is Paris .";

async fn ready_worker(index: usize, script: Script) -> (Arc<Worker>, Arc<Observed>) {
    let (url, seen) = fake_worker::start(script).await;
    let worker = Arc::new(Worker::new(index, &url, None).unwrap());
    worker.info().await.unwrap();
    (worker, seen)
}

fn answer(delay_ms: u64) -> Script {
    Script { tokens: ANSWER.to_vec(), delay: Duration::from_millis(delay_ms), ..Default::default() }
}

async fn post_json(state: &Arc<crate::app::AppState>, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = call(state, "POST", path, Some(&body.to_string())).await;
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

/// The `data:` payloads of an SSE body.
fn sse_data(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect()
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..100 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test]
async fn chat_non_streaming() {
    let (worker, seen) = ready_worker(0, answer(0)).await;
    let state = state_with(vec![worker.clone()], None);
    let (status, v) = post_json(
        &state,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hello"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], ANSWER_TEXT);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let req = seen.requests.lock().unwrap()[0].clone();
    // <|im_start|> user Hello <|im_end|> <|im_start|> assistant (the test tokenizer drops newlines)
    assert_eq!(req.input_ids, vec![11, 13, 3, 12, 11, 14]);
    assert_eq!(req.max_new_tokens, 64 - 6);
    assert_eq!(worker.inflight(), 0);
}

#[tokio::test]
async fn sampling_options_and_grammars_reach_the_worker() {
    let (worker, seen) = ready_worker(0, answer(0)).await;
    let state = state_with(vec![worker], None);
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "temperature": 0.7, "min_p": 0.05,
        "frequency_penalty": 0.5, "presence_penalty": -0.25, "repetition_penalty": 1.2,
        "logit_bias": {"7": -100, "9": 2.5}});
    let (status, v) = post_json(&state, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let sampling = seen.requests.lock().unwrap()[0].sampling.clone().unwrap();
    assert_eq!(
        (sampling.min_p, sampling.frequency_penalty, sampling.presence_penalty, sampling.repetition_penalty),
        (0.05, 0.5, -0.25, 1.2)
    );
    assert_eq!(sampling.logit_bias, [(7, -100.0), (9, 2.5)].into_iter().collect());
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
    let format =
        json!({"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": true}});
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "response_format": format});
    assert_eq!(post_json(&state, "/v1/chat/completions", body).await.0, StatusCode::OK);
    let grammar = seen.requests.lock().unwrap()[1].grammar.clone().unwrap();
    assert_eq!(grammar.kind(), crate::proto::grammar::Kind::JsonSchema);
    assert_eq!((serde_json::from_str::<Value>(&grammar.spec).unwrap(), grammar.strict), (schema, true));
    let body = json!({"prompt": "Hello", "guided_choice": ["yes", "no \"really\""]});
    assert_eq!(post_json(&state, "/v1/completions", body).await.0, StatusCode::OK);
    let grammar = seen.requests.lock().unwrap()[2].grammar.clone().unwrap();
    assert_eq!(grammar.kind(), crate::proto::grammar::Kind::Choice);
    assert_eq!(serde_json::from_str::<Vec<String>>(&grammar.spec).unwrap(), ["yes", "no \"really\""]);
}

#[tokio::test]
async fn n_choices_share_the_prompt_and_batched_prompts_answer_in_order() {
    let (worker, seen) = ready_worker(0, answer(0)).await;
    let state = state_with(vec![worker], None);
    let body =
        json!({"messages": [{"role": "user", "content": "Hello"}], "n": 3, "seed": 7, "temperature": 1});
    let (status, v) = post_json(&state, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let indices: Vec<u64> =
        v["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, [0, 1, 2]);
    assert_eq!(
        (v["usage"]["prompt_tokens"].as_u64(), v["usage"]["completion_tokens"].as_u64()),
        (Some(6), Some(15))
    );
    let seeds: Vec<_> =
        seen.requests.lock().unwrap().iter().map(|r| r.sampling.clone().unwrap().seed).collect();
    assert_eq!(seeds[0], Some(7));
    let mut rest = seeds[1..].to_vec();
    rest.sort();
    assert_eq!(rest, [Some(8), Some(9)]);
    // two prompts x n = 2: choices prompt by prompt, usage counting each prompt once
    let body = json!({"prompt": ["Hello", "The capital"], "n": 2, "max_tokens": 5});
    let (status, v) = post_json(&state, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 4);
    assert!(v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .zip(0..)
        .all(|(c, i)| c["index"] == i && c["text"] == ANSWER_TEXT));
    assert_eq!(v["usage"]["completion_tokens"], 20);
    let prompts: Vec<usize> = seen.requests.lock().unwrap()[3..].iter().map(|r| r.input_ids.len()).collect();
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        prompts.iter().max().unwrap() + prompts.iter().min().unwrap()
    );
    // streamed: every choice's chunks, then one usage chunk for all, then [DONE]
    let body = json!({"prompt": "Hello", "n": 2, "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}});
    let (status, text) = call(&state, "POST", "/v1/completions", Some(&body.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let usage = &chunks.last().unwrap()["usage"];
    let prompt_len = seen.requests.lock().unwrap().last().unwrap().input_ids.len() as u64;
    assert_eq!(
        (usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64()),
        (Some(prompt_len), Some(10))
    );
    for i in 0..2 {
        let text: String = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap().iter())
            .filter(|c| c["index"] == i)
            .map(|c| c["text"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(text, ANSWER_TEXT);
    }
}

#[tokio::test]
async fn chat_streaming_with_usage() {
    let (worker, _) = ready_worker(0, answer(0)).await;
    let state = state_with(vec![worker], None);
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "stream": true,
                      "stream_options": {"include_usage": true}});
    let (status, text) = call(&state, "POST", "/v1/chat/completions", Some(&body.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let frames = sse_data(&text);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        frames[..frames.len() - 1].iter().map(|f| serde_json::from_str(f).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect::<Vec<_>>()
        .concat();
    assert_eq!(content, ANSWER_TEXT);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 6 + 5);
}

#[tokio::test]
async fn stop_string_cuts_output_and_aborts_the_worker() {
    let (worker, seen) = ready_worker(0, answer(30)).await;
    let state = state_with(vec![worker.clone()], None);
    let (status, v) =
        post_json(&state, "/v1/completions", json!({"prompt": "Hello", "stop": "is Par"})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], " The capital ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    eventually("abort sent", || seen.aborted.lock().unwrap().len() == 1).await;
    eventually("worker request gone", || seen.running.load(Ordering::SeqCst) == 0).await;
    assert_eq!(worker.inflight(), 0);
}

#[tokio::test]
async fn echo_with_logprobs_scores_the_prompt() {
    let (worker, seen) = ready_worker(0, answer(0)).await;
    let state = state_with(vec![worker], None);
    let body = json!({"prompt": "Hello world !", "max_tokens": 0, "echo": true, "logprobs": 1});
    let (status, v) = post_json(&state, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["text"], "Hello world !");
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"], json!(["Hello", "world", "!"]));
    assert_eq!(lp["token_logprobs"], json!([null, -0.5, -0.5]));
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    assert_eq!(lp["top_logprobs"][1], json!({"Hello": -1.0}));
    assert_eq!(lp["text_offset"], json!([0, 5, 10]));
    assert_eq!(v["usage"]["completion_tokens"], 0);
    let req = seen.requests.lock().unwrap()[0].clone();
    assert!(req.prompt_logprobs && req.return_logprobs);
    assert_eq!(req.max_new_tokens, 1);
}

#[tokio::test]
async fn chat_logprobs() {
    let (worker, _) = ready_worker(0, answer(0)).await;
    let state = state_with(vec![worker], None);
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "logprobs": true, "top_logprobs": 2,
                      "max_tokens": 2});
    let (status, v) = post_json(&state, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let content = &v["choices"][0]["logprobs"]["content"];
    assert_eq!(content.as_array().unwrap().len(), 2);
    assert_eq!(content[0]["token"], "The");
    assert_eq!(content[0]["bytes"], json!([84, 104, 101]));
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn client_disconnect_aborts_and_releases_everything() {
    let (worker, seen) = ready_worker(0, answer(200)).await;
    let state = state_with(vec![worker.clone()], None);
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "stream": true});
    let req = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    assert_eq!(worker.inflight(), 1);
    assert_eq!(state.metrics.running.get(), 1);
    drop(body); // the client goes away
    assert_eq!(worker.inflight(), 0);
    assert_eq!(state.metrics.running.get(), 0);
    eventually("abort sent", || seen.aborted.lock().unwrap().len() == 1).await;
    eventually("worker request gone", || seen.running.load(Ordering::SeqCst) == 0).await;
    // The aborted generation shows in the latency and token metrics.
    assert_eq!(state.metrics.e2e.with_label_values(&["abort"]).get_sample_count(), 1);
    assert_eq!(state.metrics.prompt_tokens.get(), 6);
    assert_eq!(state.metrics.generation_tokens.get(), 1);
}

#[tokio::test]
async fn client_gone_before_the_response_is_counted_as_499_and_abort() {
    // The worker never sends a first chunk (frozen, and no health poller to notice).
    let (worker, _) = ready_worker(0, Script { freeze_after: Some(0), ..answer(0) }).await;
    let state = state_with(vec![worker], None);
    let body = json!({"prompt": "Hello"}).to_string();
    let gone = tokio::time::timeout(
        Duration::from_millis(200),
        call(&state, "POST", "/v1/completions", Some(&body)),
    );
    assert!(gone.await.is_err());
    let text = state.metrics.render();
    assert!(text.contains(r#"saw_requests_total{endpoint="/v1/completions",status="499"} 1"#), "{text}");
    assert_eq!(state.metrics.e2e.with_label_values(&["abort"]).get_sample_count(), 1);
    assert_eq!(state.metrics.prompt_tokens.get(), 0);
}

/// Health polls every 50 ms with 100 ms timeouts; a stream gives a silent worker 300 ms.
fn fast_health() -> HealthConfig {
    HealthConfig {
        poll_interval: Duration::from_millis(50),
        poll_timeout: Duration::from_millis(100),
        failures_to_unhealthy: 2,
        stall_timeout: Duration::from_millis(300),
    }
}

fn with_health_poller(state: &Arc<AppState>) -> tokio::sync::watch::Sender<bool> {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(health::poll_forever(state.clone(), stop_rx));
    stop
}

#[tokio::test]
async fn frozen_worker_fails_its_stream_in_bounded_time_and_gets_the_abort_when_back() {
    let (worker, seen) = ready_worker(0, Script { freeze_after: Some(2), ..answer(0) }).await;
    let state = state_with_config(vec![worker.clone()], None, RequestLimits::default(), fast_health());
    let _poller = with_health_poller(&state);
    let started = std::time::Instant::now();
    let body = json!({"prompt": "Hello", "stream": true}).to_string();
    let (status, text) = call(&state, "POST", "/v1/completions", Some(&body)).await;
    // Health gives up after 2 x 100 ms timeouts (+ poll gaps), then the stream waits 300 ms more.
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(status, StatusCode::OK);
    let frames = sse_data(&text);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&frames[frames.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "worker_stalled", "{text}");
    assert_eq!(worker.inflight(), 0);
    // The abort cannot reach the frozen worker (its 2 s timeout passes); it is resent once it answers.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(seen.aborted.lock().unwrap().is_empty());
    seen.frozen.send_replace(false);
    eventually("abort resent", || seen.aborted.lock().unwrap().len() == 1).await;
    eventually("healthy again", || worker.is_healthy()).await;
}

#[tokio::test]
async fn worker_frozen_before_the_first_chunk_is_a_503() {
    let (worker, _) = ready_worker(0, Script { freeze_after: Some(0), ..answer(0) }).await;
    let state = state_with_config(vec![worker], None, RequestLimits::default(), fast_health());
    let _poller = with_health_poller(&state);
    let started = std::time::Instant::now();
    let req = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"prompt": "Hello", "stream": true}).to_string()))
        .unwrap();
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key(header::RETRY_AFTER));
    let v: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], "worker_stalled");
}

#[tokio::test]
async fn open_streams_end_with_a_shutdown_error_when_the_drain_is_over() {
    let (worker, _) = ready_worker(0, answer(100)).await;
    let state = state_with(vec![worker], None);
    let req = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"messages": [{"role": "user", "content": "Hello"}], "stream": true}).to_string(),
        ))
        .unwrap();
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let mut body = resp.into_body();
    assert!(body.frame().await.unwrap().unwrap().data_ref().is_some());
    state.stop_generations.send_replace(true);
    let rest = body.collect().await.unwrap().to_bytes();
    let frames = sse_data(&String::from_utf8_lossy(&rest));
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&frames[frames.len() - 2]).unwrap();
    assert_eq!(error["error"]["message"], "the server is shutting down");
}

#[tokio::test]
async fn worker_calls_carry_the_token() {
    let script = || Script { token: Some("t0k".into()), ..answer(0) };
    let (url, _) = fake_worker::start(script()).await;
    let without = Worker::new(0, &url, None).unwrap();
    assert_eq!(without.info().await.unwrap_err().code(), tonic::Code::Unauthenticated);
    let token = WorkerToken::new("t0k".into()).unwrap();
    let with = Arc::new(Worker::new(0, &url, Some(&token)).unwrap());
    with.info().await.unwrap();
    let state = state_with(vec![with], None);
    let (status, v) = post_json(&state, "/v1/completions", json!({"prompt": "Hello"})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn worker_invalid_argument_is_400() {
    let script = Script {
        fail: Some(Status::invalid_argument("prompt too long for the KV cache")),
        ..Default::default()
    };
    let (worker, _) = ready_worker(0, script).await;
    let state = state_with(vec![worker], None);
    let (status, v) = post_json(&state, "/v1/completions", json!({"prompt": "Hello"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["message"], "prompt too long for the KV cache");
}

#[tokio::test]
async fn failing_worker_is_retried_before_the_first_token() {
    let (bad, _) =
        ready_worker(0, Script { fail: Some(Status::unavailable("down")), ..Default::default() }).await;
    let (good, seen) = ready_worker(1, answer(0)).await;
    let state = state_with(vec![bad.clone(), good], None);
    for _ in 0..3 {
        let (status, v) = post_json(&state, "/v1/completions", json!({"prompt": "Hello world"})).await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    assert_eq!(seen.requests.lock().unwrap().len(), 3);
    assert!(!bad.is_healthy());
}

#[tokio::test]
async fn worker_crashing_under_a_request_is_503_with_retry_after_or_retried() {
    // What a worker answers the requests in flight when its engine process dies.
    let crashed = || Script {
        fail: Some(Status::internal("the engine process exited (code -9)")),
        ..Default::default()
    };
    let (alone, _) = ready_worker(0, crashed()).await;
    let state = state_with(vec![alone], None);
    let body = json!({"prompt": "Hello"});
    let req = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key(header::RETRY_AFTER));

    let (bad, _) = ready_worker(0, crashed()).await;
    let (good, seen) = ready_worker(1, answer(0)).await;
    let state = state_with(vec![bad, good], None);
    for _ in 0..3 {
        let (status, v) = post_json(&state, "/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    assert_eq!(seen.requests.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn full_queue_is_429_with_retry_after() {
    let (worker, _) = ready_worker(0, answer(300)).await;
    let state = state_with(vec![worker], None);
    // state_with allows 4 running + 4 queued.
    let held: Vec<_> = futures_util::future::join_all((0..4).map(|_| {
        let req = Request::post("/v1/completions")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json!({"prompt": "Hello", "stream": true}).to_string()))
            .unwrap();
        app(state.clone()).oneshot(req)
    }))
    .await;
    let queued: Vec<_> = (0..4).map(|_| tokio::spawn(call_owned(state.clone()))).collect();
    eventually("queue full", || state.metrics.queue_depth.get() == 4).await;
    let req = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"prompt": "Hello"}).to_string()))
        .unwrap();
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    drop(held);
    for q in queued {
        assert_eq!(q.await.unwrap(), StatusCode::OK);
    }
}

async fn call_owned(state: Arc<crate::app::AppState>) -> StatusCode {
    let body = json!({"prompt": "Hello", "max_tokens": 1}).to_string();
    call(&state, "POST", "/v1/completions", Some(&body)).await.0
}

#[tokio::test]
async fn streaming_completion_with_echo() {
    let (worker, _) = ready_worker(0, answer(0)).await;
    let state = state_with(vec![worker], None);
    let body = json!({"prompt": "Hello", "stream": true, "echo": true, "max_tokens": 2});
    let (status, text) = call(&state, "POST", "/v1/completions", Some(&body.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let frames = sse_data(&text);
    let texts: Vec<String> = frames[..frames.len() - 1]
        .iter()
        .map(|f| {
            serde_json::from_str::<Value>(f).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(texts.concat(), "Hello The capital");
    assert_eq!(frames.last().unwrap(), "[DONE]");
}
