//! What a generation request may cost before the router has looked at it: the body size (sized
//! from the context length), the prompt's bytes (a bound checked before tokenizing), the time to
//! send the body, and how many prompts are tokenized at once. Bodies must be plain (not encoded).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::app::AppState;
use crate::error::ApiError;

/// Room in the body for everything but the prompt (sampling fields, message wrappers, ...).
const BODY_SLACK_BYTES: usize = 1 << 20;
/// JSON escapes make a prompt longer in the body than as text (`\n`, `\"`, `\u00e9` for `é`).
const JSON_ESCAPE_FACTOR: usize = 4;

#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// Bodies larger than this get a 413; `None` sizes the limit from the context length.
    pub max_body_bytes: Option<usize>,
    /// A prompt of more than context length x this many bytes cannot fit in the context: it is
    /// refused before tokenizing (real text averages 3-5 bytes per token).
    pub max_prompt_bytes_per_token: usize,
    /// The whole body must arrive within this (408 otherwise).
    pub body_read_timeout: Duration,
    /// Prompts templated and tokenized at once; the others wait, so that large prompts cannot take
    /// every core from the rest of the server.
    pub max_concurrent_tokenizations: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_body_bytes: None,
            max_prompt_bytes_per_token: 32,
            body_read_timeout: Duration::from_secs(30),
            max_concurrent_tokenizations: default_tokenizations(),
        }
    }
}

/// Half the cores (at least one): the other half keeps serving while long prompts are tokenized.
fn default_tokenizations() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

impl RequestLimits {
    pub fn max_prompt_bytes(&self, context_length: u32) -> usize {
        (context_length as usize).saturating_mul(self.max_prompt_bytes_per_token)
    }

    /// The body limit: the flag, else room for the longest prompt that can fit, JSON-escaped.
    pub fn max_body_bytes(&self, context_length: Option<u32>) -> usize {
        self.max_body_bytes.unwrap_or_else(|| {
            let prompt = self.max_prompt_bytes(context_length.unwrap_or(0));
            prompt.saturating_mul(JSON_ESCAPE_FACTOR).saturating_add(BODY_SLACK_BYTES)
        })
    }
}

/// Middleware for the generation routes: reads the whole body within the limits (or refuses it),
/// so handlers get it in memory.
pub async fn read_body(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let context_length = state.model.get().map(|m| m.tokenizer.context_length);
    let max_bytes = state.limits.max_body_bytes(context_length);
    match buffer(request, max_bytes, state.limits.body_read_timeout).await {
        Ok(request) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

async fn buffer(request: Request, max_bytes: usize, timeout: Duration) -> Result<Request, ApiError> {
    let (parts, body) = request.into_parts();
    if let Some(encoding) = parts.headers.get(header::CONTENT_ENCODING) {
        if !encoding.as_bytes().eq_ignore_ascii_case(b"identity") {
            let shown = String::from_utf8_lossy(encoding.as_bytes());
            return Err(ApiError::unsupported_media_type(format!(
                "Content-Encoding {shown:?} is not supported; send the body uncompressed"
            )));
        }
    }
    let too_large = || {
        ApiError::payload_too_large(format!(
            "the request body is larger than {max_bytes} bytes (the prompt cannot fit in the context)"
        ))
    };
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_bytes as u64) {
        return Err(too_large());
    }
    let bytes = match tokio::time::timeout(timeout, Limited::new(body, max_bytes).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Ok(Err(e)) => return Err(ApiError::bad_request(format!("cannot read the request body: {e}"))),
        Err(_) => {
            return Err(ApiError::request_timeout(format!(
                "the request body did not arrive within {}s",
                timeout.as_secs_f64()
            )))
        }
    };
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_limit_follows_the_context_unless_set() {
        let limits = RequestLimits { max_prompt_bytes_per_token: 32, ..Default::default() };
        assert_eq!(limits.max_prompt_bytes(8192), 256 << 10);
        assert_eq!(limits.max_body_bytes(Some(8192)), (1 << 20) + 4 * (256 << 10));
        assert_eq!(limits.max_body_bytes(None), 1 << 20);
        let fixed = RequestLimits { max_body_bytes: Some(5000), ..limits };
        assert_eq!(fixed.max_body_bytes(Some(8192)), 5000);
    }
}
