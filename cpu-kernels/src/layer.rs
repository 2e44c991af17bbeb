//! A whole decoder layer of a decode step in one call: the ops `DecoderLayer.forward` (saw_worker/models/decoder.py,
//! the spec) runs one by one on the CPU's native path (RMSNorm, the q|k|v matvec and its bias, q/k norm + RoPE, the
//! attention over the paged cache, the o matvec, residual add + RMSNorm, gate|up, SiLU-and-mul, down), the same
//! kernels in the same order with the same roundings to the activation dtype, so that the result is the op-by-op
//! path's bit for bit. A decode step's ~10 calls a layer from Python cost ~10-25 us each around a few us of work;
//! this is one.

use crate::fused::{self, Elem, QkRope};
use crate::parts::{CacheParts, Fields, Raw, StepParts, WeightParts};
use crate::quant::{self, Segment};
use crate::{decode_attention, Ring, Step, Store};

/// One layer's weights (projections as GGUF blocks) and shapes.
pub struct Layer<'a, T> {
    pub hidden: usize,
    pub inter: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub input_norm: &'a [T],
    pub post_norm: &'a [T],
    pub qkv: Vec<Segment<'a>>,
    pub qkv_bias: Option<&'a [T]>,
    pub o: Vec<Segment<'a>>,
    pub gate_up: Vec<Segment<'a>>,
    pub down: Vec<Segment<'a>>,
    /// per-head q and k RMSNorm weights (Qwen3), eps as the layer's
    pub qk_norm: Option<(&'a [T], &'a [T])>,
    /// [max_pos, 2 D] f32 (rope.cos_sin_cache)
    pub cos_sin: &'a [f32],
    /// [Hkv, D] f32: the KV format's K scale (DecoderLayer.k_scale)
    pub k_scale: Option<&'a [f32]>,
    /// threads for the matvecs and the attention (the pool's)
    pub threads: usize,
}

/// The step's attention for this layer: its layout and the layer's cache (and ring).
pub struct Attend<'s> {
    pub step: Step<'s>,
    pub store: Store<'s>,
    pub ring: Option<Ring<'s>>,
}

/// The layer on rows [rows, hidden]: `x` holds the previous layer's output (the embeddings in layer 0, `first`)
/// and `residual` the stream before it; on return `x` holds this layer's MLP output and `residual` the stream
/// before it (as `DecoderLayer.forward` returns them). `positions` [rows].
pub fn decode_layer<T: Elem>(
    l: &Layer<T>,
    x: &mut [T],
    residual: &mut [T],
    first: bool,
    positions: &[i64],
    attend: &mut Attend,
) -> Result<(), String> {
    let (rows, h, d) = (positions.len(), l.hidden, l.head_dim);
    let (hq, hkv) = (l.q_heads, l.kv_heads);
    if x.len() != rows * h || residual.len() != rows * h || attend.step.batch() != rows {
        return Err(format!(
            "decode_layer: x {} / residual {} elements, {} requests for {rows} rows of {h}",
            x.len(),
            residual.len(),
            attend.step.batch()
        ));
    }
    let zeros = |n: usize| vec![T::put(0.0); n];
    // the elementwise ops on the caller's thread alone (a decode step's few rows, as torch's one thread there)
    if first {
        residual.copy_from_slice(x);
        fused::rms_norm(residual, l.input_norm, l.eps, x, 1)?;
    } else {
        fused::add_rms_norm(x, residual, l.input_norm, l.eps, 1)?;
    }
    let width = (hq + 2 * hkv) * d;
    let mut qkv = zeros(rows * width);
    quant::matvec(x, h, &l.qkv, &mut qkv, l.threads)?;
    if let Some(bias) = l.qkv_bias {
        for row in qkv.chunks_exact_mut(width) {
            row.iter_mut().zip(bias).for_each(|(y, b)| *y = T::put(y.get() + b.get()));
        }
    }
    let rope = QkRope {
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        norm: l.qk_norm.map(|(q, k)| (q, k, l.eps)),
        cos_sin: l.cos_sin,
        positions,
        k_scale: l.k_scale,
    };
    fused::qk_norm_rope(&mut qkv, width, &rope, 1)?;
    let mut o = zeros(rows * hq * d);
    // q, k, v: the heads of qkv's rows, `width` apart
    let (q, k, v) =
        (T::rows(&qkv, width), T::rows(&qkv[hq * d..], width), T::rows(&qkv[(hq + hkv) * d..], width));
    decode_attention(
        &attend.step,
        &q,
        &k,
        &v,
        &mut attend.store,
        attend.ring.as_mut(),
        &mut T::rows_mut(&mut o),
    )?;
    quant::matvec(&o, hq * d, &l.o, x, l.threads)?;
    fused::add_rms_norm(x, residual, l.post_norm, l.eps, 1)?;
    let mut gate_up = zeros(rows * 2 * l.inter);
    quant::matvec(x, h, &l.gate_up, &mut gate_up, l.threads)?;
    let mut act = zeros(rows * l.inter);
    fused::silu_mul(&gate_up, &mut act, l.inter, 1)?;
    quant::matvec(&act, l.inter, &l.down, x, l.threads)
}

/// A layer as the worker hands it over once (saw_worker/models/cpu_layer.py): `act_f32`, `hidden`, `inter`,
/// `q_heads`, `kv_heads`, `head_dim`, `threads`; input_norm, post_norm, qkv_bias (optional), q_norm and k_norm
/// (optional) at the activation dtype; cos_sin and k_scale (optional) f32; the projections' blocks under the
/// prefixes `qkv_`, `o_`, `gate_up_`, `down_` (`WeightParts`).
#[derive(Debug)]
pub struct LayerParts {
    act_f32: bool,
    dims: [usize; 5], // hidden, inter, q_heads, kv_heads, head_dim
    eps: f32,
    threads: usize,
    norms: [Raw; 2],
    qkv_bias: Option<Raw>,
    qk_norm: Option<[Raw; 2]>,
    cos_sin: Raw,
    k_scale: Option<Raw>,
    weights: [WeightParts; 4], // qkv, o, gate_up, down
}

