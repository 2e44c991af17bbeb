//! saw's decode attention on the CPU: one call per layer of a decode step stores each request's new K, V in the
//! paged cache (bf16, or INT4 codes with fp16 (scale, lo)), attends its query over the request's tokens and keeps
//! the new K, V in the request's bf16 ring when the format has a window. `fused` holds the layer's other
//! elementwise ops (RMSNorm, q/k norm + RoPE, SiLU-and-mul), `quant` the projections' matrix-vector products on a
//! GGUF's own quantized blocks; those and the attention's (request, KV head) pairs run on `pool`'s threads.
//! `layer` runs a whole decoder layer of a decode step (those ops and the attention) in one call, on weights, step
//! layout and cache parsed once from the Python side's fields (`parts`).
//!
//! The worker's torch reference (`saw_worker/kv/reference.py`, on `saw_kv/formats.py`) is the spec: the same
//! arithmetic in fp32, in one pass over the cache instead of ~60 torch ops per layer. The Python side
//! (`saw_worker/kv/cpu_backend.py`, `saw_worker/models/cpu_fused.py`) checks every tensor's dtype and layout; this
//! side checks every index it reads or writes against the buffers' lengths, so a bad layout is an error, never a
//! stray write.

mod attend;
mod fused;
mod int4;
mod layer;
pub mod parts;
mod pool;
pub mod quant;
mod raw;
mod vector;

pub use fused::{add_rms_norm, qk_norm_rope, rms_norm, silu_mul, Elem, QkRope};
pub use int4::{quantize_row, rotate};
pub use layer::{decode_layer, Layer, LayerParts};
pub use parts::Fields;
pub use raw::{decode_attention_raw, matvec_raw, qk_norm_rope_raw, rms_norm_raw, silu_mul_raw};

/// Activations (q, k, v, the output) at the model's dtype: bf16 bits or f32, rows `stride` elements apart,
/// each row [heads, head_dim] contiguous.
pub enum Rows<'a> {
    Bf16 { data: &'a [u16], stride: usize },
    F32 { data: &'a [f32], stride: usize },
}

pub enum RowsMut<'a> {
    Bf16(&'a mut [u16]),
    F32(&'a mut [f32]),
}

/// One layer's paged cache, slot-major: [slots, Hkv, D] bf16, or [slots, Hkv, D/2] packed codes (byte j holds
/// element j low and j + D/2 high) with [slots, Hkv, 2] fp16 (scale, lo).
pub enum Store<'a> {
    Bf16 {
        k: &'a mut [u16],
        v: &'a mut [u16],
    },
    Int4 {
        k: &'a mut [u8],
        v: &'a mut [u8],
        k_params: &'a mut [u16],
        v_params: &'a mut [u16],
        /// fp32 [Hkv, D] subtracted from K before quantization (K centering)
        k_mean: Option<&'a [f32]>,
        /// block order of the Hadamard rotation of K (int4-bdr; 0: not rotated)
        hadamard_order: usize,
        /// V rotated too (decoded back once per query)
        rotate_v: bool,
    },
}

/// A windowed format's bf16 rings, [rows, S + W, Hkv, D] each: slot p < S of a request's row keeps sink p,
/// slot S + p % W position p while it is among the request's newest W tokens.
pub struct Ring<'a> {
    pub k: &'a mut [u16],
    pub v: &'a mut [u16],
    pub sinks: usize,
    pub window: usize,
    /// per request: its ring row, where its INT4 reads end (tokens from there on are the window's), the sinks
    /// it holds (where the INT4 reads begin), and the flat ring slot its new token is kept at
    pub rows: &'a [i32],
    pub quant_lens: &'a [i32],
    pub held_sinks: &'a [i32],
    pub write_slots: &'a [i64],
}

/// A decode step: request b's new token sits at position seq_lens[b] - 1 and is stored at slots[b]
/// (negative: padding, not stored); its positions map to slots through page_table [B, table_width].
pub struct Step<'a> {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
    pub sm_scale: f32,
    pub slots: &'a [i64],
    pub seq_lens: &'a [i32],
    pub page_table: &'a [i32],
    pub table_width: usize,
    /// threads for the attention of the (request, KV head) pairs (the kernels' pool; 1: the caller's alone)
    pub threads: usize,
}

impl Step<'_> {
    pub fn batch(&self) -> usize {
        self.seq_lens.len()
    }

    fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
}

