//! saw-router: the OpenAI-compatible front of saw (see docs/router.md for the module map).

pub mod admission;
pub mod app;
#[cfg(test)]
mod app_tests;
pub mod cli;
pub mod conn;
#[cfg(feature = "pyo3")]
mod cpu_layer;
pub mod detok;
pub mod error;
#[cfg(test)]
mod fake_worker;
#[cfg(test)]
mod gen_tests;
pub mod generate;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod request_limits;
pub mod routes;
pub mod serve_args;
pub mod server;
pub mod tokenizer;
pub mod tools;
pub mod validate;
pub mod worker;

/// Messages and client generated from proto/saw.proto.
pub mod proto {
    tonic::include_proto!("saw.v1");
}

use clap::Parser;

/// Runs the `saw-router` command line; returns the process exit code.
pub fn run_cli(argv: Vec<String>, python: String) -> i32 {
    let args = match cli::Args::try_parse_from(argv) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("saw-router: error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let result = runtime.block_on(server::run(args, python));
    // Stray tasks (open connections after a forced drain) must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("saw-router: error: {e}");
            1
        }
    }
}

#[cfg(feature = "pyo3")]
mod python {
    use std::collections::HashMap;

    use pyo3::prelude::*;

    /// `_native.run(argv, python)`: runs the router with the GIL released; `python` is the
    /// interpreter that starts workers (`python -m saw_worker`).
    #[pyfunction]
    fn run(py: Python<'_>, argv: Vec<String>, python: String) -> PyResult<i32> {
        Ok(py.detach(move || super::run_cli(argv, python)))
    }

    /// `_native.cpu_decode_attention(fields, sm_scale)`: one layer of a CPU decode step (the worker's
    /// kv/cpu_backend.py names the tensors in `fields`, see saw_cpu_kernels::decode_attention_raw), with the GIL
    /// released.
    #[pyfunction]
    fn cpu_decode_attention(py: Python<'_>, fields: HashMap<String, usize>, sm_scale: f32) -> PyResult<()> {
        // SAFETY: cpu_backend.py passes live, contiguous CPU tensors of the dtypes the names say, holds them for
        // the call, and owns the output, the cache and the rings while the step runs.
        py.detach(|| unsafe {
            saw_cpu_kernels::decode_attention_raw(&saw_cpu_kernels::Fields(&fields), sm_scale)
        })
        .map_err(pyo3::exceptions::PyValueError::new_err)
    }

    /// `_native.cpu_rms_norm(fields, eps)`: RMSNorm, or the residual add + RMSNorm in place, over CPU rows
    /// (models/cpu_fused.py names the tensors, see saw_cpu_kernels::rms_norm_raw), with the GIL released.
    #[pyfunction]
    fn cpu_rms_norm(py: Python<'_>, fields: HashMap<String, usize>, eps: f32) -> PyResult<()> {
        // SAFETY: cpu_fused.py passes live, contiguous CPU tensors of the dtypes the names say, holds them for the
        // call, and owns the ones written.
        py.detach(|| unsafe { saw_cpu_kernels::rms_norm_raw(&saw_cpu_kernels::Fields(&fields), eps) })
            .map_err(pyo3::exceptions::PyValueError::new_err)
    }

    /// `_native.cpu_qk_norm_rope(fields, eps)`: q/k norm + RoPE in place on the fused qkv rows (see
    /// saw_cpu_kernels::qk_norm_rope_raw), with the GIL released.
    #[pyfunction]
    fn cpu_qk_norm_rope(py: Python<'_>, fields: HashMap<String, usize>, eps: f32) -> PyResult<()> {
        // SAFETY: as cpu_rms_norm.
        py.detach(|| unsafe { saw_cpu_kernels::qk_norm_rope_raw(&saw_cpu_kernels::Fields(&fields), eps) })
            .map_err(pyo3::exceptions::PyValueError::new_err)
    }

    /// `_native.cpu_silu_mul(fields)`: SiLU(gate) * up (see saw_cpu_kernels::silu_mul_raw), with the GIL released.
    #[pyfunction]
    fn cpu_silu_mul(py: Python<'_>, fields: HashMap<String, usize>) -> PyResult<()> {
        // SAFETY: as cpu_rms_norm.
        py.detach(|| unsafe { saw_cpu_kernels::silu_mul_raw(&saw_cpu_kernels::Fields(&fields)) })
            .map_err(pyo3::exceptions::PyValueError::new_err)
    }

    /// `_native.cpu_matvec(fields)`: x @ W.T for few rows x over a GGUF weight's own quantized blocks (see
    /// saw_cpu_kernels::matvec_raw), on the kernels' thread pool, with the GIL released.
    #[pyfunction]
    fn cpu_matvec(py: Python<'_>, fields: HashMap<String, usize>) -> PyResult<()> {
        // SAFETY: as cpu_rms_norm (models/linear.py names the tensors).
        py.detach(|| unsafe { saw_cpu_kernels::matvec_raw(&saw_cpu_kernels::Fields(&fields)) })
            .map_err(pyo3::exceptions::PyValueError::new_err)
    }

    /// `_native.cpu_matvec_available()`: whether this CPU runs `cpu_matvec` (AVX2, FMA, F16C).
    #[pyfunction]
    fn cpu_matvec_available() -> bool {
        saw_cpu_kernels::quant::available()
    }

    #[pymodule]
    fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(run, m)?)?;
        m.add_function(wrap_pyfunction!(cpu_decode_attention, m)?)?;
        m.add_function(wrap_pyfunction!(cpu_rms_norm, m)?)?;
        m.add_function(wrap_pyfunction!(cpu_qk_norm_rope, m)?)?;
        m.add_function(wrap_pyfunction!(cpu_silu_mul, m)?)?;
        m.add_function(wrap_pyfunction!(cpu_matvec, m)?)?;
        m.add_function(wrap_pyfunction!(cpu_matvec_available, m)?)?;
        m.add_class::<crate::cpu_layer::CpuLayer>()?;
        m.add_class::<crate::cpu_layer::CpuStep>()?;
        m.add_class::<crate::cpu_layer::CpuKv>()
    }
}
