//! The kernel's own checks; its agreement with the torch reference is tested from Python
//! (tests/worker/test_cpu_backend.py), where the reference lives.

use std::collections::HashMap;

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
        threads: 2,
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
        threads: 2,
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

fn bf(x: u16) -> f64 {
    f32::from_bits((x as u32) << 16) as f64
}

/// rms_norm(x) * w in f64.
fn norm_ref(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let rstd = 1.0 / (x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(w).map(|(a, w)| a * rstd * w).collect()
}

#[test]
fn bf16_rounding_is_torchs() {
    let mut rng = Lcg(4);
    let mut xs: Vec<f32> = (0..1000).map(|_| rng.next() * 1e3).collect();
    xs.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
    ]);
    for x in xs {
        assert_eq!(<u16 as Elem>::put(x), bf16::from_f32(x).to_bits(), "{x}");
    }
    assert_eq!(<u16 as Elem>::put(f32::NAN), 0x7fc0);
}

#[test]
fn exp_is_within_two_ulp() {
    for i in -8700..=8800 {
        let x = i as f32 / 100.0;
        let (got, want) = (crate::fused::exp(x) as f64, (x as f64).exp());
        assert!((got - want).abs() <= 2.5e-7 * want, "exp({x}) = {got}, not {want}");
    }
    assert!(crate::fused::exp(-1000.0) < 1e-37 && crate::fused::exp(1000.0) > 1e38);
}

#[test]
fn norms_match_f64_and_threads_change_nothing() {
    let mut rng = Lcg(5);
    let (rows, width) = (300, 576); // enough rows to split over threads
    let x = rng.bf16s(rows * width);
    let w = rng.bf16s(width);
    let mut out = vec![0u16; rows * width];
    rms_norm(&x, &w, 1e-5, &mut out, 1).unwrap();
    let wf: Vec<f64> = w.iter().map(|&v| bf(v)).collect();
    for r in [0, 151, rows - 1] {
        let want = norm_ref(&x[r * width..][..width].iter().map(|&v| bf(v)).collect::<Vec<_>>(), &wf, 1e-5);
        for (i, &o) in out[r * width..][..width].iter().enumerate() {
            assert!((bf(o) - want[i]).abs() <= want[i].abs() * 2f64.powi(-8) + 1e-6, "row {r} {i}");
        }
    }
    let mut threaded = vec![0u16; rows * width];
    rms_norm(&x, &w, 1e-5, &mut threaded, 4).unwrap();
    assert_eq!(out, threaded);
    // the fused add: the stream is the rounded sum, x becomes the norm of it
    let res0 = rng.bf16s(rows * width);
    let (mut xs, mut res) = (x.clone(), res0.clone());
    add_rms_norm(&mut xs, &mut res, &w, 1e-5, 3).unwrap();
    for i in 0..rows * width {
        assert_eq!(res[i], bf16::from_f32((bf(x[i]) + bf(res0[i])) as f32).to_bits());
    }
    let mut normed = vec![0u16; rows * width];
    rms_norm(&res, &w, 1e-5, &mut normed, 1).unwrap();
    assert_eq!(xs, normed);
}