/// Store the step's new K, V, attend each query over its request's tokens into `out` [B, Hq, D] (contiguous),
/// then keep the new K, V in the rings.
pub fn decode_attention(
    step: &Step,
    q: &Rows,
    k: &Rows,
    v: &Rows,
    store: &mut Store,
    mut ring: Option<&mut Ring>,
    out: &mut RowsMut,
) -> Result<(), String> {
    check(step, q, k, v, store, ring.as_deref(), out)?;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { run_avx2(step, q, k, v, store, ring.as_deref_mut(), out) };
        return Ok(());
    }
    run(step, q, k, v, store, ring, out);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(
    step: &Step,
    q: &Rows,
    k: &Rows,
    v: &Rows,
    store: &mut Store,
    ring: Option<&mut Ring>,
    out: &mut RowsMut,
) {
    run(step, q, k, v, store, ring, out)
}

/// The three phases over the whole batch, in the reference's order: every page write before any read, every
/// ring write after every read (a step reads the ring as it was before its tokens).
#[inline(always)]
fn run(
    step: &Step,
    q: &Rows,
    k: &Rows,
    v: &Rows,
    store: &mut Store,
    ring: Option<&mut Ring>,
    out: &mut RowsMut,
) {
    let (hkv, d) = (step.kv_heads, step.head_dim);
    let mut kx = vec![0f32; d];
    let mut vx = vec![0f32; d];
    for b in 0..step.batch() {
        let Ok(slot) = usize::try_from(step.slots[b]) else {
            continue;
        };
        for h in 0..hkv {
            k.load(b, h, d, &mut kx);
            v.load(b, h, d, &mut vx);
            int4::store_row(store, slot * hkv + h, h, d, &mut kx, &mut vx);
        }
    }
    // each (request, KV head) writes its own G rows of out, on the pool's threads
    let rows = step.group() * d;
    let (store, ring_read) = (&*store, ring.as_deref());
    let out_at = match out {
        RowsMut::Bf16(o) => OutPtr::Bf16(o.as_mut_ptr()),
        RowsMut::F32(o) => OutPtr::F32(o.as_mut_ptr()),
    };
    pool::pool().run(step.batch() * hkv, step.threads, &|task| {
        let (b, h) = (task / hkv, task % hkv);
        let at = (b * hkv + h) * rows;
        // SAFETY: task (b, h) alone writes out[at..at + rows], inside out [B, Hq, D] (checked), and the pool
        // returns when every task is done.
        let mut part = unsafe {
            match out_at {
                OutPtr::Bf16(o) => RowsMut::Bf16(std::slice::from_raw_parts_mut(o.add(at), rows)),
                OutPtr::F32(o) => RowsMut::F32(std::slice::from_raw_parts_mut(o.add(at), rows)),
            }
        };
        let mut scratch = attend::Scratch::new(step);
        attend::request_head(step, b, h, q, k, v, store, ring_read, &mut part, &mut scratch);
    });
    if let Some(ring) = ring {
        for b in 0..step.batch() {
            let base = ring.write_slots[b] as usize * hkv * d;
            for h in 0..hkv {
                let row = base + h * d;
                k.load(b, h, d, &mut kx);
                v.load(b, h, d, &mut vx);
                vector::to_bf16(&kx, &mut ring.k[row..row + d]);
                vector::to_bf16(&vx, &mut ring.v[row..row + d]);
            }
        }
    }
}

/// `out`'s elements for the pool's tasks, which write disjoint rows of it.
#[derive(Clone, Copy)]
enum OutPtr {
    Bf16(*mut u16),
    F32(*mut f32),
}
// SAFETY: the tasks write disjoint elements, and the call outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl Rows<'_> {
    fn stride(&self) -> usize {
        match self {
            Rows::Bf16 { stride, .. } | Rows::F32 { stride, .. } => *stride,
        }
    }

    fn len(&self) -> usize {
        match self {
            Rows::Bf16 { data, .. } => data.len(),
            Rows::F32 { data, .. } => data.len(),
        }
    }

    /// Row b, head h as f32.
    #[inline(always)]
    fn load(&self, b: usize, h: usize, d: usize, dst: &mut [f32]) {
        match self {
            Rows::Bf16 { data, stride } => vector::from_bf16(&data[b * stride + h * d..][..d], dst),
            Rows::F32 { data, stride } => dst.copy_from_slice(&data[b * stride + h * d..][..d]),
        }
    }
}

impl RowsMut<'_> {
    fn len(&self) -> usize {
        match self {
            RowsMut::Bf16(data) => data.len(),
            RowsMut::F32(data) => data.len(),
        }
    }

    #[inline(always)]
    fn put(&mut self, at: usize, src: &[f32]) {
        match self {
            RowsMut::Bf16(data) => vector::to_bf16(src, &mut data[at..at + src.len()]),
            RowsMut::F32(data) => data[at..at + src.len()].copy_from_slice(src),
        }
    }
}

