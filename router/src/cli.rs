//! Command line of `saw-router`: its own flags, and the worker flags it passes on (worker/flags.rs).

use clap::{Parser, ValueEnum};

use crate::serve_args::ServeArgs;
use crate::worker::flags::WorkerFlags;

const AFTER_HELP: &str = "\
Any other worker flag goes after `--` and reaches every local worker as it is
(`python -m saw_worker --help` lists them all), e.g.
  saw-router --workers 1 -- --no-prefix-cache --max-prefill-tokens 4096

Local workers inherit the environment: the worker resolves the saw-int4 SGLang fork's aliases
HADAMARD, HADAMARD_ORDER and ROTATE_V (explicit flags win).

Examples:
  saw-router --workers 1 --kv int4-bdr
  saw-router --worker-url http://gpu-a:50051 --worker-url http://gpu-b:50051";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "saw-router",
    bin_name = "saw-router",
    version,
    about = "OpenAI-compatible server for saw: routes requests over local or remote saw workers",
    after_help = AFTER_HELP
)]
pub struct Args {
    /// Local worker processes to spawn (one per visible GPU with --device cuda, else CPU workers).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Model for local workers, and their served name unless --served-model-name: built-in alias
    /// (smollm2-135m, qwen2.5-coder-0.5b), HF folder or .gguf file.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Where local workers run.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// HTTP port.
    #[arg(long, default_value_t = 30000)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on /v1/* routes (`ps` shows flags: prefer --api-key-file or
    /// $SAW_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests served at once; more wait in the queue.
    #[arg(long, default_value_t = 256)]
    pub max_concurrent_requests: usize,
    /// Requests that may wait for a slot; beyond this the router answers 429.
    #[arg(long, default_value_t = 1024)]
    pub queue_size: usize,
    /// How long a request may wait in the queue before a 429.
    #[arg(long, default_value_t = 120)]
    pub queue_timeout_secs: u64,
    /// Routing policy.
    #[arg(long, value_enum, default_value_t = PolicyKind::CacheAware)]
    pub policy: PolicyKind,
    /// A remote worker's gRPC URL (repeatable); no local workers are spawned then.
    #[arg(long = "worker-url", value_name = "URL")]
    pub worker_urls: Vec<String>,
    /// First gRPC port of local workers (worker i uses base + i) [default: free ports].
    #[arg(long)]
    pub worker_base_port: Option<u16>,
    /// Model name shown in /v1/models and responses [default: --model, or the worker's model id].
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// How long to wait for workers to load before giving up.
    #[arg(long, default_value_t = 900)]
    pub startup_timeout_secs: u64,
    #[command(flatten)]
    pub worker: WorkerFlags,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Any other worker flag, after `--`: passed to every local worker as it is.
    #[arg(last = true, value_name = "WORKER FLAGS")]
    pub worker_args: Vec<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    #[value(name = "round_robin", alias = "round-robin")]
    RoundRobin,
    #[value(name = "least_load", alias = "least-load")]
    LeastLoad,
    #[value(name = "cache_aware", alias = "cache-aware")]
    CacheAware,
}

impl Args {
    /// Flags for `python -m saw_worker`: the model, the worker flags given, then those after `--`, all as given.
    pub fn worker_flags(&self) -> Vec<String> {
        let mut flags = vec![format!("--model={}", self.model)];
        flags.extend(self.worker.to_args());
        flags.extend(self.worker_args.iter().cloned());
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("saw-router").chain(args.iter().copied())).unwrap()
    }

    fn worker_flags(args: &[&str]) -> Vec<String> {
        parse(args).worker_flags()
    }

    #[test]
    fn defaults() {
        let a = parse(&[]);
        assert_eq!((a.workers, a.port, a.host.as_str()), (1, 30000, "127.0.0.1"));
        assert_eq!(a.policy, PolicyKind::CacheAware);
        // The worker's own defaults apply: nothing but the model is passed.
        assert_eq!(a.worker_flags(), ["--model=smollm2-135m"]);
    }

    #[test]
    fn worker_flags_pass_as_given() {
        let flags = worker_flags(&[
            "--kv",
            "int4",
            "--hadamard-order",
            "32",
            "--window",
            "0",
            "--bf16-layers",
            "0,1",
        ]);
        assert_eq!(flags[1..], ["--kv=int4", "--hadamard-order=32", "--window=0", "--bf16-layers=0,1"]);
        // SGLang spellings are the worker's to resolve.
        assert_eq!(worker_flags(&["--kv-cache-dtype", "int4"])[1..], ["--kv-cache-dtype=int4"]);
        assert_eq!(
            worker_flags(&["--engine", "sglang", "--kv", "int4-bdr"])[1..],
            ["--engine=sglang", "--kv=int4-bdr"]
        );
    }

    #[test]
    fn switches_pass_with_their_value() {
        assert_eq!(worker_flags(&["--k-center"])[1..], ["--k-center=true"]);
        assert_eq!(
            worker_flags(&["--k-center", "false", "--rotate-v", "--k-scale=0"])[1..],
            ["--rotate-v=true", "--k-center=false", "--k-scale=0"]
        );
    }

    #[test]
    fn trailing_worker_flags_follow_as_they_are() {
        assert_eq!(
            worker_flags(&["--sinks", "2", "--", "--max-prefill-tokens", "1", "--no-prefix-cache"])[1..],
            ["--sinks=2", "--max-prefill-tokens", "1", "--no-prefix-cache"]
        );
    }

    #[test]
    fn policy_names() {
        assert_eq!(parse(&["--policy", "round_robin"]).policy, PolicyKind::RoundRobin);
        assert_eq!(parse(&["--policy", "least-load"]).policy, PolicyKind::LeastLoad);
    }
}
