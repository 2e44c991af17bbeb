//! Command line of `saw-router`, including the environment aliases of the saw-int4 SGLang fork.

use clap::{Parser, ValueEnum};

use crate::serve_args::ServeArgs;

const ENV_HELP: &str = "\
Environment aliases (spellings of the saw-int4 SGLang fork; explicit flags always win):
  HADAMARD=1        with --kv int4 (or --kv-cache-dtype int4): use int4-bdr
  HADAMARD=0        with no --kv given: use int4 instead of the default int4-bdr
  HADAMARD_ORDER=b  same as --hadamard-order b
  ROTATE_V=0|1      same as --rotate-v false|true
  --kv-cache-dtype int4|bf16|auto is accepted as a spelling of --kv int4|bf16|bf16.

Examples:
  saw-router --workers 1 --kv int4-bdr
  saw-router --worker-url http://gpu-a:50051 --worker-url http://gpu-b:50051";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "saw-router",
    bin_name = "saw-router",
    version,
    about = "OpenAI-compatible server for saw: routes requests over local or remote saw workers",
    after_help = ENV_HELP
)]
pub struct Args {
    /// Local worker processes to spawn (one per visible GPU with --device cuda, else CPU workers).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Model: built-in alias (smollm2-135m, qwen2.5-coder-0.5b), HF folder or .gguf file.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// KV-cache format [default: int4-bdr].
    #[arg(long, value_enum)]
    pub kv: Option<KvFormat>,
    /// SGLang-style alias of --kv (int4 = --kv int4, bf16/auto = --kv bf16).
    #[arg(long, value_enum)]
    pub kv_cache_dtype: Option<KvCacheDtype>,
    /// Block size of the Hadamard rotation for int4-bdr (worker default: 128 at head_dim >= 128, else 32).
    #[arg(long, value_parser = ["16", "32", "64", "128"])]
    pub hadamard_order: Option<String>,
    /// Rotate V as well as K (int4-bdr). `--rotate-v false` turns it off.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub rotate_v: Option<bool>,
    /// Subtract the per-(layer, KV head) mean of K before quantizing (worker default: on for int4 and
    /// int4-bdr). `--k-center false` turns it off.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub k_center: Option<bool>,
    /// Divide K per channel by a calibrated power-of-two scale folded into q (worker default: on for int4
    /// and int4-bdr). `--k-scale false` turns it off.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub k_scale: Option<bool>,
    /// Tokens before each step's new ones attended at bf16 from a per-request window (worker default: 16
    /// for int4 and int4-bdr; 0 turns it off).
    #[arg(long, value_name = "W")]
    pub window: Option<u32>,
    /// Each request's first tokens attended at bf16 from its window's ring (worker default: 4 for int4
    /// and int4-bdr; 0 turns them off).
    #[arg(long, value_name = "S")]
    pub sinks: Option<u32>,
    /// Layers whose K/V stay bf16 whatever --kv is, e.g. 0,1 (passed to workers).
    #[arg(long, value_name = "I,J,...")]
    pub bf16_layers: Option<String>,
    /// How workers read weights: auto, safetensors, gguf, dummy.
    #[arg(long)]
    pub load_format: Option<String>,
    /// Where local workers run.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Fraction of GPU memory for weights + KV cache (passed to workers).
    #[arg(long)]
    pub mem_fraction: Option<f64>,
    /// Fixed KV pool size per worker, e.g. 512MiB or 4GiB (passed to workers).
    #[arg(long)]
    pub kv_cache_memory: Option<String>,
    /// Decode batch limit per worker (passed to workers).
    #[arg(long)]
    pub max_running_requests: Option<u32>,
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
    pub serve: ServeArgs,
    /// Further flags for every local worker, given after `--` and passed on as they are
    /// (`python -m saw_worker --help` lists them), e.g. `-- --max-prefill-tokens 4096 --no-prefix-cache`.
    #[arg(last = true, value_name = "WORKER FLAGS")]
    pub worker_args: Vec<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvFormat {
    Bf16,
    Int4,
    Int4Bdr,
}

impl KvFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            KvFormat::Bf16 => "bf16",
            KvFormat::Int4 => "int4",
            KvFormat::Int4Bdr => "int4-bdr",
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheDtype {
    Auto,
    Bf16,
    Int4,
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
    /// The KV format after aliases: flag, then `--kv-cache-dtype`, then `HADAMARD`.
    pub fn kv_format(&self, env: impl Fn(&str) -> Option<String>) -> KvFormat {
        let from_dtype = self.kv_cache_dtype.map(|d| match d {
            KvCacheDtype::Int4 => KvFormat::Int4,
            KvCacheDtype::Bf16 | KvCacheDtype::Auto => KvFormat::Bf16,
        });
        let hadamard = env("HADAMARD");
        match (self.kv, from_dtype) {
            (Some(kv), _) => kv,
            (None, Some(KvFormat::Int4)) if hadamard.as_deref() == Some("1") => KvFormat::Int4Bdr,
            (None, Some(kv)) => kv,
            (None, None) if hadamard.as_deref() == Some("0") => KvFormat::Int4,
            (None, None) => KvFormat::Int4Bdr,
        }
    }

    /// Flags for `python -m saw_worker`, with every alias resolved here so workers see explicit values.
    pub fn worker_flags(&self, env: impl Fn(&str) -> Option<String>) -> Vec<String> {
        let mut flags =
            vec!["--model".into(), self.model.clone(), "--kv".into(), self.kv_format(&env).as_str().into()];
        if let Some(order) = self.hadamard_order.clone().or_else(|| env("HADAMARD_ORDER")) {
            flags.extend(["--hadamard-order".into(), order]);
        }
        let rotate_v =
            self.rotate_v.or_else(|| env("ROTATE_V").map(|v| v == "1" || v.eq_ignore_ascii_case("true")));
        push_switch(&mut flags, "rotate-v", rotate_v);
        push_switch(&mut flags, "k-center", self.k_center);
        push_switch(&mut flags, "k-scale", self.k_scale);
        let passthrough = [
            ("--window", self.window.map(|w| w.to_string())),
            ("--sinks", self.sinks.map(|s| s.to_string())),
            ("--bf16-layers", self.bf16_layers.clone()),
            ("--load-format", self.load_format.clone()),
            ("--mem-fraction", self.mem_fraction.map(|f| f.to_string())),
            ("--kv-cache-memory", self.kv_cache_memory.clone()),
            ("--max-running-requests", self.max_running_requests.map(|n| n.to_string())),
        ];
        for (flag, value) in passthrough {
            if let Some(value) = value {
                flags.extend([flag.to_string(), value]);
            }
        }
        flags.extend(self.worker_args.iter().cloned());
        flags
    }
}

/// `--name`, `--no-name`, or nothing when the user left it to the worker.
fn push_switch(flags: &mut Vec<String>, name: &str, value: Option<bool>) {
    match value {
        Some(true) => flags.push(format!("--{name}")),
        Some(false) => flags.push(format!("--no-{name}")),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("saw-router").chain(args.iter().copied())).unwrap()
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn defaults() {
        let a = parse(&[]);
        assert_eq!((a.workers, a.port, a.host.as_str()), (1, 30000, "127.0.0.1"));
        assert_eq!(a.policy, PolicyKind::CacheAware);
        assert_eq!(a.worker_flags(env(&[])), ["--model", "smollm2-135m", "--kv", "int4-bdr"]);
    }

    #[test]
    fn sglang_fork_aliases() {
        let a = parse(&["--kv-cache-dtype", "int4"]);
        assert_eq!(a.kv_format(env(&[("HADAMARD", "1")])), KvFormat::Int4Bdr);
        assert_eq!(a.kv_format(env(&[])), KvFormat::Int4);
        assert_eq!(parse(&[]).kv_format(env(&[("HADAMARD", "0")])), KvFormat::Int4);
        let flags = parse(&[]).worker_flags(env(&[("HADAMARD_ORDER", "64"), ("ROTATE_V", "1")]));
        assert_eq!(flags[4..], ["--hadamard-order", "64", "--rotate-v"]);
    }

    #[test]
    fn explicit_flags_win() {
        let a = parse(&["--kv", "int4", "--hadamard-order", "32", "--rotate-v", "false"]);
        let vars = [("HADAMARD", "1"), ("HADAMARD_ORDER", "128"), ("ROTATE_V", "1")];
        assert_eq!(a.kv_format(env(&vars)), KvFormat::Int4);
        assert_eq!(a.worker_flags(env(&vars))[3..], ["int4", "--hadamard-order", "32", "--no-rotate-v"]);
    }

    #[test]
    fn k_center_is_left_to_the_worker_unless_given() {
        let flags = |args: &[&str]| parse(args).worker_flags(env(&[]))[4..].to_vec();
        assert!(flags(&[]).is_empty());
        assert_eq!(flags(&["--k-center"]), ["--k-center"]);
        assert_eq!(flags(&["--k-center", "false"]), ["--no-k-center"]);
    }

    #[test]
    fn accuracy_levers_and_trailing_worker_flags_reach_the_worker() {
        let flags = |args: &[&str]| parse(args).worker_flags(env(&[]))[4..].to_vec();
        assert_eq!(flags(&["--k-scale", "false", "--window", "0"]), ["--no-k-scale", "--window", "0"]);
        assert_eq!(flags(&["--sinks", "2", "--window", "32"]), ["--window", "32", "--sinks", "2"]);
        assert_eq!(
            flags(&["--window", "16", "--", "--max-prefill-tokens", "1", "--no-prefix-cache"]),
            ["--window", "16", "--max-prefill-tokens", "1", "--no-prefix-cache"]
        );
    }

    #[test]
    fn policy_names() {
        assert_eq!(parse(&["--policy", "round_robin"]).policy, PolicyKind::RoundRobin);
        assert_eq!(parse(&["--policy", "least-load"]).policy, PolicyKind::LeastLoad);
    }
}