impl Store<'_> {
    /// Slots the cache holds.
    fn slots(&self, kv_heads: usize, head_dim: usize) -> Result<usize, String> {
        let (rows, params) = match self {
            Store::Bf16 { k, v } => ([k.len(), v.len()].map(|n| n / head_dim), None),
            Store::Int4 { k, v, k_params, v_params, .. } => (
                [k.len(), v.len()].map(|n| n * 2 / head_dim),
                Some([k_params.len(), v_params.len()].map(|n| n / 2)),
            ),
        };
        let n = rows[0];
        if rows[1] != n || params.is_some_and(|p| p != [n, n]) || n % kv_heads != 0 {
            return Err("cache tensors of different lengths".into());
        }
        Ok(n / kv_heads)
    }
}

fn check(
    step: &Step,
    q: &Rows,
    k: &Rows,
    v: &Rows,
    store: &Store,
    ring: Option<&Ring>,
    out: &RowsMut,
) -> Result<(), String> {
    let (batch, hq, hkv, d, page) =
        (step.batch(), step.q_heads, step.kv_heads, step.head_dim, step.page_size);
    if hkv == 0 || hq % hkv != 0 || d == 0 || d % 2 != 0 || page == 0 {
        return Err(format!("bad shape: {hq} query heads, {hkv} KV heads, head_dim {d}, page_size {page}"));
    }
    if step.slots.len() != batch || step.page_table.len() != batch * step.table_width {
        return Err("slots / page_table do not match the batch".into());
    }
    for (name, rows, heads) in [("q", q, hq), ("k", k, hkv), ("v", v, hkv)] {
        if batch > 0 && (rows.stride() < heads * d || rows.len() < (batch - 1) * rows.stride() + heads * d) {
            return Err(format!(
                "{name}: {} elements for {batch} rows of stride {}",
                rows.len(),
                rows.stride()
            ));
        }
    }
    if out.len() != batch * hq * d {
        return Err("out must be [B, Hq, D]".into());
    }
    let slots = store.slots(hkv, d)?;
    if let Store::Int4 { hadamard_order, k_mean, .. } = store {
        if *hadamard_order != 0 && (!hadamard_order.is_power_of_two() || d % hadamard_order != 0) {
            return Err(format!("Hadamard order {hadamard_order} does not divide head_dim {d}"));
        }
        if k_mean.is_some_and(|m| m.len() != hkv * d) {
            return Err("k_mean must be [Hkv, D]".into());
        }
    }
    for b in 0..batch {
        let n = step.seq_lens[b];
        if n < 1 || n as usize > step.table_width * page {
            return Err(format!("request {b}: {n} tokens do not fit its page table"));
        }
        let pages = &step.page_table[b * step.table_width..][..(n as usize).div_ceil(page)];
        if pages.iter().any(|&p| p < 0 || (p as usize + 1) * page > slots) {
            return Err(format!("request {b}: a page outside the cache's {slots} slots"));
        }
        if step.slots[b] >= slots as i64 {
            return Err(format!("request {b}: slot {} outside the cache", step.slots[b]));
        }
    }
    if let Some(r) = ring {
        let per_row = r.sinks + r.window;
        let rows = r.k.len() / (per_row * hkv * d).max(1);
        if r.window == 0 || r.k.len() != r.v.len() || r.k.len() != rows * per_row * hkv * d {
            return Err("ring tensors must be [rows, S + W, Hkv, D] with W > 0".into());
        }
        if [r.rows.len(), r.quant_lens.len(), r.held_sinks.len(), r.write_slots.len()] != [batch; 4] {
            return Err("ring layout does not match the batch".into());
        }
        for b in 0..batch {
            let prefix = step.seq_lens[b] - 1;
            let (row, quant, sinks, write) = (r.rows[b], r.quant_lens[b], r.held_sinks[b], r.write_slots[b]);
            if row < 0 || row as usize >= rows || write < 0 || write as usize >= rows * per_row {
                return Err(format!(
                    "request {b}: ring row {row} / slot {write} outside the ring's {rows} rows"
                ));
            }
            if !(0..=prefix).contains(&quant)
                || prefix - quant > r.window as i32
                || !(0..=r.sinks as i32).contains(&sinks)
            {
                return Err(format!("request {b}: window of {} tokens, {sinks} sinks", prefix - quant));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
