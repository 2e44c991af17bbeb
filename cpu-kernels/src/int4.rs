//! The INT4 row format (`saw_kv/formats.py`): lo = min(x), scale = max(max(x) - lo, EPS) / 15, both stored as
//! fp16, codes clamp(round_half_even((x - lo) / scale), 0, 15) with the stored values; the rotation is
//! R = I kron H_b / sqrt(b), natural-order Sylvester H_b.

use half::f16;

use crate::{vector, Store};

const EPS: f32 = 1e-5;

/// x <- R x along blocks of `order` (0: no rotation); R is its own inverse.
#[inline(always)]
pub fn rotate(x: &mut [f32], order: usize) {
    if order == 0 {
        return;
    }
    let norm = 1.0 / (order as f32).sqrt();
    for block in x.chunks_exact_mut(order) {
        let mut h = 1;
        while h < order {
            for pair in block.chunks_exact_mut(2 * h) {
                let (a, b) = pair.split_at_mut(h);
                for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                    (*x, *y) = (*x + *y, *x - *y);
                }
            }
            h *= 2;
        }
        block.iter_mut().for_each(|v| *v *= norm);
    }
}

/// Quantize row x [D] into packed [D/2] and params [2] (fp16 bits of scale, lo).
#[inline(always)]
pub fn quantize_row(x: &[f32], packed: &mut [u8], params: &mut [u16]) {
    let (lo, hi) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (scale, lo) = (f16::from_f32((hi - lo).max(EPS) / 15.0), f16::from_f32(lo));
    params[0] = scale.to_bits();
    params[1] = lo.to_bits();
    let (s, m) = (scale.to_f32(), lo.to_f32());
    let code = |v: f32| ((v - m) / s).round_ties_even().clamp(0.0, 15.0) as u8;
    let (first, second) = x.split_at(x.len() / 2);
    for ((p, &a), &b) in packed.iter_mut().zip(first).zip(second) {
        *p = code(a) | (code(b) << 4);
    }
}

/// Store one (token, KV head) row at `row` (= slot * Hkv + head): K and V as the format encodes them
/// (kx, vx are consumed as scratch).
#[inline(always)]
pub fn store_row(store: &mut Store, row: usize, head: usize, d: usize, kx: &mut [f32], vx: &mut [f32]) {
    match store {
        Store::Bf16 { k, v } => {
            vector::to_bf16(kx, &mut k[row * d..][..d]);
            vector::to_bf16(vx, &mut v[row * d..][..d]);
        }
        Store::Int4 { k, v, k_params, v_params, k_mean, hadamard_order, rotate_v } => {
            if let Some(mean) = k_mean {
                kx.iter_mut().zip(&mean[head * d..][..d]).for_each(|(x, m)| *x -= m);
            }
            rotate(kx, *hadamard_order);
            if *rotate_v {
                rotate(vx, *hadamard_order);
            }
            quantize_row(kx, &mut k[row * d / 2..][..d / 2], &mut k_params[row * 2..][..2]);
            quantize_row(vx, &mut v[row * d / 2..][..d / 2], &mut v_params[row * 2..][..2]);
        }
    }
}

/// Codes of a packed row [D/2] as f32 [D].
#[inline(always)]
pub fn unpack(packed: &[u8], codes: &mut [f32]) {
    let (first, second) = codes.split_at_mut(packed.len());
    for ((&p, a), b) in packed.iter().zip(first).zip(second) {
        *a = (p & 0xF) as f32;
        *b = (p >> 4) as f32;
    }
}

/// fp16 (scale, lo) at `row`.
#[inline(always)]
pub fn params(params: &[u16], row: usize) -> (f32, f32) {
    (f16::from_bits(params[2 * row]).to_f32(), f16::from_bits(params[2 * row + 1]).to_f32())
}
