//! Prometheus metrics, served as text at `GET /metrics`.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::proto::{InfoReply, LoadReply};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub e2e: HistogramVec,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub queue_depth: IntGauge,
    pub running: IntGauge,
    worker_running: IntGaugeVec,
    worker_waiting: IntGaugeVec,
    worker_kv_used: IntGaugeVec,
    worker_kv_total: IntGaugeVec,
    worker_healthy: IntGaugeVec,
    worker_inflight: IntGaugeVec,
    worker_requests: IntCounterVec,
    worker_kv_bytes: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0];
const ITL_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let worker = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["worker"]).unwrap();
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new("saw_requests_total", "HTTP requests by endpoint and status code"),
                &["endpoint", "status"],
            )
            .unwrap(),
            ttft: Histogram::with_opts(
                HistogramOpts::new("saw_time_to_first_token_seconds", "Request arrival to first token")
                    .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .unwrap(),
            inter_token: Histogram::with_opts(
                HistogramOpts::new("saw_inter_token_latency_seconds", "Time between output tokens")
                    .buckets(ITL_BUCKETS.to_vec()),
            )
            .unwrap(),
            e2e: HistogramVec::new(
                HistogramOpts::new("saw_e2e_request_latency_seconds", "Request arrival to last token")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["finish_reason"],
            )
            .unwrap(),
            prompt_tokens: IntCounter::new("saw_prompt_tokens_total", "Prompt tokens processed").unwrap(),
            generation_tokens: IntCounter::new("saw_generation_tokens_total", "Tokens generated").unwrap(),
            queue_depth: IntGauge::new("saw_queue_depth", "Requests waiting for a slot").unwrap(),
            running: IntGauge::new("saw_running_requests", "Requests holding a slot").unwrap(),
            worker_running: worker("saw_worker_running_requests", "Requests running on the worker (polled)"),
            worker_waiting: worker("saw_worker_waiting_requests", "Requests waiting in the worker (polled)"),
            worker_kv_used: worker("saw_worker_kv_tokens_used", "KV-cache tokens in use (polled)"),
            worker_kv_total: worker("saw_worker_kv_tokens_total", "KV-cache capacity in tokens (polled)"),
            worker_healthy: worker("saw_worker_healthy", "1 when the worker takes requests"),
            worker_inflight: worker("saw_worker_inflight_requests", "Requests this router has on the worker"),
            worker_requests: IntCounterVec::new(
                Opts::new("saw_worker_requests_total", "Requests routed to the worker"),
                &["worker"],
            )
            .unwrap(),
            worker_kv_bytes: IntGaugeVec::new(
                Opts::new(
                    "saw_worker_kv_bytes",
                    "KV-cache bytes of the worker's format: per token (all layers and KV heads) and per request \
                     (the bf16 window's ring row)",
                ),
                &["worker", "format", "per"],
            )
            .unwrap(),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.ttft.clone()),
            Box::new(m.inter_token.clone()),
            Box::new(m.e2e.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generation_tokens.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.running.clone()),
            Box::new(m.worker_running.clone()),
            Box::new(m.worker_waiting.clone()),
            Box::new(m.worker_kv_used.clone()),
            Box::new(m.worker_kv_total.clone()),
            Box::new(m.worker_healthy.clone()),
            Box::new(m.worker_inflight.clone()),
            Box::new(m.worker_requests.clone()),
            Box::new(m.worker_kv_bytes.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// The worker's KV format with its options, and what a token and a request cost in it.
    pub fn record_worker_info(&self, worker: usize, info: &InfoReply) {
        let w = worker.to_string();
        for (per, bytes) in
            [("token", info.kv_bytes_per_token), ("request", info.kv_window_bytes_per_request)]
        {
            let gauge = self.worker_kv_bytes.with_label_values(&[w.as_str(), info.kv_format.as_str(), per]);
            gauge.set(bytes.min(i64::MAX as u64) as i64);
        }
    }

    pub fn record_worker_load(&self, worker: usize, load: &LoadReply) {
        let w = worker.to_string();
        let set =
            |g: &IntGaugeVec, v: u64| g.with_label_values(&[w.as_str()]).set(v.min(i64::MAX as u64) as i64);
        set(&self.worker_running, load.running.into());
        set(&self.worker_waiting, load.waiting.into());
        set(&self.worker_kv_used, load.kv_tokens_used);
        set(&self.worker_kv_total, load.kv_tokens_total);
    }

    pub fn record_worker_state(&self, worker: usize, healthy: bool, inflight: usize) {
        let w = worker.to_string();
        self.worker_healthy.with_label_values(&[w.as_str()]).set(healthy.into());
        self.worker_inflight.with_label_values(&[w.as_str()]).set(inflight as i64);
    }

    pub fn count_worker_request(&self, worker: usize) {
        self.worker_requests.with_label_values(&[worker.to_string().as_str()]).inc();
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding our own registry into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Counts one HTTP request in `saw_requests_total` when dropped: with its status once the response
/// is ready, or as 499 (nginx's "client closed request") when the client left before that.
pub struct RequestCount {
    metrics: Arc<Metrics>,
    endpoint: &'static str,
    pub status: Option<axum::http::StatusCode>,
}

impl RequestCount {
    pub fn new(metrics: Arc<Metrics>, endpoint: &'static str) -> Self {
        RequestCount { metrics, endpoint, status: None }
    }
}

impl Drop for RequestCount {
    fn drop(&mut self) {
        let status = self.status.as_ref().map_or("499", |s| s.as_str());
        self.metrics.requests.with_label_values(&[self.endpoint, status]).inc();
    }
}

/// Records one generation in the latency and token metrics however it ends: with its finish reason,
/// or as `abort` when it is dropped first (client gone, worker failed or stalled, shutdown), with
/// the tokens it had by then.
pub struct GenerationRecord {
    metrics: Arc<Metrics>,
    started: Instant,
    /// The prompt counts once a worker has processed it (sent a first chunk).
    prompt_tokens: u64,
    generated_tokens: u64,
    recorded: bool,
}

impl GenerationRecord {
    pub fn new(metrics: Arc<Metrics>, started: Instant) -> Self {
        GenerationRecord { metrics, started, prompt_tokens: 0, generated_tokens: 0, recorded: false }
    }

    pub fn prompt_started(&mut self, prompt_tokens: usize) {
        self.prompt_tokens = prompt_tokens as u64;
    }

    pub fn generated(&mut self, tokens: usize) {
        self.generated_tokens += tokens as u64;
    }

    /// The request was refused (an error status), so there is no generation to record.
    pub fn refused(&mut self) {
        self.recorded = true;
    }

    /// The worker finished it; its own counts replace ours.
    pub fn finish(&mut self, reason: &str, prompt_tokens: u32, completion_tokens: u32) {
        (self.prompt_tokens, self.generated_tokens) = (prompt_tokens.into(), completion_tokens.into());
        self.record(reason);
    }

    fn record(&mut self, reason: &str) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let m = &self.metrics;
        m.e2e.with_label_values(&[reason]).observe(self.started.elapsed().as_secs_f64());
        m.prompt_tokens.inc_by(self.prompt_tokens);
        m.generation_tokens.inc_by(self.generated_tokens);
    }
}

impl Drop for GenerationRecord {
    fn drop(&mut self) {
        self.record("abort");
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
