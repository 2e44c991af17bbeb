//! The elementwise ops of a decoder layer between its projections, for the CPU: RMSNorm (with the residual add
//! fused in, in place), per-head q/k RMSNorm + RoPE in place on the fused qkv rows, SiLU-and-mul.
//!
//! The torch path of `saw_worker/models/decoder.py` (F.rms_norm, rope.apply_rope, F.silu) is the spec; these
//! compute it as the GPU's fused kernels do (`saw_kernels/fused.py`): fp32 math with the fp32 cos/sin cache, one
//! rounding to the activation dtype. Each op replaces 2-7 torch ops; at decode sizes a call takes a few us
//! (bench/results/cpu-fused-2026-12-04: ~2 ms off a smollm2-135m decode step of 13-15 ms). Rows are split
//! over threads only where a part has enough work to pay for a thread (prefill); a decode step's few rows run on
//! the caller's thread.

use crate::vector::dot;
use crate::{Rows, RowsMut};

/// An activation element: bf16 (as its bits) or f32.
pub trait Elem: Copy + Send + Sync + 'static {
    fn get(self) -> f32;
    fn put(x: f32) -> Self;
    /// Rows of this type, `stride` elements apart, as the attention takes them.
    fn rows(data: &[Self], stride: usize) -> Rows<'_>;
    fn rows_mut(data: &mut [Self]) -> RowsMut<'_>;
}

impl Elem for f32 {
    fn rows(data: &[f32], stride: usize) -> Rows<'_> {
        Rows::F32 { data, stride }
    }

    fn rows_mut(data: &mut [f32]) -> RowsMut<'_> {
        RowsMut::F32(data)
    }

    #[inline(always)]
    fn get(self) -> f32 {
        self
    }

    #[inline(always)]
    fn put(x: f32) -> f32 {
        x
    }
}

impl Elem for u16 {
    fn rows(data: &[u16], stride: usize) -> Rows<'_> {
        Rows::Bf16 { data, stride }
    }

    fn rows_mut(data: &mut [u16]) -> RowsMut<'_> {
        RowsMut::Bf16(data)
    }

    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }

    /// Round to nearest even, as torch's .to(bfloat16) (branch-free, so the loops vectorize).
    #[inline(always)]
    fn put(x: f32) -> u16 {
        let b = x.to_bits();
        let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
        if x.is_nan() {
            0x7fc0
        } else {
            rounded
        }
    }
}

/// Elements per thread below which splitting the rows costs more than it saves (a spawn is ~10-20 us).
const PAR_MIN: usize = 1 << 15;

/// Rows per part for `rows` rows of `row_len` elements on up to `threads` threads (all of them in one part
/// where the work is small).
fn rows_per_part(rows: usize, row_len: usize, threads: usize) -> usize {
    let parts = threads.min(rows * row_len / PAR_MIN).clamp(1, rows.max(1));
    rows.div_ceil(parts).max(1)
}

/// `f` on each part, all but the last on scoped threads, the last on the caller's.
fn run_parts<P: Send>(parts: impl Iterator<Item = P>, f: impl Fn(P) + Sync) {
    let f = &f;
    let mut parts = parts.peekable();
    std::thread::scope(|s| {
        while let Some(p) = parts.next() {
            if parts.peek().is_none() {
                f(p)
            } else {
                s.spawn(move || f(p));
            }
        }
    });
}

/// `fn name<T: Elem>(args) body` compiled twice, as is and for AVX2 + FMA, the one picked at run time.
macro_rules! multiversion {
    (fn $name:ident<$t:ident: Elem>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        fn $name<$t: Elem>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: Elem>($($arg: $ty),*) $body
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features the function is compiled for.
                    return unsafe { avx2::<$t>($($arg),*) };
                }
            }
            $body
        }
    };
}

/// x <- x / rms(x) * weight over `buf` (f32), written to `out`.
#[inline(always)]
fn norm_into<T: Elem>(buf: &[f32], weight: &[T], eps: f32, out: &mut [T]) {
    let rstd = 1.0 / (dot(buf, buf) / buf.len() as f32 + eps).sqrt();
    for ((o, &x), &w) in out.iter_mut().zip(buf).zip(weight) {
        *o = T::put(x * rstd * w.get());
    }
}

