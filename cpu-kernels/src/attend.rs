//! One request's queries of one KV head over its tokens, as `attend_ref` computes them: q is scaled by sm_scale;
//! an INT4 key row c s + lo meets R q as s (R q . c) + lo sum(R q) (+ q . mean when centered); values are summed
//! as (p s) . c + p lo in the stored space and rotated back once; with a window, the sinks and the newest tokens
//! come from the ring at bf16 (the new token from the step's own K, V) and meet the plain q.

use half::bf16;

use crate::int4::{params, rotate, unpack};
use crate::vector::{axpy, dot, from_bf16};
use crate::{Ring, Rows, RowsMut, Step, Store};

/// Per-call buffers, sized once for the step's longest request.
pub struct Scratch {
    q: Vec<f32>,      // [G, D]: q * sm_scale
    qs: Vec<f32>,     // [G, D]: that in the stored space (rotated for int4-bdr)
    qsum: Vec<f32>,   // [G]: sum of qs
    qmu: Vec<f32>,    // [G]: q . mean (centered K)
    lo: Vec<f32>,     // [G]: sum of p lo over the cached V rows
    scores: Vec<f32>, // [G, n]: scores, then probabilities
    row: Vec<f32>,    // [D]: one cached / raw row
    acc: Vec<f32>,    // [G, D]: the output
}

impl Scratch {
    pub fn new(step: &Step) -> Self {
        let (g, d) = (step.group(), step.head_dim);
        let longest = step.seq_lens.iter().copied().max().unwrap_or(0).max(0) as usize;
        Scratch {
            q: vec![0.0; g * d],
            qs: vec![0.0; g * d],
            qsum: vec![0.0; g],
            qmu: vec![0.0; g],
            lo: vec![0.0; g],
            scores: vec![0.0; g * longest],
            row: vec![0.0; d],
            acc: vec![0.0; g * d],
        }
    }
}

/// Where a raw position's K, V row is read.
enum Source {
    Ring(usize), // flat ring slot
    New,
}

/// Request b's positions: [cached_from, cached_to) from the cache, the rest raw (`raw_source`).
struct Positions<'a> {
    n: usize,
    cached_from: usize,
    cached_to: usize,
    ring: Option<(&'a Ring<'a>, usize, usize)>, // the ring, the request's first flat slot, its sinks
}

impl Positions<'_> {
    fn of<'a>(step: &Step, b: usize, ring: Option<&'a Ring<'a>>) -> Positions<'a> {
        let n = step.seq_lens[b] as usize;
        match ring {
            None => Positions { n, cached_from: 0, cached_to: n, ring: None },
            Some(r) => {
                let quant = r.quant_lens[b] as usize;
                let sinks = (r.held_sinks[b] as usize).min(quant);
                let base = r.rows[b] as usize * (r.sinks + r.window);
                Positions { n, cached_from: sinks, cached_to: quant, ring: Some((r, base, sinks)) }
            }
        }
    }

    /// The raw positions (with a ring): the sinks, then the window, then the new token.
    fn raw(&self) -> impl Iterator<Item = (usize, Source)> + '_ {
        let (sinks, window) = match self.ring {
            Some((_, _, sinks)) => (0..sinks, self.cached_to..self.n - 1),
            None => (0..0, 0..0),
        };
        let new = if self.ring.is_some() { self.n - 1..self.n } else { 0..0 };
        let ring = self.ring.map(|(r, base, _)| (r.sinks, r.window, base));
        sinks
            .map(move |p| (p, Source::Ring(ring.unwrap().2 + p)))
            .chain(window.map(move |p| {
                let (s, w, base) = ring.unwrap();
                (p, Source::Ring(base + s + p % w))
            }))
            .chain(new.map(|p| (p, Source::New)))
    }
}

/// Request b's positions [from, to) with their slots, page by page (no division per position).
#[inline(always)]
fn slots<'a>(step: &'a Step, b: usize, from: usize, to: usize) -> impl Iterator<Item = (usize, usize)> + 'a {
    let (size, table) = (step.page_size, &step.page_table[b * step.table_width..]);
    let pages = if from < to { from / size..(to - 1) / size + 1 } else { 0..0 };
    pages.flat_map(move |i| {
        let first = i * size; // position of the page's first slot
        let base = table[i] as usize * size;
        (first.max(from)..(first + size).min(to)).map(move |p| (p, base + p - first))
    })
}

