//! Matrix-vector products on a GGUF's own quantized blocks, for decode steps of a few rows: the activation rows are
//! quantized once per call to int8 per block of 32 (a float scale each, as llama.cpp's Q8 activations), then every
//! weight block's codes meet them in integer dot products (AVX2 `maddubs`), one float multiply-add per 32
//! elements. The weights are read as the file stores them, 4.5-8.5 bits each, instead of an 8- or 16-bit copy:
//! a decode step reads each weight once, so the bytes read set its time.
//!
//! The result is exact against the float64 product of the dequantized weights (gguf's dequantizer) with the
//! dequantized Q8 rows, up to float32 rounding (tests/kernels/test_cpu_matvec.py); `quantize_rows` is that Q8.
//!
//! Every chunk of 32 weights is `scale * code` with signed codes (Q4_0, Q5_0, Q8_0, Q6_K: the format's offset
//! taken into the code), or `scale * code + offset` with unsigned ones (Q4_1, Q5_1, Q4_K), the scale shared by its
//! two halves of 16 except in Q6_K; so a chunk's dot product with a Q8 row of scale `dy` is
//! `dy * (scale * Σ code * q + offset * Σ q)`, and each Q8 block keeps `dy * Σ q` for the offsets.

use crate::fused::Elem;
use crate::pool::{pool, MAX_CHUNKS};

/// Weights per chunk of work the pool's threads claim (~3 us of one core): small enough that a thread the OS
/// preempts holds up little, large enough that claiming costs little.
const CHUNK: usize = 1 << 15;

/// The GGUF block formats the kernel reads (ggml type ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4K = 12,
    Q6K = 14,
}

impl Format {
    pub fn from_ggml(id: usize) -> Option<Self> {
        use Format::*;
        [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q6K].into_iter().find(|f| *f as usize == id)
    }

    /// Elements and bytes of one block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Format::Q4_0 => (32, 18),
            Format::Q4_1 => (32, 20),
            Format::Q5_0 => (32, 22),
            Format::Q5_1 => (32, 24),
            Format::Q8_0 => (32, 34),
            Format::Q4K => (256, 144),
            Format::Q6K => (256, 210),
        }
    }
}

/// A weight's rows in one format, [rows, k] as blocks; a projection is one or more of them stacked (q | k | v).
pub struct Segment<'a> {
    pub format: Format,
    pub rows: usize,
    pub data: &'a [u8],
}

/// Activation rows [m, k] as int8 per block of 32: q [m, k], scale [m, k / 32] (q * scale is the row), and
/// scale * Σ q per block [m, k / 32].
pub struct Q8 {
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub sums: Vec<f32>,
    pub k: usize,
}

/// Rows [m, k] (k a multiple of 32) to Q8: scale = max |x| / 127, q = round-half-even(x * (1 / scale)).
pub fn quantize_rows<T: Elem>(x: &[T], k: usize) -> Q8 {
    let blocks = x.len() / 32;
    let mut out = Q8 { q: vec![0; x.len()], scale: vec![0.0; blocks], sums: vec![0.0; blocks], k };
    for (b, (xs, qs)) in x.chunks_exact(32).zip(out.q.chunks_exact_mut(32)).enumerate() {
        let mut f = [0f32; 32];
        f.iter_mut().zip(xs).for_each(|(f, x)| *f = x.get());
        let amax = f.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        qs.iter_mut().zip(&f).for_each(|(q, v)| *q = (v * inv).round_ties_even() as i8);
        out.scale[b] = scale;
        out.sums[b] = scale * qs.iter().map(|&q| q as i32).sum::<i32>() as f32;
    }
    out
}

