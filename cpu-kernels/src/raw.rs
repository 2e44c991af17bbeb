//! The calls as the Python side makes them: each tensor as its address and element count (`NAME`, `NAME_len`), the
//! sizes and flags as integers, in one map. Builds the slices `decode_attention` and the fused ops take.

use std::collections::HashMap;

use crate::fused::{self, Elem, QkRope};
use crate::{decode_attention, quant, Ring, Rows, RowsMut, Step, Store};

pub struct Fields<'a>(pub &'a HashMap<String, usize>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Result<usize, String> {
        self.0.get(name).copied().ok_or_else(|| format!("missing field {name}"))
    }

    fn has(&self, name: &str) -> bool {
        self.0.get(&format!("{name}_len")).is_some_and(|&n| n > 0)
    }

    /// The tensor `name` as a slice of T (empty when absent).
    ///
    /// # Safety
    /// `name` must hold the address of `name_len` live, aligned elements of T that nothing else accesses
    /// during the call (shared reads aside).
    unsafe fn slice<'s, T>(&self, name: &str) -> Result<&'s [T], String> {
        if !self.has(name) {
            return Ok(&[]);
        }
        // SAFETY: the caller's contract.
        Ok(unsafe {
            std::slice::from_raw_parts(self.get(name)? as *const T, self.get(&format!("{name}_len"))?)
        })
    }

    /// # Safety
    /// As `slice`, and nothing else reads or writes the elements during the call.
    unsafe fn slice_mut<'s, T>(&self, name: &str) -> Result<&'s mut [T], String> {
        if !self.has(name) {
            return Ok(&mut []);
        }
        // SAFETY: the caller's contract.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(self.get(name)? as *mut T, self.get(&format!("{name}_len"))?)
        })
    }
}

/// Run `decode_attention` on the tensors `f` names: q, k, v, out (bf16, or f32 when `act_f32`; `q_stride`,
/// `k_stride`, `v_stride` elements between rows); slots (i64), seq_lens, page_table (i32, `table_width`);
/// cache_k, cache_v (bf16, or packed u8 with k_params, v_params fp16 when `int4`), k_mean (f32, optional),
/// `hadamard_order`, `rotate_v`; with a window: ring_k, ring_v (bf16), `sinks`, `window`, ring_rows, quant_lens,
/// held_sinks (i32), write_slots (i64); `threads`.
///
/// # Safety
/// Every named tensor lives for the call, is aligned for its type and holds its `_len` elements; out, the cache and
/// the rings are touched by nothing else during it.
pub unsafe fn decode_attention_raw(f: &Fields, sm_scale: f32) -> Result<(), String> {
    // SAFETY (every slice below): the caller's contract.
    unsafe {
        let step = Step {
            q_heads: f.get("q_heads")?,
            kv_heads: f.get("kv_heads")?,
            head_dim: f.get("head_dim")?,
            page_size: f.get("page_size")?,
            sm_scale,
            slots: f.slice("slots")?,
            seq_lens: f.slice("seq_lens")?,
            page_table: f.slice("page_table")?,
            table_width: f.get("table_width")?,
            threads: f.get("threads")?,
        };
        let rows = |name: &str| -> Result<Rows, String> {
            let stride = f.get(&format!("{name}_stride"))?;
            Ok(if f.get("act_f32")? != 0 {
                Rows::F32 { data: f.slice(name)?, stride }
            } else {
                Rows::Bf16 { data: f.slice(name)?, stride }
            })
        };
        let (q, k, v) = (rows("q")?, rows("k")?, rows("v")?);
        let mut out = if f.get("act_f32")? != 0 {
            RowsMut::F32(f.slice_mut("out")?)
        } else {
            RowsMut::Bf16(f.slice_mut("out")?)
        };
        let mut store = if f.get("int4")? != 0 {
            Store::Int4 {
                k: f.slice_mut("cache_k")?,
                v: f.slice_mut("cache_v")?,
                k_params: f.slice_mut("k_params")?,
                v_params: f.slice_mut("v_params")?,
                k_mean: f.has("k_mean").then(|| f.slice("k_mean")).transpose()?,
                hadamard_order: f.get("hadamard_order")?,
                rotate_v: f.get("rotate_v")? != 0,
            }
        } else {
            Store::Bf16 { k: f.slice_mut("cache_k")?, v: f.slice_mut("cache_v")? }
        };
        let mut ring = if f.has("ring_k") {
            Some(Ring {
                k: f.slice_mut("ring_k")?,
                v: f.slice_mut("ring_v")?,
                sinks: f.get("sinks")?,
                window: f.get("window")?,
                rows: f.slice("ring_rows")?,
                quant_lens: f.slice("quant_lens")?,
                held_sinks: f.slice("held_sinks")?,
                write_slots: f.slice("write_slots")?,
            })
        } else {
            None
        };
        decode_attention(&step, &q, &k, &v, &mut store, ring.as_mut(), &mut out)
    }
}

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
        let segments = (0..f.get("segments")?)
            .map(|i| {
                let ggml = f.get(&format!("w{i}_type"))?;
                Ok(quant::Segment {
                    format: quant::Format::from_ggml(ggml)
                        .ok_or(format!("ggml type {ggml} is not supported"))?,
                    rows: f.get(&format!("w{i}_rows"))?,
                    // SAFETY: the caller's contract.
                    data: unsafe { f.slice(&format!("w{i}"))? },
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        // SAFETY (the slices): the caller's contract.
        unsafe {
            quant::matvec::<T>(f.slice("x")?, f.get("k")?, &segments, f.slice_mut("out")?, f.get("threads")?)
        }
    }
    // SAFETY: the caller's contract.
    unsafe { by_activation!(f, run(f)) }
}