/// out = rms_norm(x) * weight for rows of weight.len() elements (x, out contiguous [rows, width]).
pub fn rms_norm<T: Elem>(
    x: &[T],
    weight: &[T],
    eps: f32,
    out: &mut [T],
    threads: usize,
) -> Result<(), String> {
    let width = weight.len();
    if width == 0 || !x.len().is_multiple_of(width) || out.len() != x.len() {
        return Err(format!("rms_norm: {} / {} elements for rows of {width}", x.len(), out.len()));
    }
    multiversion! {
        fn part<T: Elem>(x: &[T], weight: &[T], eps: f32, out: &mut [T]) {
            let mut buf = vec![0f32; weight.len()];
            for (xr, or) in x.chunks_exact(weight.len()).zip(out.chunks_exact_mut(weight.len())) {
                buf.iter_mut().zip(xr).for_each(|(b, v)| *b = v.get());
                norm_into(&buf, weight, eps, or);
            }
        }
    }
    let per = rows_per_part(x.len() / width, width, threads) * width;
    run_parts(x.chunks(per).zip(out.chunks_mut(per)), |(x, out)| part(x, weight, eps, out));
    Ok(())
}

/// The decoder's residual add + norm, in place: residual <- x + residual (rounded to T, as the unfused add leaves
/// the stream), then x <- rms_norm(residual) * weight. x and residual contiguous [rows, weight.len()].
pub fn add_rms_norm<T: Elem>(
    x: &mut [T],
    residual: &mut [T],
    weight: &[T],
    eps: f32,
    threads: usize,
) -> Result<(), String> {
    let width = weight.len();
    if width == 0 || !x.len().is_multiple_of(width) || residual.len() != x.len() {
        return Err(format!("add_rms_norm: {} / {} elements for rows of {width}", x.len(), residual.len()));
    }
    multiversion! {
        fn part<T: Elem>(x: &mut [T], residual: &mut [T], weight: &[T], eps: f32) {
            let mut buf = vec![0f32; weight.len()];
            for (xr, rr) in x.chunks_exact_mut(weight.len()).zip(residual.chunks_exact_mut(weight.len())) {
                for ((b, r), v) in buf.iter_mut().zip(rr.iter_mut()).zip(xr.iter()) {
                    *r = T::put(v.get() + r.get());
                    *b = r.get();
                }
                norm_into(&buf, weight, eps, xr);
            }
        }
    }
    let per = rows_per_part(x.len() / width, width, threads) * width;
    run_parts(x.chunks_mut(per).zip(residual.chunks_mut(per)), |(x, r)| part(x, r, weight, eps));
    Ok(())
}

/// What `qk_norm_rope` applies to the q and k heads of a fused qkv row.
pub struct QkRope<'a, T> {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// per-head RMSNorm (Qwen3): the q and k weights [D] and eps
    pub norm: Option<(&'a [T], &'a [T], f32)>,
    /// [max_pos, 2 D] f32: (cos, cos, -sin, sin) per position (rope.cos_sin_cache)
    pub cos_sin: &'a [f32],
    /// [rows]: each row's position
    pub positions: &'a [i64],
    /// [Hkv, D] f32, powers of two: q heads times their KV head's lambda, k heads divided by theirs
    pub k_scale: Option<&'a [f32]>,
}