#[test]
fn f32_norm_and_silu_match_f64() {
    let mut rng = Lcg(6);
    let (rows, width) = (3, 100);
    let x: Vec<f32> = (0..rows * width).map(|_| rng.next() * 4.0).collect();
    let w: Vec<f32> = (0..width).map(|_| 1.0 + rng.next()).collect();
    let mut out = vec![f32::NAN; rows * width];
    rms_norm(&x, &w, 1e-6, &mut out, 2).unwrap();
    let wf: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    for r in 0..rows {
        let want =
            norm_ref(&x[r * width..][..width].iter().map(|&v| v as f64).collect::<Vec<_>>(), &wf, 1e-6);
        for i in 0..width {
            assert!((out[r * width + i] as f64 - want[i]).abs() <= 1e-5 * want[i].abs() + 1e-6);
        }
    }
    let inter = width / 2;
    let mut h = vec![f32::NAN; rows * inter];
    silu_mul(&x, &mut h, inter, 1).unwrap();
    for r in 0..rows {
        for i in 0..inter {
            let (g, u) = (x[r * width + i] as f64, x[r * width + inter + i] as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            assert!((h[r * inter + i] as f64 - want).abs() <= 1e-6 * want.abs() + 1e-7, "{r} {i}");
        }
    }
}

/// q/k norm + RoPE in place, GQA 4 / 2, against f64; v and the row padding are left as they were.
#[test]
fn qk_norm_rope_rotates_q_and_k_in_place() {
    let (hq, hkv, d, rows, max_pos) = (4, 2, 8, 3, 10);
    let stride = (hq + 2 * hkv) * d + 5; // padded rows
    let mut rng = Lcg(7);
    let qkv0: Vec<f32> = (0..rows * stride).map(|_| rng.next() * 3.0).collect();
    let (qw, kw): (Vec<f32>, Vec<f32>) =
        ((0..d).map(|_| 1.0 + rng.next()).collect(), (0..d).map(|_| rng.next()).collect());
    let half = d / 2;
    let mut cos_sin = vec![0f32; max_pos * 2 * d];
    for p in 0..max_pos {
        for c in 0..half {
            let a = p as f32 / 10000f32.powf(c as f32 / half as f32);
            let row = &mut cos_sin[p * 2 * d..];
            (row[c], row[half + c], row[2 * half + c], row[3 * half + c]) =
                (a.cos(), a.cos(), -a.sin(), a.sin());
        }
    }
    let positions = [9i64, 0, 4];
    let lam: Vec<f32> = (0..hkv * d).map(|i| [0.25f32, 1.0, 4.0][i % 3]).collect();
    let mut qkv = qkv0.clone();
    let p = QkRope {
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        norm: Some((&qw[..], &kw[..], 1e-6)),
        cos_sin: &cos_sin,
        positions: &positions,
        k_scale: Some(&lam),
    };
    qk_norm_rope(&mut qkv, stride, &p, 2).unwrap();
    for (r, &pos) in positions.iter().enumerate() {
        for h in 0..hq + hkv {
            let at = r * stride + h * d;
            let w = if h < hq { &qw } else { &kw };
            let x = norm_ref(
                &qkv0[at..at + d].iter().map(|&v| v as f64).collect::<Vec<_>>(),
                &w.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                1e-6,
            );
            for c in 0..half {
                let a = pos as f64 / 10000f64.powf(c as f64 / half as f64);
                let (lo, hi) =
                    (x[c] * a.cos() - x[half + c] * a.sin(), x[half + c] * a.cos() + x[c] * a.sin());
                let scale = |i: usize| {
                    if h < hq {
                        lam[(h / 2) * d + i] as f64
                    } else {
                        1.0 / lam[(h - hq) * d + i] as f64
                    }
                };
                for (i, want) in [(c, lo * scale(c)), (half + c, hi * scale(half + c))] {
                    let got = qkv[at + i] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "row {r} head {h} {i}: {got} vs {want}"
                    );
                }
            }
        }
        let v = r * stride + (hq + hkv) * d;
        assert_eq!(qkv[v..(r + 1) * stride], qkv0[v..(r + 1) * stride], "v and the padding are untouched");
    }
}

