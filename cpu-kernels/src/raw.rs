//! The call as the Python side makes it: each tensor as its address and element count (`NAME`, `NAME_len`), the
//! sizes and flags as integers, in one map. Builds the slices `decode_attention` takes.

use std::collections::HashMap;

use crate::{decode_attention, Ring, Rows, RowsMut, Step, Store};

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
/// held_sinks (i32), write_slots (i64).
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