/// out [m, N] = x [m, k] @ W.T for W the segments stacked (N their rows), in chunks of W's rows over the pool's
/// threads and the caller's (`threads` 1: the caller's alone).
pub fn matvec<T: Elem>(
    x: &[T],
    k: usize,
    segments: &[Segment],
    out: &mut [T],
    threads: usize,
) -> Result<(), String> {
    if !available() {
        return Err("the quantized matvec needs AVX2, FMA and F16C".into());
    }
    let n: usize = segments.iter().map(|s| s.rows).sum();
    if k == 0 || !x.len().is_multiple_of(k) || out.len() != x.len() / k * n {
        return Err(format!(
            "matvec: x of {} and out of {} elements for k {k}, {n} rows",
            x.len(),
            out.len()
        ));
    }
    for s in segments {
        let (elems, bytes) = s.format.block();
        if !k.is_multiple_of(elems) || s.data.len() != s.rows * k / elems * bytes {
            return Err(format!("{:?}: {} bytes for {} rows of {k}", s.format, s.data.len(), s.rows));
        }
    }
    let y = quantize_rows(x, k);
    let m = x.len() / k;
    let per = (CHUNK / k).max(1).max(n.div_ceil(MAX_CHUNKS));
    let out_at = SendPtr(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    pool().run(n.div_ceil(per), threads, &|chunk| {
        let (lo, hi) = (chunk * per, ((chunk + 1) * per).min(n));
        // SAFETY: `available()` holds; each chunk writes only columns lo..hi of out's rows, which stay in bounds
        // (checked above), and the pool returns when every chunk is done.
        unsafe { avx2::rows(&y, m, segments, lo, hi, out_at, n) }
    });
    Ok(())
}

pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// An output pointer handed to the pool's parts, which write disjoint elements.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: the parts write disjoint elements, and the call outlives them.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// The kernel: decode each weight block once into 32-byte vectors of codes, multiply-add them with the Q8 rows.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Format, Segment, SendPtr, Q8};
    use crate::fused::Elem;

    /// Output columns lo..hi of every activation row, up to 4 rows at a time (their accumulators in registers
    /// while a weight block is decoded once).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows<T: Elem>(
        y: &Q8,
        m: usize,
        segments: &[Segment],
        lo: usize,
        hi: usize,
        out: SendPtr<T>,
        n: usize,
    ) {
        let mut first = 0;
        for s in segments {
            let (from, to) = (lo.max(first), hi.min(first + s.rows));
            let row_bytes = y.k / s.format.block().0 * s.format.block().1;
            let mut r0 = 0;
            while r0 < m && from < to {
                let rows = (m - r0).min(4);
                let (cols, group) = (from - first..to - first, Group { q8: y, r0 });
                // SAFETY: the target features hold; the columns are rows of whole blocks of the format.
                unsafe {
                    match rows {
                        1 => columns::<T, 1>(s, row_bytes, cols, group, out, n, first),
                        2 => columns::<T, 2>(s, row_bytes, cols, group, out, n, first),
                        3 => columns::<T, 3>(s, row_bytes, cols, group, out, n, first),
                        _ => columns::<T, 4>(s, row_bytes, cols, group, out, n, first),
                    }
                }
                r0 += rows;
            }
            first += s.rows;
        }
    }

    /// Weight rows `cols` of segment `s` against activation rows r0..r0 + R, into out columns first + cols.
    #[inline(always)]
    unsafe fn columns<T: Elem, const R: usize>(
        s: &Segment,
        row_bytes: usize,
        cols: std::ops::Range<usize>,
        y: Group,
        out: SendPtr<T>,
        n: usize,
        first: usize,
    ) {
        for col in cols {
            let w = &s.data[col * row_bytes..][..row_bytes];
            let mut acc = Acc::<R>::new();
            // SAFETY: the caller's target features; `w` is one row of whole blocks.
            unsafe {
                match s.format {
                    Format::Q4_0 => row::<Q4_0, R>(w, y, &mut acc),
                    Format::Q4_1 => row::<Q4_1, R>(w, y, &mut acc),
                    Format::Q5_0 => row::<Q5_0, R>(w, y, &mut acc),
                    Format::Q5_1 => row::<Q5_1, R>(w, y, &mut acc),
                    Format::Q8_0 => row::<Q8_0, R>(w, y, &mut acc),
                    Format::Q4K => row::<Q4K, R>(w, y, &mut acc),
                    Format::Q6K => row::<Q6K, R>(w, y, &mut acc),
                }
            }
            for r in 0..R {
                // SAFETY: r0 + r < m and first + col < n: inside out [m, n].
                unsafe { *out.0.add((y.r0 + r) * n + first + col) = T::put(acc.total(r)) };
            }
        }
    }

    /// Activation rows r0.. of the Q8 rows (as many as the caller's R).
    #[derive(Clone, Copy)]
    struct Group<'a> {
        q8: &'a Q8,
        r0: usize,
    }

    /// Per activation row: a vector of partial dot products and the offsets' scalar sum.
    struct Acc<const R: usize> {
        v: [__m256; R],
        offset: [f32; R],
    }

    impl<const R: usize> Acc<R> {
        #[inline(always)]
        fn new() -> Self {
            // SAFETY: AVX is enabled wherever an Acc is made (rows).
            Self { v: [unsafe { _mm256_setzero_ps() }; R], offset: [0.0; R] }
        }

        #[inline(always)]
        fn total(&self, r: usize) -> f32 {
            // SAFETY: as `new`.
            unsafe {
                let v = self.v[r];
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s) + self.offset[r]
            }
        }
    }

    /// How a format's chunk of 32 codes enters the dot product.
    #[derive(Clone, Copy)]
    enum Codes {
        /// signed codes (through the sign trick: `maddubs` takes unsigned times signed)
        Signed,
        /// unsigned codes with an offset per unit of the activations' sum (the same for both halves)
        Offset(f32),
    }

    /// One chunk of 32 codes against the rows' Q8 chunk `c`: `mul` holds the 16-bit multipliers of its two halves
    /// (ones, or Q6_K's sub-block scales), `scale` the float factor of the integer sums.
    #[inline(always)]
    unsafe fn chunk<const R: usize>(
        codes: __m256i,
        kind: Codes,
        mul: __m256i,
        scale: f32,
        y: Group,
        c: usize,
        acc: &mut Acc<R>,
    ) {
        // SAFETY: the caller's target features; c indexes a chunk inside each of the rows' k elements.
        unsafe {
            let w = match kind {
                Codes::Signed => _mm256_sign_epi8(codes, codes),
                Codes::Offset(_) => codes,
            };
            for r in 0..R {
                let at = (y.r0 + r) * (y.q8.k / 32) + c;
                let q = _mm256_loadu_si256(y.q8.q.as_ptr().add(at * 32).cast());
                let q = match kind {
                    Codes::Signed => _mm256_sign_epi8(q, codes),
                    Codes::Offset(_) => q,
                };
                let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(w, q), mul);
                let dy = *y.q8.scale.get_unchecked(at);
                acc.v[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale * dy), acc.v[r]);
                if let Codes::Offset(offset) = kind {
                    acc.offset[r] += offset * *y.q8.sums.get_unchecked(at);
                }
            }
        }
    }

    /// A block format: decode each of a block's chunks and feed it to `chunk`.
    trait Blocks {
        const BYTES: usize;

        /// Block `b` of a row (its bytes `w`) against the rows r0..r0 + R.
        unsafe fn dot<const R: usize>(w: &[u8], b: usize, y: Group, acc: &mut Acc<R>);
    }

    #[inline(always)]
    unsafe fn row<B: Blocks, const R: usize>(w: &[u8], y: Group, acc: &mut Acc<R>) {
        for (b, block) in w.chunks_exact(B::BYTES).enumerate() {
            // SAFETY: the caller's target features.
            unsafe { B::dot(block, b, y, acc) };
        }
    }

    #[inline(always)]
    unsafe fn f16_at(w: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([w[at], w[at + 1]]);
        // SAFETY: the caller's target features (F16C).
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
    }

    /// 16 bytes of nibbles: low nibbles are elements 0..15, high ones 16..31.
    #[inline(always)]
    unsafe fn nibbles(qs: &[u8]) -> __m256i {
        // SAFETY: the caller's target features; qs holds 16 bytes.
        unsafe {
            let b = _mm_loadu_si128(qs[..16].as_ptr().cast());
            let v = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
            _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
        }
    }

    /// 0xff in byte j where bit j of the little-endian u32 at qh (Q5_0 / Q5_1: element j's 5th bit) is set.
    #[inline(always)]
    unsafe fn fifth_bits(qh: &[u8]) -> __m256i {
        // SAFETY: the caller's target features.
        unsafe {
            let bits = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
            // byte j gets byte j / 8 of the bits; keep bit j % 8 of it
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(bits as i32),
                _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
            );
            let select = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
            _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select)
        }
    }

    #[inline(always)]
    unsafe fn ones() -> __m256i {
        // SAFETY: the caller's target features.
        unsafe { _mm256_set1_epi16(1) }
    }

    struct Q4_0;
    struct Q4_1;
    struct Q5_0;
    struct Q5_1;
    struct Q8_0;
    struct Q4K;
    struct Q6K;

    // SAFETY (every `dot` below): the caller's target features; `w` is one whole block of the format.

    /// d * (code - 8)
    impl Blocks for Q4_0 {
        const BYTES: usize = 18;

        #[inline(always)]
        unsafe fn dot<const R: usize>(w: &[u8], b: usize, y: Group, acc: &mut Acc<R>) {
            unsafe {
                let codes = _mm256_sub_epi8(nibbles(&w[2..]), _mm256_set1_epi8(8));
                chunk(codes, Codes::Signed, ones(), f16_at(w, 0), y, b, acc);
            }
        }
    }

    /// d * code + m
    impl Blocks for Q4_1 {
        const BYTES: usize = 20;

        #[inline(always)]
        unsafe fn dot<const R: usize>(w: &[u8], b: usize, y: Group, acc: &mut Acc<R>) {
            unsafe {
                let codes = nibbles(&w[4..]);
                chunk(codes, Codes::Offset(f16_at(w, 2)), ones(), f16_at(w, 0), y, b, acc);
            }
        }
    }

    /// d * (code - 16): where the 5th bit is clear, the byte's high nibble set makes it the nibble minus 16
    impl Blocks for Q5_0 {
        const BYTES: usize = 22;

        #[inline(always)]
        unsafe fn dot<const R: usize>(w: &[u8], b: usize, y: Group, acc: &mut Acc<R>) {
            unsafe {
                let high = _mm256_andnot_si256(fifth_bits(&w[2..]), _mm256_set1_epi8(0xf0u8 as i8));
                let codes = _mm256_or_si256(nibbles(&w[6..]), high);
                chunk(codes, Codes::Signed, ones(), f16_at(w, 0), y, b, acc);
            }
        }
    }

    /// d * code + m
    impl Blocks for Q5_1 {
        const BYTES: usize = 24;

        #[inline(always)]
        unsafe fn dot<const R: usize>(w: &[u8], b: usize, y: Group, acc: &mut Acc<R>) {
            unsafe {
                let high = _mm256_and_si256(fifth_bits(&w[4..]), _mm256_set1_epi8(0x10));
                let codes = _mm256_or_si256(nibbles(&w[8..]), high);
                chunk(codes, Codes::Offset(f16_at(w, 2)), ones(), f16_at(w, 0), y, b, acc);
            }
        }
    }

    /// d * code
    impl Blocks for Q8_0 {
        const BYTES: usize = 34;

        #[inline(always)]
        unsafe fn dot<const R: usize>(w: &[u8], b: usize, y: Group, acc: &mut Acc<R>) {
            unsafe {
                let codes = _mm256_loadu_si256(w[2..34].as_ptr().cast());
                chunk(codes, Codes::Signed, ones(), f16_at(w, 0), y, b, acc);
            }
        }
    }

    /// Q4_K: d, dmin (f16), 12 bytes of 6-bit sub-block scales and mins, 128 bytes of codes; chunk j is
    /// d * sc_j * code - dmin * m_j, its codes the low (j even) or high nibbles of bytes 32 (j / 2)..
    impl Blocks for Q4K {
        const BYTES: usize = 144;

        #[inline(always)]
        unsafe fn dot<const R: usize>(w: &[u8], b: usize, y: Group, acc: &mut Acc<R>) {
            unsafe {
                let (d, dmin) = (f16_at(w, 0), f16_at(w, 2));
                let s = &w[4..16];
                let scale_min = |j: usize| -> (f32, f32) {
                    let (sc, m) = if j < 4 {
                        (s[j] & 63, s[j + 4] & 63)
                    } else {
                        ((s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
                    };
                    (d * sc as f32, -dmin * m as f32)
                };
                let low = _mm256_set1_epi8(0x0f);
                for pair in 0..4 {
                    let q = _mm256_loadu_si256(w[16 + 32 * pair..16 + 32 * pair + 32].as_ptr().cast());
                    let halves = [_mm256_and_si256(q, low), _mm256_and_si256(_mm256_srli_epi16(q, 4), low)];
                    for (h, codes) in halves.into_iter().enumerate() {
                        let j = 2 * pair + h;
                        let (scale, offset) = scale_min(j);
                        chunk(codes, Codes::Offset(offset), ones(), scale, y, 8 * b + j, acc);
                    }
                }
            }
        }
    }

    /// Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 sub-block scales (16 elements each), d
    /// (f16); element e is d * sc[e / 16] * (code - 32). Half h (128 elements) takes ql[64 h..], qh[32 h..]; its
    /// chunk c the low (c < 2) or high nibbles of ql[64 h + 32 (c % 2)..] and bits 2c, 2c + 1 of qh[32 h..].
    impl Blocks for Q6K {
        const BYTES: usize = 210;

        #[inline(always)]
        unsafe fn dot<const R: usize>(w: &[u8], b: usize, y: Group, acc: &mut Acc<R>) {
            unsafe {
                let d = f16_at(w, 208);
                let sc = &w[192..208];
                let (low, high, bias) =
                    (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30), _mm256_set1_epi8(32));
                for h in 0..2 {
                    let ql =
                        [0, 32].map(|o| _mm256_loadu_si256(w[64 * h + o..64 * h + o + 32].as_ptr().cast()));
                    let qh = _mm256_loadu_si256(w[128 + 32 * h..128 + 32 * h + 32].as_ptr().cast());
                    let parts = [
                        (_mm256_and_si256(ql[0], low), _mm256_slli_epi16(qh, 4)),
                        (_mm256_and_si256(ql[1], low), _mm256_slli_epi16(qh, 2)),
                        (_mm256_and_si256(_mm256_srli_epi16(ql[0], 4), low), qh),
                        (_mm256_and_si256(_mm256_srli_epi16(ql[1], 4), low), _mm256_srli_epi16(qh, 2)),
                    ];
                    for (c, (lo4, hi2)) in parts.into_iter().enumerate() {
                        let codes = _mm256_sub_epi8(_mm256_or_si256(lo4, _mm256_and_si256(hi2, high)), bias);
                        let (s0, s1) = (sc[8 * h + 2 * c] as i8, sc[8 * h + 2 * c + 1] as i8);
                        let mul = _mm256_set_m128i(_mm_set1_epi16(s1 as i16), _mm_set1_epi16(s0 as i16));
                        chunk(codes, Codes::Signed, mul, d, y, 8 * b + 4 * h + c, acc);
                    }
                }
            }
        }
    }
}
