//! Worker flags that `saw-router` also takes before `--`. They reach every local worker as given
//! (`--name=value`): the worker alone checks them, fills in its defaults and resolves the SGLang-fork
//! aliases, so the router holds no copy of their choices, defaults or alias rules.

use clap::Args;

#[derive(Args, Debug, Clone)]
#[command(
    next_help_heading = "Worker flags (passed to local workers as given; defaults: python -m saw_worker --help)"
)]
pub struct WorkerFlags {
    /// What runs the model in each worker: saw (its own engine, GPU or CPU) or sglang (SGLang's model runner
    /// with saw's KV pool and kernels; CUDA, SGLang installed).
    #[arg(long, value_name = "ENGINE")]
    pub engine: Option<String>,
    /// KV-cache format: bf16, int4 or int4-bdr.
    #[arg(long, value_name = "FORMAT")]
    pub kv: Option<String>,
    /// SGLang spelling of --kv: int4, bf16 or auto.
    #[arg(long, value_name = "DTYPE")]
    pub kv_cache_dtype: Option<String>,
    /// Block size of the Hadamard rotation for int4-bdr: 16, 32, 64 or 128.
    #[arg(long, value_name = "B")]
    pub hadamard_order: Option<String>,
    /// Rotate V as well as K (int4-bdr); `--rotate-v false` turns it off.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub rotate_v: Option<String>,
    /// Subtract the per-(layer, KV head) mean of K before quantizing; `--k-center false` turns it off.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub k_center: Option<String>,
    /// Divide K per channel by a calibrated power-of-two scale folded into q; `--k-scale false` turns it off.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub k_scale: Option<String>,
    /// Tokens before each step's new ones attended at bf16 from a per-request window (0 = off).
    #[arg(long, value_name = "W")]
    pub window: Option<String>,
    /// Each request's first tokens attended at bf16 from its window's ring (0 = off).
    #[arg(long, value_name = "S")]
    pub sinks: Option<String>,
    /// Layers whose K/V stay bf16 whatever --kv is, e.g. 0,1.
    #[arg(long, value_name = "I,J,...")]
    pub bf16_layers: Option<String>,
    /// How workers read weights: auto, safetensors, gguf or dummy.
    #[arg(long, value_name = "FORMAT")]
    pub load_format: Option<String>,
    /// Fraction of GPU memory for weights + KV cache.
    #[arg(long, value_name = "F")]
    pub mem_fraction: Option<String>,
    /// Fixed KV pool size per worker, e.g. 512MiB or 4GiB.
    #[arg(long, value_name = "BYTES")]
    pub kv_cache_memory: Option<String>,
    /// Decode batch limit per worker.
    #[arg(long, value_name = "N")]
    pub max_running_requests: Option<String>,
}

impl WorkerFlags {
    /// `--name=value` for every flag given, in declaration order.
    pub fn to_args(&self) -> Vec<String> {
        let given = [
            ("engine", self.engine.clone()),
            ("kv", self.kv.clone()),
            ("kv-cache-dtype", self.kv_cache_dtype.clone()),
            ("hadamard-order", self.hadamard_order.clone()),
            ("rotate-v", self.rotate_v.clone()),
            ("k-center", self.k_center.clone()),
            ("k-scale", self.k_scale.clone()),
            ("window", self.window.clone()),
            ("sinks", self.sinks.clone()),
            ("bf16-layers", self.bf16_layers.clone()),
            ("load-format", self.load_format.clone()),
            ("mem-fraction", self.mem_fraction.clone()),
            ("kv-cache-memory", self.kv_cache_memory.clone()),
            ("max-running-requests", self.max_running_requests.clone()),
        ];
        given.into_iter().filter_map(|(name, value)| Some(format!("--{name}={}", value?))).collect()
    }
}