#[test]
fn fused_bad_layouts_are_errors() {
    let w = vec![0u16; 8];
    let mut out = vec![0u16; 15];
    assert!(rms_norm(&[0u16; 16], &w, 1e-6, &mut out, 1).is_err(), "out too short");
    assert!(rms_norm(&[0u16; 12], &w, 1e-6, &mut [0u16; 12], 1).is_err(), "not whole rows");
    assert!(add_rms_norm(&mut [0u16; 16], &mut [0u16; 8], &w, 1e-6, 1).is_err());
    assert!(silu_mul(&[0u16; 16], &mut [0u16; 7], 4, 1).is_err());
    let cos_sin = vec![0f32; 4 * 16];
    let mut qkv = vec![0u16; 2 * 24];
    let rope = |positions: &'static [i64]| QkRope::<u16> {
        q_heads: 1,
        kv_heads: 1,
        head_dim: 8,
        norm: None,
        cos_sin: &cos_sin,
        positions,
        k_scale: None,
    };
    assert!(qk_norm_rope(&mut qkv, 24, &rope(&[0, 3]), 1).is_ok());
    assert!(qk_norm_rope(&mut qkv, 24, &rope(&[0, 4]), 1).unwrap_err().contains("position"));
    assert!(qk_norm_rope(&mut qkv, 24, &rope(&[0, -1]), 1).is_err());
    assert!(qk_norm_rope(&mut qkv, 16, &rope(&[0, 1]), 1).is_err(), "stride without room for v");
    assert!(qk_norm_rope(&mut qkv[..30], 24, &rope(&[0, 1]), 1).is_err(), "the last row cut short");
    assert!(qk_norm_rope(&mut qkv, 24, &rope(&[0, 1, 2]), 1).is_err(), "more positions than rows");
}

#[test]
fn a_layer_of_the_wrong_shapes_is_refused() {
    // a layer of hidden 64, inter 64, 2 + 2 x 1 heads of 32: Q8_0 blocks (34 bytes per 32 weights)
    let (h, i, d) = (64usize, 64usize, 32usize);
    let blocks = |rows: usize, k: usize| vec![0u8; rows * k / 32 * 34];
    let (qkv, o, gate_up, down) = (blocks(4 * d, h), blocks(h, 2 * d), blocks(2 * i, h), blocks(h, i));
    let (norm, cos_sin) = (vec![0f32; h], vec![0f32; 8 * 2 * d]);
    let mut f: HashMap<String, usize> = [
        ("act_f32", 1),
        ("hidden", h),
        ("inter", i),
        ("q_heads", 2),
        ("kv_heads", 1),
        ("head_dim", d),
        ("threads", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let tensor = |f: &mut HashMap<String, usize>, name: &str, addr: *const u8, len: usize| {
        f.extend([(name.to_string(), addr as usize), (format!("{name}_len"), len)]);
    };
    tensor(&mut f, "input_norm", norm.as_ptr().cast(), h);
    tensor(&mut f, "post_norm", norm.as_ptr().cast(), h);
    tensor(&mut f, "cos_sin", cos_sin.as_ptr().cast(), cos_sin.len());
    let weights = [
        ("qkv_", &qkv, 4 * d, h),
        ("o_", &o, h, 2 * d),
        ("gate_up_", &gate_up, 2 * i, h),
        ("down_", &down, h, i),
    ];
    for (p, w, rows, k) in weights {
        tensor(&mut f, &format!("{p}w0"), w.as_ptr(), w.len());
        f.extend([
            (format!("{p}segments"), 1),
            (format!("{p}k"), k),
            (format!("{p}w0_type"), 8),
            (format!("{p}w0_rows"), rows),
        ]);
    }
    assert!(LayerParts::parse(&Fields(&f), 1e-6).is_ok());
    let mut bad = f.clone();
    bad.insert("kv_heads".into(), 2);
    assert!(LayerParts::parse(&Fields(&bad), 1e-6).unwrap_err().contains("qkv"), "q|k|v rows for 2 KV heads");
    let mut bad = f.clone();
    bad.insert("post_norm_len".into(), h - 1);
    assert!(LayerParts::parse(&Fields(&bad), 1e-6).unwrap_err().contains("post_norm"));
    let mut bad = f.clone();
    bad.insert("down_w0_type".into(), 1); // F16: not a type the matvec reads
    assert!(LayerParts::parse(&Fields(&bad), 1e-6).is_err());
}
