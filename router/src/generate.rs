//! One generation: admission, worker choice (with retries before the first token), the token
//! stream turned into text events, and cleanup (abort + counters) however it ends.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tonic::{Code, Status, Streaming};

use crate::admission::Permit;
use crate::app::{AppState, Model};
use crate::detok::{Detokenizer, StopMatcher};
use crate::error::ApiError;
use crate::metrics::GenerationRecord;
use crate::openai::Usage;
use crate::proto::{FinishReason, GenerateChunk, GenerateRequest, TokenLogprob};
use crate::validate::GenParams;
use crate::worker::{InflightGuard, Worker};

/// One output token with its logprobs (when asked for).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (may be empty when tokens are held back, e.g. a possible stop string).
    Text {
        text: String,
        tokens: Vec<TokenOut>,
    },
    Finished {
        reason: &'static str,
        usage: Usage,
    },
}

pub struct Generation {
    model: Arc<Model>,
    state: Arc<AppState>,
    stream: Option<Streaming<GenerateChunk>>,
    first: Option<GenerateChunk>,
    /// Logprobs of the prompt tokens (from the first chunk), when asked for.
    pub prompt_logprobs: Vec<TokenLogprob>,
    detok: Detokenizer,
    stop: StopMatcher,
    events: VecDeque<Event>,
    params: GenParams,
    completion_tokens: u32,
    started: Instant,
    last_token: Option<Instant>,
    done: bool,
    // Dropped with the generation, i.e. with the response body: nothing leaks on disconnect.
    record: GenerationRecord,
    abort: AbortOnDrop,
    _inflight: InflightGuard,
    _running: RunningGuard,
    _permit: Permit,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Starts a generation and waits for its first chunk, so that errors up to then (bad request,
/// worker down) are still an HTTP status; a worker failing before that is retried elsewhere.
pub async fn start(
    state: &Arc<AppState>,
    model: &Arc<Model>,
    mut params: GenParams,
) -> Result<Generation, ApiError> {
    let started = Instant::now();
    // Recorded as `abort` if the client leaves while this waits for a slot or the first chunk.
    let mut record = GenerationRecord::new(state.metrics.clone(), started);
    let opened = match admit_and_open(state, &params).await {
        Ok(opened) => opened,
        Err(e) => {
            record.refused();
            return Err(e);
        }
    };
    record.prompt_started(params.input_ids.len());
    record.generated(opened.first.token_ids.len());
    let Opened { permit, worker, stream, mut first, inflight, abort } = opened;
    let prompt_logprobs = std::mem::take(&mut first.prompt_logprobs);
    state.metrics.running.inc();
    state.metrics.count_worker_request(worker.index);
    Ok(Generation {
        model: model.clone(),
        state: state.clone(),
        stream: Some(stream),
        first: Some(first),
        prompt_logprobs,
        detok: Detokenizer::new(&params.input_ids),
        stop: StopMatcher::new(std::mem::take(&mut params.stop)),
        events: VecDeque::new(),
        params,
        completion_tokens: 0,
        started,
        last_token: None,
        done: false,
        record,
        abort,
        _inflight: inflight,
        _running: RunningGuard(state.clone()),
        _permit: permit,
    })
}

/// A worker request that has sent its first chunk.
struct Opened {
    permit: Permit,
    worker: Arc<Worker>,
    stream: Streaming<GenerateChunk>,
    first: GenerateChunk,
    inflight: InflightGuard,
    abort: AbortOnDrop,
}

/// An admission slot, then healthy workers in policy order until one sends a first chunk.
async fn admit_and_open(state: &Arc<AppState>, params: &GenParams) -> Result<Opened, ApiError> {
    let permit = state.admission.acquire().await?;
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = None;
    loop {
        let candidates: Vec<Arc<Worker>> =
            state.workers.iter().filter(|w| w.is_healthy() && !tried.contains(&w.index)).cloned().collect();
        if candidates.is_empty() {
            return Err(last_error.unwrap_or_else(|| ApiError::unavailable("no healthy worker is available")));
        }
        let worker = candidates[state.policy.pick(&candidates, &params.input_ids)].clone();
        tried.push(worker.index);
        let inflight = worker.track();
        let id = format!("saw-{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let abort = AbortOnDrop { worker: worker.clone(), id: id.clone(), armed: true };
        let opened = tokio::select! {
            opened = open(&worker, request(&id, params)) => opened,
            interruption = interruption(state, &worker) => match interruption {
                Interruption::ShuttingDown => return Err(interruption.error(&worker)),
                Interruption::Stalled => {
                    eprintln!("saw-router: worker {} stalled before the first chunk of a request", worker.index);
                    last_error = Some(interruption.error(&worker));
                    continue;
                }
            },
        };
        match opened {
            Ok((stream, first)) => return Ok(Opened { permit, worker, stream, first, inflight, abort }),
            Err(status) if is_client_error(&status) => return Err(ApiError::bad_request(status.message())),
            Err(status) => {
                eprintln!("saw-router: worker {} failed a request: {}", worker.index, status.message());
                if status.code() == Code::Unavailable {
                    worker.set_healthy(false);
                }
                last_error = Some(worker_error(&worker, &status));
            }
        }
    }
}

/// Why a request ends without its worker.
enum Interruption {
    /// Out of rotation, and nothing came for the stall timeout.
    Stalled,
    /// The drain is over (server.rs).
    ShuttingDown,
}

impl Interruption {
    fn error(&self, worker: &Worker) -> ApiError {
        let mut e = match self {
            Interruption::Stalled => ApiError::unavailable(format!(
                "worker {} stopped responding; retry the request",
                worker.index
            )),
            Interruption::ShuttingDown => ApiError::unavailable("the server is shutting down"),
        };
        e.code = Some(match self {
            Interruption::Stalled => "worker_stalled",
            Interruption::ShuttingDown => "server_shutting_down",
        });
        e
    }
}

async fn interruption(state: &AppState, worker: &Worker) -> Interruption {
    let mut stop = state.stop_generations.subscribe();
    tokio::select! {
        _ = worker.unhealthy_for(state.health.stall_timeout) => Interruption::Stalled,
        _ = stop.wait_for(|&stop| stop) => Interruption::ShuttingDown,
    }
}

/// One choice of a response: its generation, and whether its usage counts the prompt (its prompt's first
/// choice does; the copies share that prompt).
pub struct Choice {
    pub generation: Generation,
    pub counts_prompt: bool,
}

impl Choice {
    /// The whole choice (non-streaming replies), with whether its usage counts the prompt.
    pub async fn collect(self) -> Result<(Collected, bool), ApiError> {
        Ok((self.generation.collect().await?, self.counts_prompt))
    }
}

/// The choices of one request, `n` per prompt, in OpenAI's order (prompt by prompt). A prompt's first
/// choice runs alone until its first token, so its full pages are in the worker's prefix cache when its
/// copies start: the prompt is computed once. Prompts start together. Copy j draws with seed + j.
pub async fn start_choices(
    state: &Arc<AppState>,
    model: &Arc<Model>,
    prompts: Vec<GenParams>,
) -> Result<Vec<Choice>, ApiError> {
    let per_prompt = prompts.into_iter().map(|params| async move {
        let copies: Vec<GenParams> = (1..params.n)
            .map(|j| {
                let mut copy = params.clone();
                copy.sampling.seed = params.sampling.seed.map(|s| s.wrapping_add(u64::from(j)));
                copy
            })
            .collect();
        let first = start(state, model, params).await?;
        let rest =
            futures_util::future::try_join_all(copies.into_iter().map(|p| start(state, model, p))).await?;
        let mut choices = vec![Choice { generation: first, counts_prompt: true }];
        choices.extend(rest.into_iter().map(|generation| Choice { generation, counts_prompt: false }));
        Ok::<_, ApiError>(choices)
    });
    Ok(futures_util::future::try_join_all(per_prompt).await?.into_iter().flatten().collect())
}

/// The usage of a whole response: completion tokens of every choice, prompt tokens once per prompt.
pub fn total_usage(parts: impl IntoIterator<Item = (Usage, bool)>) -> Usage {
    let (mut prompt, mut completion, mut cached) = (0, 0, 0);
    for (usage, counts_prompt) in parts {
        completion += usage.completion_tokens;
        if counts_prompt {
            prompt += usage.prompt_tokens;
            cached += usage.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
        }
    }
    Usage::new(prompt, completion, cached)
}

fn request(id: &str, p: &GenParams) -> GenerateRequest {
    GenerateRequest {
        id: id.to_string(),
        input_ids: p.input_ids.clone(),
        max_new_tokens: p.max_new_tokens,
        min_new_tokens: p.min_new_tokens,
        ignore_eos: p.ignore_eos,
        stop_token_ids: vec![],
        sampling: Some(p.sampling.clone()),
        logprobs: p.logprobs.unwrap_or(0),
        return_logprobs: p.logprobs.is_some(),
        prompt_logprobs: p.prompt_logprobs,
        grammar: p.grammar.clone(),
    }
}

async fn open(
    worker: &Worker,
    req: GenerateRequest,
) -> Result<(Streaming<GenerateChunk>, GenerateChunk), Status> {
    let mut stream = worker.client().generate(req).await?.into_inner();
    match stream.message().await? {
        Some(first) => Ok((stream, first)),
        None => Err(Status::internal("worker closed the stream without output")),
    }
}

fn is_client_error(status: &Status) -> bool {
    matches!(status.code(), Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition)
}

/// A worker failure is the server's, and passing: 503 with `Retry-After` (a worker that crashed
/// answers its requests in flight with INTERNAL or UNKNOWN, and is restarted).
fn worker_error(worker: &Worker, status: &Status) -> ApiError {
    match status.code() {
        Code::ResourceExhausted => {
            ApiError::unavailable(format!("worker {} is out of capacity: {}", worker.index, status.message()))
        }
        _ => ApiError::unavailable(format!("worker {} failed: {}", worker.index, status.message())),
    }
}

/// A whole generation, for non-streaming replies.
pub struct Collected {
    pub text: String,
    pub tokens: Vec<TokenOut>,
    pub reason: &'static str,
    pub usage: Usage,
}

impl Generation {
    pub async fn collect(mut self) -> Result<Collected, ApiError> {
        let (mut text, mut tokens) = (String::new(), Vec::new());
        while let Some(event) = self.next().await {
            match event? {
                Event::Text { text: t, tokens: mut k } => {
                    text.push_str(&t);
                    tokens.append(&mut k);
                }
                Event::Finished { reason, usage } => return Ok(Collected { text, tokens, reason, usage }),
            }
        }
        Err(ApiError::upstream("generation ended without a finish"))
    }

    /// The next event; `None` after `Finished` or an error.
    pub async fn next(&mut self) -> Option<Result<Event, ApiError>> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            let chunk = match self.first.take() {
                Some(chunk) => chunk,
                None => {
                    let (stream, worker) = (self.stream.as_mut()?, &self.abort.worker);
                    let message = tokio::select! {
                        message = stream.message() => message,
                        interruption = interruption(&self.state, worker) => {
                            self.done = true;
                            let error = interruption.error(worker);
                            eprintln!("saw-router: a request on worker {} ended: {}", worker.index, error.message);
                            return Some(Err(error));
                        }
                    };
                    match message {
                        Ok(Some(chunk)) => {
                            self.record.generated(chunk.token_ids.len());
                            chunk
                        }
                        Ok(None) => {
                            self.done = true;
                            return Some(Err(ApiError::upstream("worker ended the stream before finishing")));
                        }
                        Err(status) => {
                            self.done = true;
                            eprintln!("saw-router: worker {} failed mid-request: {}", worker.index, status);
                            if status.code() == Code::Unavailable {
                                // New requests go elsewhere until the health poller sees it back.
                                worker.set_healthy(false);
                            }
                            return Some(Err(worker_error(worker, &status)));
                        }
                    }
                }
            };
            self.absorb(chunk);
        }
    }

    fn absorb(&mut self, chunk: GenerateChunk) {
        self.time_tokens(chunk.token_ids.len());
        let tok = &self.model.tokenizer;
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut stopped = false;
        for (i, &id) in chunk.token_ids.iter().enumerate() {
            self.completion_tokens += 1;
            if self.params.discard_output {
                continue;
            }
            let scan = self.stop.push(&self.detok.push(tok, id));
            text.push_str(&scan.text);
            if self.params.logprobs.is_some() {
                let lp = chunk.logprobs.get(i);
                tokens.push(TokenOut {
                    id,
                    logprob: lp.map_or(0.0, |l| l.logprob),
                    top: lp
                        .map_or_else(Vec::new, |l| l.top.iter().map(|t| (t.token_id, t.logprob)).collect()),
                });
            }
            if scan.stopped {
                stopped = true;
                break;
            }
        }
        let finished = FinishReason::try_from(chunk.finished).unwrap_or(FinishReason::Unspecified);
        let reason = if stopped {
            // Our own stop string: the worker request is dropped and aborted now.
            self.stream = None;
            self.abort.fire();
            Some("stop")
        } else if finished != FinishReason::Unspecified {
            self.abort.armed = false;
            let tail = self.detok.flush(tok);
            let scan = self.stop.push(&tail);
            text.push_str(&scan.text);
            if !scan.stopped {
                text.push_str(&self.stop.flush());
            }
            Some(if scan.stopped { "stop" } else { finish_reason(finished) })
        } else {
            None
        };
        if !text.is_empty() || !tokens.is_empty() {
            self.events.push_back(Event::Text { text, tokens });
        }
        if let Some(reason) = reason {
            let usage = self.usage(chunk.usage.filter(|_| !stopped));
            self.record.finish(reason, usage.prompt_tokens, usage.completion_tokens);
            self.events.push_back(Event::Finished { reason, usage });
            self.done = true;
        }
    }

    fn usage(&self, reported: Option<crate::proto::Usage>) -> Usage {
        let shown = |n: u32| if self.params.discard_output { 0 } else { n };
        match reported {
            Some(u) => Usage::new(u.prompt_tokens, shown(u.completion_tokens), u.cached_tokens),
            None => Usage::new(self.params.input_ids.len() as u32, shown(self.completion_tokens), 0),
        }
    }

    fn time_tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let metrics = &self.state.metrics;
        match self.last_token {
            None => metrics.ttft.observe((now - self.started).as_secs_f64()),
            Some(last) => {
                let gap = (now - last).as_secs_f64() / n as f64;
                for _ in 0..n {
                    metrics.inter_token.observe(gap);
                }
            }
        }
        self.last_token = Some(now);
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
        FinishReason::Stop | FinishReason::Unspecified => "stop",
    }
}

/// Sends `Abort` for a request that is dropped before the worker finished it (client gone,
/// stop string, error). Dropping the gRPC stream cancels it too; the explicit abort makes sure.
struct AbortOnDrop {
    worker: Arc<Worker>,
    id: String,
    armed: bool,
}

impl AbortOnDrop {
    fn fire(&mut self) {
        if std::mem::take(&mut self.armed) {
            self.worker.abort(self.id.clone());
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.fire();
    }
}

struct RunningGuard(Arc<AppState>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.metrics.running.dec();
    }
}
