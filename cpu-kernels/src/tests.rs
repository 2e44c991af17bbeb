//! The kernel's own checks; its agreement with the torch reference is tested from Python
//! (tests/worker/test_cpu_backend.py), where the reference lives.

use half::{bf16, f16};

use super::*;

/// A small deterministic generator (no dependency for tests).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn bf16s(&mut self, n: usize) -> Vec<u16> {
        (0..n).map(|_| bf16::from_f32(self.next()).to_bits()).collect()
    }
}

#[test]
fn rotation_is_its_own_inverse() {
    let mut rng = Lcg(1);
    let x: Vec<f32> = (0..128).map(|_| rng.next()).collect();
    for order in [16, 32, 64, 128] {
        let mut y = x.clone();
        rotate(&mut y, order);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&y) - norm(&x)).abs() < 1e-4, "orthogonal");
        rotate(&mut y, order);
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-5), "order {order}");
    }
}

#[test]
fn quantized_rows_come_back_within_half_a_step() {
    let mut rng = Lcg(2);
    let mut x: Vec<f32> = (0..64).map(|_| rng.next()).collect();
    x[5] = 9.0; // an outlier sets the range
    let (mut packed, mut params) = (vec![0u8; 32], vec![0u16; 2]);
    quantize_row(&x, &mut packed, &mut params);
    let (scale, lo) = (f16::from_bits(params[0]).to_f32(), f16::from_bits(params[1]).to_f32());
    for (j, &v) in x.iter().enumerate() {
        let code = if j < 32 { packed[j] & 0xF } else { packed[j - 32] >> 4 };
        assert!((code as f32 * scale + lo - v).abs() <= scale / 2.0 + 1e-3, "element {j}");
    }
}

/// bf16 cache, 2 requests over 3 pages of 4 tokens, GQA 2: the softmax attention over the stored rows.
#[test]
fn bf16_decode_is_softmax_attention() {
    let (hq, hkv, d, page) = (4, 2, 8, 4);
    let mut rng = Lcg(3);
    let slots = 16 * page;
    let (mut kc, mut vc) = (rng.bf16s(slots * hkv * d), rng.bf16s(slots * hkv * d));
    let (q, kn, vn) = (rng.bf16s(2 * hq * d), rng.bf16s(2 * hkv * d), rng.bf16s(2 * hkv * d));
    let table = [3, 7, 1, 5, 2, 0];
    let seq_lens = [10, 3];
    let new_slots = [(page + 1) as i64, (5 * page + 2) as i64]; // positions 9 (page 1) and 2 (page 5)
    let step = Step {
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        page_size: page,
        sm_scale: 0.5,
        slots: &new_slots,
        seq_lens: &seq_lens,
        page_table: &table,
        table_width: 3,
    };
    let mut out = vec![0u16; 2 * hq * d];
    let rows = |data, heads: usize| Rows::Bf16 { data, stride: heads * d };
    let mut store = Store::Bf16 { k: &mut kc, v: &mut vc };
    decode_attention(
        &step,
        &rows(&q, hq),
        &rows(&kn, hkv),
        &rows(&vn, hkv),
        &mut store,
        None,
        &mut RowsMut::Bf16(&mut out),
    )
    .unwrap();
    let f = |x: u16| f32::from_bits((x as u32) << 16);
    for b in 0..2 {
        for head in 0..hq {
            let h = head / 2;
            let slot = |p: usize| table[b * 3 + p / page] as usize * page + p % page;
            let qv: Vec<f32> = (0..d).map(|i| f(q[(b * hq + head) * d + i]) * 0.5).collect();
            let scores: Vec<f32> = (0..seq_lens[b] as usize)
                .map(|p| (0..d).map(|i| qv[i] * f(kc[(slot(p) * hkv + h) * d + i])).sum())
                .collect();
            let max = scores.iter().copied().fold(f32::MIN, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            for i in 0..d {
                let want: f32 =
                    e.iter().enumerate().map(|(p, w)| w / sum * f(vc[(slot(p) * hkv + h) * d + i])).sum();
                let got = f(out[(b * hq + head) * d + i]);
                assert!((got - want).abs() < 1e-2, "b {b} head {head} dim {i}: {got} vs {want}");
            }
        }
        // the new token was stored where its slot says
        let at = new_slots[b] as usize * hkv * d;
        assert_eq!(&kc[at..at + hkv * d], &kn[b * hkv * d..][..hkv * d]);
    }
}

#[test]
fn a_page_outside_the_cache_is_an_error() {
    let (mut kc, mut vc) = (vec![0u16; 8 * 8], vec![0u16; 8 * 8]);
    let q = vec![0u16; 8];
    let step = Step {
        q_heads: 1,
        kv_heads: 1,
        head_dim: 8,
        page_size: 4,
        sm_scale: 1.0,
        slots: &[0],
        seq_lens: &[5],
        page_table: &[0, 9],
        table_width: 2,
    };
    let rows = Rows::Bf16 { data: &q, stride: 8 };
    let err = decode_attention(
        &step,
        &rows,
        &rows,
        &rows,
        &mut Store::Bf16 { k: &mut kc, v: &mut vc },
        None,
        &mut RowsMut::Bf16(&mut [0u16; 8]),
    )
    .unwrap_err();
    assert!(err.contains("outside"), "{err}");
}
