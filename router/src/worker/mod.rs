//! Workers as the router sees them: a gRPC client plus live health and load.

pub mod flags;
pub mod health;
pub mod supervisor;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::proto::worker_client::WorkerClient;
use crate::proto::{AbortRequest, InfoReply, InfoRequest, LoadReply, LoadRequest};

/// Info carries the whole tokenizer JSON (several MiB for large vocabularies).
const MAX_MESSAGE_BYTES: usize = 256 << 20;

pub struct Worker {
    pub index: usize,
    pub url: String,
    client: WorkerClient<Channel>,
    healthy: AtomicBool,
    /// Set once the worker has answered `Info`; a local worker that dies before that is not restarted.
    ready: AtomicBool,
    /// A local worker that could not be started; it is never used again.
    failed: AtomicBool,
    /// Requests this router has in flight on the worker (live, unlike the polled load).
    inflight: AtomicUsize,
    load: Mutex<LoadReply>,
}

impl Worker {
    pub fn new(index: usize, url: &str) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("bad worker URL {url:?}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let client = WorkerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Worker {
            index,
            url: url.to_string(),
            client,
            healthy: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            load: Mutex::new(LoadReply::default()),
        })
    }

    pub fn client(&self) -> WorkerClient<Channel> {
        self.client.clone()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire) && !self.failed.load(Ordering::Acquire)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Release);
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
    pub async fn poll_load(&self) -> Result<LoadReply, tonic::Status> {
        let mut request = tonic::Request::new(LoadRequest {});
        request.set_timeout(Duration::from_secs(2));
        let load = self.client().load(request).await?.into_inner();
        *self.load.lock().unwrap_or_else(|p| p.into_inner()) = load;
        Ok(load)
    }

    /// Tells the worker to drop a request, without waiting for the answer.
    pub fn abort(&self, id: String) {
        let mut client = self.client();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut request = tonic::Request::new(AbortRequest { id });
                request.set_timeout(Duration::from_secs(2));
                let _ = client.abort(request).await;
            });
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
