//! The native module's handles for a CPU decode step's one call per layer (the worker's models/cpu_layer.py): a
//! layer's weights (`CpuLayer`, made once at load), a step's layout (`CpuStep`, once per step) and a layer's KV
//! cache (`CpuKv`, once per cache view), each parsed from its map of fields when made, so that a layer's call
//! passes five integers and two handles instead of a map per op. Each handle holds the Python objects that own
//! its tensors, so the addresses it keeps stay valid while it lives.

use std::collections::HashMap;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use saw_cpu_kernels::parts::{CacheParts, StepParts};
use saw_cpu_kernels::{Fields, LayerParts};

fn value_error(e: String) -> PyErr {
    PyValueError::new_err(e)
}

/// `CpuLayer(fields, eps, keep)`: a decoder layer's weights (saw_cpu_kernels::LayerParts names the fields);
/// `keep` owns the tensors.
#[pyclass(frozen)]
pub struct CpuLayer {
    parts: LayerParts,
    _keep: Py<PyAny>,
}

#[pymethods]
impl CpuLayer {
    #[new]
    fn new(fields: HashMap<String, usize>, eps: f32, keep: Py<PyAny>) -> PyResult<Self> {
        Ok(CpuLayer { parts: LayerParts::parse(&Fields(&fields), eps).map_err(value_error)?, _keep: keep })
    }

    /// `decode(x, residual, positions, rows, first, step, kv)`: the layer in place on x and residual [rows, hidden]
    /// at those addresses, positions (i64) [rows], with the GIL released.
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &self,
        py: Python<'_>,
        x: usize,
        residual: usize,
        positions: usize,
        rows: usize,
        first: bool,
        step: &Bound<'_, CpuStep>,
        kv: &Bound<'_, CpuKv>,
    ) -> PyResult<()> {
        let (step, kv) = (step.get(), kv.get());
        let (layout, cache, sm_scale) = (step.parts, kv.parts, step.sm_scale);
        // SAFETY: cpu_layer.py passes contiguous CPU tensors of the layer's dtype (int64 positions) of these
        // sizes, holds them for the call and owns x and residual; the backend owns the cache while the step runs;
        // the handles keep their tensors alive.
        py.detach(|| unsafe {
            self.parts.decode(x, residual, positions, rows, first, &layout, &cache, sm_scale)
        })
        .map_err(value_error)
    }
}

/// `CpuStep(fields, sm_scale, keep)`: a decode step's layout (saw_cpu_kernels::parts::StepParts).
#[pyclass(frozen)]
pub struct CpuStep {
    parts: StepParts,
    sm_scale: f32,
    _keep: Py<PyAny>,
}

#[pymethods]
impl CpuStep {
    #[new]
    fn new(fields: HashMap<String, usize>, sm_scale: f32, keep: Py<PyAny>) -> PyResult<Self> {
        Ok(CpuStep { parts: StepParts::parse(&Fields(&fields)).map_err(value_error)?, sm_scale, _keep: keep })
    }
}

/// `CpuKv(fields, keep)`: one layer's KV cache (saw_cpu_kernels::parts::CacheParts).
#[pyclass(frozen)]
pub struct CpuKv {
    parts: CacheParts,
    _keep: Py<PyAny>,
}

#[pymethods]
impl CpuKv {
    #[new]
    fn new(fields: HashMap<String, usize>, keep: Py<PyAny>) -> PyResult<Self> {
        Ok(CpuKv { parts: CacheParts::parse(&Fields(&fields)).map_err(value_error)?, _keep: keep })
    }
}
