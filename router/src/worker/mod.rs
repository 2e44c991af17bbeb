//! Workers as the router sees them: a gRPC client plus live health and load.

pub mod flags;
pub mod health;
pub mod supervisor;
pub mod token;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::proto::worker_client::WorkerClient;
use crate::proto::{AbortRequest, InfoReply, InfoRequest, LoadReply, LoadRequest};
use token::{AttachToken, WorkerToken};

/// Info carries the whole tokenizer JSON (several MiB for large vocabularies).
const MAX_MESSAGE_BYTES: usize = 256 << 20;
const ABORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Aborts kept for a worker that is unreachable; beyond this the oldest are dropped.
const MAX_UNDELIVERED_ABORTS: usize = 4096;

pub type Client = WorkerClient<InterceptedService<Channel, AttachToken>>;

pub struct Worker {
    pub index: usize,
    pub url: String,
    client: Client,
    /// In rotation or not; generations on the worker watch it to notice a stall.
    healthy: watch::Sender<bool>,
    /// Set once the worker has answered `Info`; a local worker that dies before that is not restarted.
    ready: AtomicBool,
    /// A local worker that could not be started; it is never used again.
    failed: AtomicBool,
    /// Requests this router has in flight on the worker (live, unlike the polled load).
    inflight: AtomicUsize,
    load: Mutex<LoadReply>,
    /// Aborts the worker did not acknowledge (it was unreachable), resent when it answers again.
    undelivered_aborts: Mutex<Vec<String>>,
}

impl Worker {
    /// A worker at `url`; every call carries `token` when given (see `token.rs`).
    pub fn new(index: usize, url: &str, token: Option<&WorkerToken>) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("bad worker URL {url:?}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let client = WorkerClient::with_interceptor(endpoint.connect_lazy(), AttachToken::new(token))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Worker {
            index,
            url: url.to_string(),
            client,
            healthy: watch::Sender::new(false),
            ready: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            load: Mutex::new(LoadReply::default()),
            undelivered_aborts: Mutex::new(Vec::new()),
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn is_healthy(&self) -> bool {
        *self.healthy.borrow() && !self.failed.load(Ordering::Acquire)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
    }

    /// Resolves once the worker has been out of rotation for `grace` without a break, counted from
    /// now at the earliest: a stream that waits on it gets `grace` after its last chunk or after the
    /// health poll gave up on the worker, whichever is later.
    pub async fn unhealthy_for(&self, grace: Duration) {
        let mut healthy = self.healthy.subscribe();
        loop {
            if healthy.wait_for(|&h| !h).await.is_err() {
                return;
            }
            if tokio::time::timeout(grace, healthy.wait_for(|&h| h)).await.is_err() {
                return;
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub fn mark_failed(&self) {
        self.failed.store(true, Ordering::Release);
        self.set_healthy(false);
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// The last polled load.
    pub fn load(&self) -> LoadReply {
        *self.load.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a request against this worker until the guard is dropped.
    pub fn track(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard(self.clone())
    }

    /// `Info`, which marks the worker ready and healthy when it answers.
    pub async fn info(&self) -> Result<InfoReply, tonic::Status> {
        let mut request = tonic::Request::new(InfoRequest {});
        request.set_timeout(Duration::from_secs(10));
        let info = self.client().info(request).await?.into_inner();
        self.ready.store(true, Ordering::Release);
        self.set_healthy(true);
        Ok(info)
    }

    /// Polls `Load` and remembers the answer.
    pub async fn poll_load(&self, timeout: Duration) -> Result<LoadReply, tonic::Status> {
        let mut request = tonic::Request::new(LoadRequest {});
        request.set_timeout(timeout);
        let load = self.client().load(request).await?.into_inner();
        *self.load.lock().unwrap_or_else(|p| p.into_inner()) = load;
        Ok(load)
    }

    /// Tells the worker to drop a request, without waiting for the answer. If the worker cannot be
    /// reached (e.g. frozen), the abort is kept and resent by `resend_aborts` once it answers again.
    pub fn abort(self: &Arc<Self>, id: String) {
        let worker = self.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut request = tonic::Request::new(AbortRequest { id: id.clone() });
                request.set_timeout(ABORT_TIMEOUT);
                if worker.client().abort(request).await.is_err() {
                    let mut undelivered = worker.undelivered_aborts.lock().unwrap_or_else(|p| p.into_inner());
                    if undelivered.len() >= MAX_UNDELIVERED_ABORTS {
                        undelivered.remove(0);
                    }
                    undelivered.push(id);
                }
            });
        }
    }

    /// Sends the aborts that did not get through before (called when the worker answered a poll).
    pub fn resend_aborts(self: &Arc<Self>) {
        let ids = std::mem::take(&mut *self.undelivered_aborts.lock().unwrap_or_else(|p| p.into_inner()));
        for id in ids {
            self.abort(id);
        }
    }
}

/// Releases one in-flight count on drop, however the request ends.
pub struct InflightGuard(Arc<Worker>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}