/// Attend the query heads of request b's KV head h; `out` holds their rows [G, D] (out[b, h G..(h + 1) G]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn request_head(
    step: &Step,
    b: usize,
    h: usize,
    q: &Rows,
    k: &Rows,
    v: &Rows,
    store: &Store,
    ring: Option<&Ring>,
    out: &mut RowsMut,
    s: &mut Scratch,
) {
    let (g_n, d, hkv) = (step.group(), step.head_dim, step.kv_heads);
    let pos = Positions::of(step, b, ring);
    let n = pos.n;
    let (order, rotate_v, k_mean) = match store {
        Store::Int4 { hadamard_order, rotate_v, k_mean, .. } => (*hadamard_order, *rotate_v, *k_mean),
        Store::Bf16 { .. } => (0, false, None),
    };
    for g in 0..g_n {
        let qg = &mut s.q[g * d..][..d];
        q.load(b, h * g_n + g, d, qg);
        qg.iter_mut().for_each(|x| *x *= step.sm_scale);
        let qs = &mut s.qs[g * d..][..d];
        qs.copy_from_slice(qg);
        rotate(qs, order);
        s.qsum[g] = qs.iter().sum();
        s.qmu[g] = k_mean.map_or(0.0, |m| dot(qg, &m[h * d..][..d]));
    }
    let scores = &mut s.scores[..g_n * n];
    // scores of the cached positions
    for (p, slot) in slots(step, b, pos.cached_from, pos.cached_to) {
        let row = slot * hkv + h;
        match store {
            Store::Bf16 { k: cache, .. } => {
                from_bf16(&cache[row * d..][..d], &mut s.row);
                for g in 0..g_n {
                    scores[g * n + p] = dot(&s.q[g * d..][..d], &s.row);
                }
            }
            Store::Int4 { k: cache, k_params, .. } => {
                unpack(&cache[row * d / 2..][..d / 2], &mut s.row);
                let (scale, lo) = params(k_params, row);
                for g in 0..g_n {
                    scores[g * n + p] = scale * dot(&s.qs[g * d..][..d], &s.row) + lo * s.qsum[g] + s.qmu[g];
                }
            }
        }
    }
    // scores of the raw positions (bf16 rows, the plain q)
    for (p, src) in pos.raw() {
        raw_row(&src, step, (b, h), k, ring.map(|r| &*r.k), &mut s.row);
        for g in 0..g_n {
            scores[g * n + p] = dot(&s.q[g * d..][..d], &s.row);
        }
    }
    for probs in scores.chunks_exact_mut(n) {
        let max = probs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        probs.iter_mut().for_each(|x| {
            *x = (*x - max).exp();
            sum += *x;
        });
        probs.iter_mut().for_each(|x| *x /= sum);
    }
    // values: the cached part in the stored space, rotated back, then the raw rows
    s.acc.fill(0.0);
    s.lo.fill(0.0);
    for (p, slot) in slots(step, b, pos.cached_from, pos.cached_to) {
        let row = slot * hkv + h;
        match store {
            Store::Bf16 { v: cache, .. } => {
                from_bf16(&cache[row * d..][..d], &mut s.row);
                for g in 0..g_n {
                    axpy(&mut s.acc[g * d..][..d], scores[g * n + p], &s.row);
                }
            }
            Store::Int4 { v: cache, v_params, .. } => {
                unpack(&cache[row * d / 2..][..d / 2], &mut s.row);
                let (scale, lo) = params(v_params, row);
                for g in 0..g_n {
                    let w = scores[g * n + p];
                    axpy(&mut s.acc[g * d..][..d], w * scale, &s.row);
                    s.lo[g] += w * lo;
                }
            }
        }
    }
    for g in 0..g_n {
        let (acc, lo) = (&mut s.acc[g * d..][..d], s.lo[g]);
        acc.iter_mut().for_each(|x| *x += lo);
        if rotate_v {
            rotate(acc, order);
        }
    }
    for (p, src) in pos.raw() {
        raw_row(&src, step, (b, h), v, ring.map(|r| &*r.v), &mut s.row);
        for g in 0..g_n {
            axpy(&mut s.acc[g * d..][..d], scores[g * n + p], &s.row);
        }
    }
    for g in 0..g_n {
        out.put(g * d, &s.acc[g * d..][..d]);
    }
}

/// A raw K or V row of request b, head h at bf16: from the ring, or the step's own (rounded to bf16, as the ring
/// keeps it).
#[inline(always)]
fn raw_row(
    src: &Source,
    step: &Step,
    (b, h): (usize, usize),
    new: &Rows,
    ring: Option<&[u16]>,
    row: &mut [f32],
) {
    let (d, hkv) = (step.head_dim, step.kv_heads);
    match *src {
        Source::Ring(slot) => {
            from_bf16(&ring.expect("raw rows come with a ring")[(slot * hkv + h) * d..][..d], row)
        }
        Source::New => {
            new.load(b, h, d, row);
            row.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
        }
    }
}