/// In place on the q and k heads of qkv (rows `stride` elements apart, each q | k | v with q and k
/// [(Hq + Hkv), D]): the optional per-head RMSNorm, rotate-half RoPE at each row's position, the optional K
/// scale. v is not touched.
pub fn qk_norm_rope<T: Elem>(
    qkv: &mut [T],
    stride: usize,
    p: &QkRope<T>,
    threads: usize,
) -> Result<(), String> {
    let (hq, hkv, d) = (p.q_heads, p.kv_heads, p.head_dim);
    let (rows, width) = (p.positions.len(), (hq + hkv) * d);
    if hkv == 0 || hq % hkv != 0 || d == 0 || d % 2 != 0 {
        return Err(format!("qk_norm_rope: bad shape: {hq} query heads, {hkv} KV heads, head_dim {d}"));
    }
    if stride < width + hkv * d || (rows > 0 && qkv.len() < (rows - 1) * stride + width) {
        return Err(format!("qk_norm_rope: {} elements for {rows} rows of stride {stride}", qkv.len()));
    }
    let max_pos = p.cos_sin.len() / (2 * d);
    if p.cos_sin.len() != max_pos * 2 * d || p.positions.iter().any(|&x| x < 0 || x as usize >= max_pos) {
        return Err(format!("qk_norm_rope: a position outside the cos/sin cache's {max_pos}"));
    }
    if p.norm.is_some_and(|(qw, kw, _)| qw.len() != d || kw.len() != d) {
        return Err("qk_norm_rope: the norm weights must be [head_dim]".into());
    }
    if p.k_scale.is_some_and(|s| s.len() != hkv * d) {
        return Err("qk_norm_rope: k_scale must be [Hkv, D]".into());
    }
    multiversion! {
        fn part<T: Elem>(qkv: &mut [T], stride: usize, positions: &[i64], p: &QkRope<T>) {
            let (hq, d, half) = (p.q_heads, p.head_dim, p.head_dim / 2);
            let group = hq / p.kv_heads;
            let mut x = vec![0f32; d];
            for (r, &pos) in positions.iter().enumerate() {
                let cs = &p.cos_sin[pos as usize * 2 * d..][..2 * d];
                let (cos, sin) = (&cs[..half], &cs[3 * half..]);
                let row = &mut qkv[r * stride..][..(hq + p.kv_heads) * d];
                for (h, head) in row.chunks_exact_mut(d).enumerate() {
                    x.iter_mut().zip(head.iter()).for_each(|(a, v)| *a = v.get());
                    if let Some((qw, kw, eps)) = p.norm {
                        let w = if h < hq { qw } else { kw };
                        let rstd = 1.0 / (dot(&x, &x) / d as f32 + eps).sqrt();
                        x.iter_mut().zip(w).for_each(|(a, w)| *a = *a * rstd * w.get());
                    }
                    let (lo, hi) = x.split_at_mut(half);
                    for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                        (*a, *b) = (*a * c - *b * s, *b * c + *a * s);
                    }
                    match p.k_scale {
                        Some(lam) if h < hq => {
                            let lam = &lam[h / group * d..][..d];
                            head.iter_mut().zip(&x).zip(lam).for_each(|((o, a), l)| *o = T::put(a * l));
                        }
                        Some(lam) => {
                            let lam = &lam[(h - hq) * d..][..d];
                            head.iter_mut().zip(&x).zip(lam).for_each(|((o, a), l)| *o = T::put(a / l));
                        }
                        None => head.iter_mut().zip(&x).for_each(|(o, a)| *o = T::put(*a)),
                    }
                }
            }
        }
    }
    let per = rows_per_part(rows, width, threads);
    run_parts(qkv.chunks_mut(per * stride).zip(p.positions.chunks(per)), |(qkv, positions)| {
        part(qkv, stride, positions, p)
    });
    Ok(())
}

/// out = silu(gate) * up for gate_up [rows, 2 I] (gate | up) and out [rows, I], both contiguous.
pub fn silu_mul<T: Elem>(gate_up: &[T], out: &mut [T], inter: usize, threads: usize) -> Result<(), String> {
    if inter == 0 || !gate_up.len().is_multiple_of(2 * inter) || out.len() * 2 != gate_up.len() {
        return Err(format!("silu_mul: {} / {} elements for rows of 2 x {inter}", gate_up.len(), out.len()));
    }
    multiversion! {
        fn part<T: Elem>(gate_up: &[T], out: &mut [T], inter: usize) {
            for (gu, o) in gate_up.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
                let (g, u) = gu.split_at(inter);
                for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                    let g = g.get();
                    *o = T::put(g / (1.0 + exp(-g)) * u.get());
                }
            }
        }
    }
    let per = rows_per_part(out.len() / inter, 3 * inter, threads);
    run_parts(gate_up.chunks(per * 2 * inter).zip(out.chunks_mut(per * inter)), |(gu, o)| part(gu, o, inter));
    Ok(())
}

/// e^x within 2 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n built from its bits),
/// without a libm call so that the loop vectorizes; saturates at e^-87.3 / e^88.3.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12582912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // ln 2 = LN2_HI - 2.1219444e-4, the first part exact in f32, so that n LN2_HI is exact too
    const LN2_HI: f32 = 355.0 / 512.0;
    let r = x - n * LN2_HI + n * 2.1219444e-4;
    let p = ((((1.9875691e-4 * r + 1.3981999e-3) * r + 8.333452e-3) * r + 4.1665796e-2) * r + 1.6666666e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}
