//! The secret shared by the router and its workers. Every gRPC call carries it as
//! `authorization: Bearer <token>`, and a worker that has one refuses calls without it, so the
//! worker port is no way around the router's API key.

use std::fmt::Write as _;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The environment variable that hands the token to a worker (never argv, which `ps` shows).
pub const TOKEN_ENV: &str = "SAW_WORKER_TOKEN";

#[derive(Clone)]
pub struct WorkerToken(String);

impl WorkerToken {
    /// A fresh random token (32 bytes from the kernel, as hex) for the local workers of one start.
    pub fn generate() -> Result<Self, String> {
        let mut bytes = [0u8; 32];
        // SAFETY: getrandom writes at most `len` bytes into the buffer we own.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if n != bytes.len() as isize {
            return Err(format!("cannot make a worker token: {}", std::io::Error::last_os_error()));
        }
        let hex = bytes.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
        Ok(WorkerToken(hex))
    }

    /// A token given by the user (for remote workers); it must be printable ASCII to travel as metadata.
    pub fn new(token: String) -> Result<Self, String> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the worker token must be non-empty printable ASCII without spaces".into());
        }
        Ok(WorkerToken(token))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Adds the token to every call to a worker (nothing when the worker needs none).
#[derive(Clone)]
pub struct AttachToken(Option<MetadataValue<Ascii>>);

impl AttachToken {
    pub fn new(token: Option<&WorkerToken>) -> Self {
        // `WorkerToken` holds printable ASCII only, which is always valid metadata.
        AttachToken(token.and_then(|t| format!("Bearer {}", t.0).parse().ok()))
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_fresh_hex() {
        let (a, b) = (WorkerToken::generate().unwrap(), WorkerToken::generate().unwrap());
        assert_eq!(a.as_str().len(), 64);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.as_str(), b.as_str());
    }

    #[test]
    fn user_tokens_must_be_metadata_safe() {
        assert!(WorkerToken::new("s3cret-token".into()).is_ok());
        assert!(WorkerToken::new(String::new()).is_err());
        assert!(WorkerToken::new("with space".into()).is_err());
        assert!(WorkerToken::new("naïve".into()).is_err());
    }
}