impl LayerParts {
    pub fn parse(f: &Fields, eps: f32) -> Result<Self, String> {
        let [h, i, hq, hkv, d] =
            [f.get("hidden")?, f.get("inter")?, f.get("q_heads")?, f.get("kv_heads")?, f.get("head_dim")?];
        let weights = [
            WeightParts::parse(f, "qkv_")?,
            WeightParts::parse(f, "o_")?,
            WeightParts::parse(f, "gate_up_")?,
            WeightParts::parse(f, "down_")?,
        ];
        let qkv = (hq + 2 * hkv) * d;
        let shapes = [(qkv, h), (h, hq * d), (2 * i, h), (h, i)];
        for ((w, (rows, k)), name) in weights.iter().zip(shapes).zip(["qkv", "o", "gate_up", "down"]) {
            if w.rows() != rows || w.k != k {
                return Err(format!("{name}: {} x {} for a layer that needs {rows} x {k}", w.rows(), w.k));
            }
        }
        let parts = LayerParts {
            act_f32: f.get("act_f32")? != 0,
            dims: [h, i, hq, hkv, d],
            eps,
            threads: f.get("threads")?,
            norms: [f.raw("input_norm")?, f.raw("post_norm")?],
            qkv_bias: f.optional("qkv_bias")?,
            qk_norm: match (f.optional("q_norm")?, f.optional("k_norm")?) {
                (Some(q), Some(k)) => Some([q, k]),
                (None, None) => None,
                _ => return Err("q_norm and k_norm come together".into()),
            },
            cos_sin: f.raw("cos_sin")?,
            k_scale: f.optional("k_scale")?,
            weights,
        };
        let lens = [
            (parts.norms[0].len(), h, "input_norm"),
            (parts.norms[1].len(), h, "post_norm"),
            (parts.qkv_bias.map_or(qkv, |b| b.len()), qkv, "qkv_bias"),
            (parts.qk_norm.map_or(d, |n| n[0].len()), d, "q_norm"),
            (parts.qk_norm.map_or(d, |n| n[1].len()), d, "k_norm"),
            (parts.k_scale.map_or(hkv * d, |s| s.len()), hkv * d, "k_scale"),
        ];
        if let Some((got, want, name)) = lens.into_iter().find(|(got, want, _)| got != want) {
            return Err(format!("{name}: {got} elements, the layer needs {want}"));
        }
        Ok(parts)
    }

    /// # Safety
    /// The tensors live, unchanged, while the layer does.
    unsafe fn layer<'s, T: Elem>(&self) -> Layer<'s, T> {
        let [hidden, inter, q_heads, kv_heads, head_dim] = self.dims;
        let [qkv, o, gate_up, down] = &self.weights;
        // SAFETY (the slices): the caller's contract.
        unsafe {
            Layer {
                hidden,
                inter,
                q_heads,
                kv_heads,
                head_dim,
                eps: self.eps,
                input_norm: self.norms[0].slice(),
                post_norm: self.norms[1].slice(),
                qkv: qkv.segments(),
                qkv_bias: self.qkv_bias.map(|b| b.slice()),
                o: o.segments(),
                gate_up: gate_up.segments(),
                down: down.segments(),
                qk_norm: self.qk_norm.map(|[q, k]| (q.slice(), k.slice())),
                cos_sin: self.cos_sin.slice(),
                k_scale: self.k_scale.map(|s| s.slice()),
                threads: self.threads,
            }
        }
    }

    /// `decode_layer` on x, residual [rows, hidden] and positions (i64) [rows] at their addresses, with the step's
    /// layout and this layer's cache.
    ///
    /// # Safety
    /// Every address holds live, aligned elements of the layer's activation dtype (i64 positions); x, residual,
    /// the cache and the rings are touched by nothing else during the call; the layer's, step's and cache's tensors
    /// live through it.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn decode(
        &self,
        x: usize,
        residual: usize,
        positions: usize,
        rows: usize,
        first: bool,
        layout: &StepParts,
        cache: &CacheParts,
        sm_scale: f32,
    ) -> Result<(), String> {
        unsafe fn run<T: Elem>(
            p: &LayerParts,
            [x, residual, positions]: [Raw; 3],
            first: bool,
            layout: &StepParts,
            cache: &CacheParts,
            sm_scale: f32,
        ) -> Result<(), String> {
            // SAFETY (the slices): the caller's contract.
            unsafe {
                let layer = p.layer::<T>();
                let step = layout.step(layer.q_heads, cache, sm_scale, layer.threads);
                let (store, ring) = cache.store(layout)?;
                let mut attend = Attend { step, store, ring };
                decode_layer(
                    &layer,
                    x.slice_mut(),
                    residual.slice_mut(),
                    first,
                    positions.slice(),
                    &mut attend,
                )
            }
        }
        let n = rows * self.dims[0];
        let raws = [Raw::new(x, n), Raw::new(residual, n), Raw::new(positions, rows)];
        // SAFETY: the caller's contract.
        unsafe {
            if self.act_f32 {
                run::<f32>(self, raws, first, layout, cache, sm_scale)
            } else {
                run::<u16>(self, raws, first, layout, cache, sm_scale)
            }
        }
    }
}
