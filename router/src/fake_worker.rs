//! An in-process worker speaking proto/saw.proto, scripted per test.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::proto::worker_server::{Worker as WorkerService, WorkerServer};
use crate::proto::*;
use crate::tokenizer::tests::test_info;

#[derive(Default)]
pub struct Script {
    /// Tokens sent one per chunk, then a final chunk that says `length`.
    pub tokens: Vec<u32>,
    pub delay: Duration,
    /// Refuse every Generate with this status.
    pub fail: Option<Status>,
    /// Freeze (as after `kill -STOP`) once a stream has sent this many tokens.
    pub freeze_after: Option<usize>,
    /// Refuse calls without `authorization: Bearer <token>`, as the Python worker does.
    pub token: Option<String>,
}

#[derive(Default)]
pub struct Observed {
    /// Generate streams still open on the worker side.
    pub running: AtomicUsize,
    pub requests: Mutex<Vec<GenerateRequest>>,
    pub aborted: Mutex<Vec<String>>,
    /// While set, every call and stream waits: the worker answers nothing, like a stopped process.
    pub frozen: tokio::sync::watch::Sender<bool>,
}

impl Observed {
    async fn thawed(&self) {
        let _ = self.frozen.subscribe().wait_for(|&frozen| !frozen).await;
    }
}

struct Fake {
    script: Arc<Script>,
    seen: Arc<Observed>,
}

/// Starts a fake worker; returns its URL and what it observes.
pub async fn start(script: Script) -> (String, Arc<Observed>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Observed::default());
    let expected = script.token.as_ref().map(|t| format!("Bearer {t}"));
    let check_token = move |request: Request<()>| {
        let given = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        match &expected {
            Some(expected) if given != Some(expected.as_str()) => {
                Err(Status::unauthenticated("bad worker token"))
            }
            _ => Ok(request),
        }
    };
    let service =
        WorkerServer::with_interceptor(Fake { script: Arc::new(script), seen: seen.clone() }, check_token);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (url, seen)
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

fn logprob(k: u32) -> TokenLogprob {
    TokenLogprob {
        logprob: -0.5,
        top: (0..k).map(|i| TopLogprob { token_id: 3 + i, logprob: -1.0 }).collect(),
    }
}

#[tonic::async_trait]
impl WorkerService for Fake {
    type GenerateStream = ChunkStream;

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoReply>, Status> {
        self.seen.thawed().await;
        Ok(Response::new(test_info()))
    }

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<ChunkStream>, Status> {
        self.seen.thawed().await;
        if let Some(status) = &self.script.fail {
            return Err(status.clone());
        }
        let req = request.into_inner();
        self.seen.requests.lock().unwrap().push(req.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (script, seen) = (self.script.clone(), self.seen.clone());
        seen.running.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut sent = 0u32;
            let tokens = script.tokens.iter().take(req.max_new_tokens as usize);
            for (i, &id) in tokens.enumerate() {
                if script.freeze_after == Some(i) {
                    seen.frozen.send_replace(true);
                }
                seen.thawed().await;
                let mut chunk = GenerateChunk { token_ids: vec![id], ..Default::default() };
                if req.return_logprobs {
                    chunk.logprobs = vec![logprob(req.logprobs)];
                }
                if i == 0 && req.prompt_logprobs {
                    chunk.prompt_logprobs = (0..req.input_ids.len()).map(|_| logprob(req.logprobs)).collect();
                }
                if tx.send(Ok(chunk)).await.is_err() {
                    break; // the router dropped the stream
                }
                sent += 1;
                tokio::time::sleep(script.delay).await;
            }
            if sent as usize == script.tokens.len().min(req.max_new_tokens as usize) {
                let usage = Usage {
                    prompt_tokens: req.input_ids.len() as u32,
                    completion_tokens: sent,
                    cached_tokens: 0,
                };
                let last = GenerateChunk {
                    finished: FinishReason::Length as i32,
                    usage: Some(usage),
                    ..Default::default()
                };
                let _ = tx.send(Ok(last)).await;
            }
            seen.running.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<AbortReply>, Status> {
        self.seen.thawed().await;
        self.seen.aborted.lock().unwrap().push(request.into_inner().id);
        Ok(Response::new(AbortReply { found: true }))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadReply>, Status> {
        self.seen.thawed().await;
        let running = self.seen.running.load(Ordering::SeqCst) as u32;
        Ok(Response::new(LoadReply { running, ..Default::default() }))
    }
}
