//! The calls as the Python side makes them: each tensor as its address and element count (`NAME`, `NAME_len`), the
//! sizes and flags as integers, in one map (`parts::Fields`). Builds the slices `decode_attention` and the fused
//! ops take.

use crate::fused::{self, Elem, QkRope};
use crate::parts::{CacheParts, Fields, StepParts, WeightParts};
use crate::{decode_attention, quant};

/// `$run::<f32>(args)` or, for bf16 activations (their bits), `$run::<u16>(args)`, by the call's `act_f32`.
macro_rules! by_activation {
    ($f:expr, $run:ident($($arg:expr),*)) => {
        if $f.get("act_f32")? != 0 {
            $run::<f32>($($arg),*)
        } else {
            $run::<u16>($($arg),*)
        }
    };
}

/// Run `decode_attention` on the tensors `f` names: q, k, v, out (bf16, or f32 when `act_f32`; `q_stride`,
/// `k_stride`, `v_stride` elements between rows), `q_heads`, `threads`, the step's layout (`StepParts`) and the
/// layer's cache (`CacheParts`).
///
/// # Safety
/// Every named tensor lives for the call, is aligned for its type and holds its `_len` elements; out, the cache and
/// the rings are touched by nothing else during it.
pub unsafe fn decode_attention_raw(f: &Fields, sm_scale: f32) -> Result<(), String> {
    unsafe fn run<T: Elem>(f: &Fields, sm_scale: f32) -> Result<(), String> {
        let (layout, cache) = (StepParts::parse(f)?, CacheParts::parse(f)?);
        // SAFETY (every slice below): the caller's contract.
        unsafe {
            let step = layout.step(f.get("q_heads")?, &cache, sm_scale, f.get("threads")?);
            let (mut store, mut ring) = cache.store(&layout)?;
            let rows = |name: &str| -> Result<_, String> {
                Ok(T::rows(f.raw(name)?.slice(), f.get(&format!("{name}_stride"))?))
            };
            let (q, k, v) = (rows("q")?, rows("k")?, rows("v")?);
            let mut out = T::rows_mut(f.raw("out")?.slice_mut());
            decode_attention(&step, &q, &k, &v, &mut store, ring.as_mut(), &mut out)
        }
    }
    // SAFETY: the caller's contract.
    unsafe { by_activation!(f, run(f, sm_scale)) }
}

/// `rms_norm` (residual absent: x -> out) or `add_rms_norm` (in place on x and residual) over the tensors `f`
/// names: x, residual or out, weight (bf16, or f32 when `act_f32`), on up to `threads` threads.
///
/// # Safety
/// As `decode_attention_raw`: x, residual and out are touched by nothing else during the call.
pub unsafe fn rms_norm_raw(f: &Fields, eps: f32) -> Result<(), String> {
    unsafe fn run<T: Elem>(f: &Fields, eps: f32) -> Result<(), String> {
        // SAFETY (every slice): the caller's contract.
        unsafe {
            let threads = f.get("threads")?;
            if f.has("residual") {
                fused::add_rms_norm::<T>(
                    f.slice_mut("x")?,
                    f.slice_mut("residual")?,
                    f.slice("weight")?,
                    eps,
                    threads,
                )
            } else {
                fused::rms_norm::<T>(f.slice("x")?, f.slice("weight")?, eps, f.slice_mut("out")?, threads)
            }
        }
    }
    // SAFETY: the caller's contract.
    unsafe { by_activation!(f, run(f, eps)) }
}

/// `qk_norm_rope` in place on qkv (`qkv_stride` elements between rows) over the tensors `f` names: positions
/// (i64), cos_sin (f32), q_weight and k_weight (optional), k_scale (f32, optional); `q_heads`, `kv_heads`,
/// `head_dim`, `act_f32`, `threads`.
///
/// # Safety
/// As `decode_attention_raw`: qkv is touched by nothing else during the call.
pub unsafe fn qk_norm_rope_raw(f: &Fields, eps: f32) -> Result<(), String> {
    unsafe fn run<T: Elem>(f: &Fields, eps: f32) -> Result<(), String> {
        // SAFETY (every slice): the caller's contract.
        unsafe {
            let norm = if f.has("q_weight") || f.has("k_weight") {
                Some((f.slice("q_weight")?, f.slice("k_weight")?, eps))
            } else {
                None
            };
            let p = QkRope::<T> {
                q_heads: f.get("q_heads")?,
                kv_heads: f.get("kv_heads")?,
                head_dim: f.get("head_dim")?,
                norm,
                cos_sin: f.slice("cos_sin")?,
                positions: f.slice("positions")?,
                k_scale: f.has("k_scale").then(|| f.slice("k_scale")).transpose()?,
            };
            fused::qk_norm_rope(f.slice_mut("qkv")?, f.get("qkv_stride")?, &p, f.get("threads")?)
        }
    }
    // SAFETY: the caller's contract.
    unsafe { by_activation!(f, run(f, eps)) }
}

/// `silu_mul` from gate_up [rows, 2 `inter`] into out [rows, `inter`] (bf16, or f32 when `act_f32`).
///
/// # Safety
/// As `decode_attention_raw`: out is touched by nothing else during the call.
pub unsafe fn silu_mul_raw(f: &Fields) -> Result<(), String> {
    unsafe fn run<T: Elem>(f: &Fields) -> Result<(), String> {
        // SAFETY (every slice): the caller's contract.
        unsafe {
            fused::silu_mul::<T>(f.slice("gate_up")?, f.slice_mut("out")?, f.get("inter")?, f.get("threads")?)
        }
    }
    // SAFETY: the caller's contract.
    unsafe { by_activation!(f, run(f)) }
}

/// `quant::matvec` of x [m, `k`] (bf16, or f32 when `act_f32`) into out [m, N] over the weight's `segments`
/// segments: segment i's blocks in `w{i}` (u8), its ggml type `w{i}_type` and `w{i}_rows`; on up to `threads`
/// threads.
///
/// # Safety
/// As `decode_attention_raw`: out is touched by nothing else during the call.
pub unsafe fn matvec_raw(f: &Fields) -> Result<(), String> {
    unsafe fn run<T: Elem>(f: &Fields) -> Result<(), String> {
        let w = WeightParts::parse(f, "")?;
        // SAFETY (the slices): the caller's contract.
        unsafe {
            quant::matvec::<T>(f.slice("x")?, w.k, &w.segments(), f.slice_mut("out")?, f.get("threads")?)
        }
    }
    // SAFETY: the caller's contract.
    unsafe { by_activation!(f, run(f)) }
}
