//! Flags of the serving limits and of the secrets (docs/router.md, "Limits" and "Auth"); each
//! default is the `Default` of the config it fills.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::conn::ConnectionLimits;
use crate::request_limits::RequestLimits;
use crate::worker::health::HealthConfig;
use crate::worker::token::{WorkerToken, TOKEN_ENV};

pub const API_KEY_ENV: &str = "SAW_API_KEY";

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Read the API key from this file (its first line) instead of --api-key, which `ps` shows.
    #[arg(long, value_name = "PATH", conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,
    /// The token remote workers (--worker-url) require on every call [default: $SAW_WORKER_TOKEN].
    /// Local workers get a fresh random one each start.
    #[arg(long, value_name = "PATH")]
    pub worker_token_file: Option<PathBuf>,
    /// A stream whose worker is out of rotation (missed health polls) fails after this long
    /// without a chunk: an error event, or a retry elsewhere / 503 before the first chunk.
    #[arg(long, value_name = "SECS", default_value_t = HealthConfig::default().stall_timeout.as_secs())]
    pub worker_stall_timeout_secs: u64,
    /// Request bodies over this get a 413 [default: 4 x the longest prompt that can fit + 1 MiB].
    #[arg(long, value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Prompts over context length x this many bytes are refused before tokenizing.
    #[arg(long, value_name = "BYTES", default_value_t = RequestLimits::default().max_prompt_bytes_per_token)]
    pub max_prompt_bytes_per_token: usize,
    /// Prompts tokenized at once [default: half the cores].
    #[arg(long, value_name = "N")]
    pub max_concurrent_tokenizations: Option<usize>,
    /// The request body must arrive within this (408 otherwise).
    #[arg(long, value_name = "SECS", default_value_t = RequestLimits::default().body_read_timeout.as_secs())]
    pub body_read_timeout_secs: u64,
    /// A request head must arrive within this of the connection opening or finishing its previous
    /// response; also closes idle keep-alive connections.
    #[arg(long, value_name = "SECS", default_value_t = ConnectionLimits::default().header_read_timeout.as_secs())]
    pub header_read_timeout_secs: u64,
    /// HTTP connections open at once; more wait to be accepted.
    #[arg(long, value_name = "N", default_value_t = ConnectionLimits::default().max_connections)]
    pub max_connections: usize,
}

impl ServeArgs {
    pub fn request_limits(&self) -> RequestLimits {
        let defaults = RequestLimits::default();
        RequestLimits {
            max_body_bytes: self.max_body_bytes,
            max_prompt_bytes_per_token: self.max_prompt_bytes_per_token,
            body_read_timeout: Duration::from_secs(self.body_read_timeout_secs),
            max_concurrent_tokenizations: self
                .max_concurrent_tokenizations
                .unwrap_or(defaults.max_concurrent_tokenizations),
        }
    }

    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            max_connections: self.max_connections,
        }
    }

    pub fn health(&self) -> HealthConfig {
        HealthConfig {
            stall_timeout: Duration::from_secs(self.worker_stall_timeout_secs),
            ..Default::default()
        }
    }

    /// The API key: `--api-key`, else `--api-key-file`, else `$SAW_API_KEY`, else none.
    pub fn api_key(
        &self,
        flag: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<String>, String> {
        let key = match (flag, &self.api_key_file) {
            (Some(key), _) => Some(key.to_string()),
            (None, Some(path)) => Some(read_secret(path)?),
            (None, None) => env(API_KEY_ENV),
        };
        if key.as_deref() == Some("") {
            return Err("the API key must not be empty".into());
        }
        Ok(key)
    }

    /// The token for remote workers: `--worker-token-file`, else `$SAW_WORKER_TOKEN`, else none.
    pub fn remote_worker_token(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<WorkerToken>, String> {
        let token = match &self.worker_token_file {
            Some(path) => Some(read_secret(path)?),
            None => env(TOKEN_ENV),
        };
        token.map(WorkerToken::new).transpose()
    }
}

/// A secret's file: its first line, without surrounding whitespace.
fn read_secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let secret = text.lines().next().unwrap_or_default().trim();
    if secret.is_empty() {
        return Err(format!("{} holds no secret (its first line is empty)", path.display()));
    }
    Ok(secret.to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::Args;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("saw-router").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_the_configs_defaults() {
        let a = parse(&[]).unwrap();
        let (limits, conn) = (a.serve.request_limits(), a.serve.connection_limits());
        assert_eq!(limits.max_prompt_bytes_per_token, 32);
        assert_eq!(limits.max_body_bytes, None);
        assert_eq!(conn.header_read_timeout.as_secs(), 10);
        assert_eq!(a.serve.health().stall_timeout.as_secs(), 3);
    }

    #[test]
    fn secrets_come_from_files_or_the_environment() {
        let dir = std::env::temp_dir().join(format!("saw-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "  k3y \nsecond line\n").unwrap();
        let path = key.to_str().unwrap();
        let a = parse(&["--api-key-file", path, "--worker-token-file", path]).unwrap();
        let env = |k: &str| (k == "SAW_API_KEY").then(|| "from-env".to_string());
        assert_eq!(a.serve.api_key(a.api_key.as_deref(), env).unwrap().as_deref(), Some("k3y"));
        let token = a.serve.remote_worker_token(|_| None).unwrap().unwrap();
        assert_eq!(token.as_str(), "k3y");
        assert!(parse(&["--api-key", "x", "--api-key-file", path]).is_err());

        let none = parse(&[]).unwrap();
        assert_eq!(none.serve.api_key(None, env).unwrap().as_deref(), Some("from-env"));
        assert_eq!(none.serve.api_key(Some("flag"), env).unwrap().as_deref(), Some("flag"));
        assert_eq!(none.serve.api_key(None, |_| None).unwrap(), None);
        let from_env = none.serve.remote_worker_token(|k| (k == "SAW_WORKER_TOKEN").then(|| "t0k".into()));
        assert_eq!(from_env.unwrap().unwrap().as_str(), "t0k");
        std::fs::write(&key, "\n").unwrap();
        assert!(a.serve.api_key(None, |_| None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
