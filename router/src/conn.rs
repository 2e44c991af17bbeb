//! HTTP connections, served on hyper directly (not `axum::serve`) so that each has a header-read
//! timeout and their number is capped; plus the header size limit with an OpenAI error object.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Request heads beyond these get a 431 error object from `check_headers`.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
pub const MAX_HEADERS: usize = 100;
// hyper answers heads over its own limits with a bare 431; they sit above ours so that ours apply.
const HYPER_MAX_HEADERS: usize = 4 * MAX_HEADERS;
const HYPER_MAX_BUF_BYTES: usize = 4 * MAX_HEADER_BYTES;
/// After a failed accept (e.g. out of file descriptors), wait this long instead of spinning.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// A request head must be complete this long after the connection opened or finished its
    /// previous response. hyper runs the timer from the moment it waits for a head, so the same
    /// bound closes idle keep-alive connections and half-sent heads.
    pub header_read_timeout: Duration,
    /// Connections open at once; beyond it new ones wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { header_read_timeout: Duration::from_secs(10), max_connections: 2048 }
    }
}

/// Accepts connections until `stop` resolves, then closes the listener. The returned handle's
/// `shutdown()` resolves once every connection has finished its current request and closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &ConnectionLimits,
    stop: impl Future<Output = ()>,
) -> GracefulShutdown {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(HYPER_MAX_HEADERS)
        .max_buf_size(HYPER_MAX_BUF_BYTES);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            _ = &mut stop => break,
        };
        // The semaphore is never closed.
        let Ok(slot) = slot else { break };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        // Token streams are many small writes.
        let _ = stream.set_nodelay(true);
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    connections
}

/// Refuses request heads over `MAX_HEADERS` headers or `MAX_HEADER_BYTES` bytes with a 431.
pub async fn check_headers(request: Request, next: Next) -> Response {
    let headers = request.headers();
    // Each header line is `name: value\r\n`.
    let bytes: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::headers_too_large(format!(
            "the request has {} headers of {bytes} bytes; at most {MAX_HEADERS} headers of {MAX_HEADER_BYTES} \
             bytes are accepted",
            headers.len()
        ))
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::app::app;
    use crate::app_tests::state_with;

    /// Serves the test app on a free port until the returned sender is dropped.
    async fn server(limits: ConnectionLimits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.await;
            };
            serve(listener, app(state_with(vec![], None)), &limits, stop).await;
        });
        (addr, stop)
    }

    /// Reads until the server closes the connection; returns what came and when it closed.
    async fn read_to_close(stream: &mut TcpStream) -> (String, Instant) {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await.unwrap();
        (String::from_utf8_lossy(&out).into_owned(), Instant::now())
    }

    const TIMEOUT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_half_sent_head_is_closed_at_the_header_timeout() {
        let limits = ConnectionLimits { header_read_timeout: TIMEOUT, ..Default::default() };
        let (addr, _stop) = server(limits).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let sent = Instant::now();
        stream.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le").await.unwrap();
        let (_, closed) = read_to_close(&mut stream).await;
        let waited = closed - sent;
        assert!(waited >= TIMEOUT - Duration::from_millis(50) && waited < TIMEOUT * 4, "{waited:?}");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed() {
        let limits = ConnectionLimits { header_read_timeout: TIMEOUT, ..Default::default() };
        let (addr, _stop) = server(limits).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let sent = Instant::now();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let (reply, closed) = read_to_close(&mut stream).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        // Kept alive after the response, then closed for idling.
        let open = closed - sent;
        assert!(open >= TIMEOUT - Duration::from_millis(50) && open < TIMEOUT * 4, "{open:?}");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_free_slot() {
        let (addr, _stop) = server(ConnectionLimits { max_connections: 1, ..Default::default() }).await;
        let first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut byte = [0u8; 1];
        assert!(
            tokio::time::timeout(TIMEOUT, second.read(&mut byte)).await.is_err(),
            "served over the limit"
        );
        drop(first);
        let (reply, _) = read_to_close(&mut second).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }

    #[tokio::test]
    async fn too_many_headers_get_an_error_object_over_the_wire() {
        let (addr, _stop) = server(ConnectionLimits::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let headers: String = (0..150).map(|i| format!("x-{i}: 1\r\n")).collect();
        let head = format!("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let (reply, _) = read_to_close(&mut stream).await;
        assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
        assert!(reply.contains(r#""code":"headers_too_large""#), "{reply}");
    }
}
