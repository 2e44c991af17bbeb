//! The tensors of a call as addresses and lengths, read from the Python side's map of fields once and turned into
//! slices per call: a per-call function parses and uses them at once (`raw`), a kept object (the worker's layer,
//! step and KV cache handles) parses them when it is made and only builds the slices on each call.

use std::collections::HashMap;

use crate::quant::{Format, Segment};
use crate::{Ring, Step, Store};

pub struct Fields<'a>(pub &'a HashMap<String, usize>);

impl Fields<'_> {
    pub(crate) fn get(&self, name: &str) -> Result<usize, String> {
        self.0.get(name).copied().ok_or_else(|| format!("missing field {name}"))
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.0.get(&format!("{name}_len")).is_some_and(|&n| n > 0)
    }

    /// The tensor `name` (empty when absent).
    pub(crate) fn raw(&self, name: &str) -> Result<Raw, String> {
        if !self.has(name) {
            return Ok(Raw::default());
        }
        Ok(Raw { addr: self.get(name)?, len: self.get(&format!("{name}_len"))? })
    }

    /// The tensor `name`, None when absent.
    pub(crate) fn optional(&self, name: &str) -> Result<Option<Raw>, String> {
        Ok(if self.has(name) { Some(self.raw(name)?) } else { None })
    }

    /// The tensor `name` as a slice of T (empty when absent).
    ///
    /// # Safety
    /// As `Raw::slice`.
    pub(crate) unsafe fn slice<'s, T>(&self, name: &str) -> Result<&'s [T], String> {
        // SAFETY: the caller's contract.
        Ok(unsafe { self.raw(name)?.slice() })
    }

    /// # Safety
    /// As `Raw::slice_mut`.
    pub(crate) unsafe fn slice_mut<'s, T>(&self, name: &str) -> Result<&'s mut [T], String> {
        // SAFETY: the caller's contract.
        Ok(unsafe { self.raw(name)?.slice_mut() })
    }
}

/// A tensor's address and element count.
#[derive(Clone, Copy, Default, Debug)]
pub struct Raw {
    addr: usize,
    len: usize,
}

impl Raw {
    pub(crate) fn new(addr: usize, len: usize) -> Self {
        Raw { addr, len }
    }

    pub(crate) fn len(self) -> usize {
        self.len
    }

    /// # Safety
    /// The address must hold `len` live, aligned elements of T that nothing else writes while the slice lives.
    pub(crate) unsafe fn slice<'s, T>(self) -> &'s [T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(self.addr as *const T, self.len) }
    }

    /// # Safety
    /// As `slice`, and nothing else reads or writes the elements while the slice lives.
    pub(crate) unsafe fn slice_mut<'s, T>(self) -> &'s mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut T, self.len) }
    }
}

/// A decode step's layout (`Step` less what a layer brings): slots (i64), seq_lens, page_table (i32,
/// `table_width`), `page_size`; with a window: ring_rows, quant_lens, held_sinks (i32), write_slots (i64).
#[derive(Clone, Copy, Debug)]
pub struct StepParts {
    slots: Raw,
    seq_lens: Raw,
    page_table: Raw,
    table_width: usize,
    page_size: usize,
    window: Option<[Raw; 4]>,
}

impl StepParts {
    pub fn parse(f: &Fields) -> Result<Self, String> {
        let window = if f.has("ring_rows") {
            Some([f.raw("ring_rows")?, f.raw("quant_lens")?, f.raw("held_sinks")?, f.raw("write_slots")?])
        } else {
            None
        };
        Ok(StepParts {
            slots: f.raw("slots")?,
            seq_lens: f.raw("seq_lens")?,
            page_table: f.raw("page_table")?,
            table_width: f.get("table_width")?,
            page_size: f.get("page_size")?,
            window,
        })
    }

    /// # Safety
    /// The tensors live, unchanged, while the step does.
    pub unsafe fn step<'s>(
        &self,
        q_heads: usize,
        cache: &CacheParts,
        sm_scale: f32,
        threads: usize,
    ) -> Step<'s> {
        // SAFETY (the slices): the caller's contract.
        unsafe {
            Step {
                q_heads,
                kv_heads: cache.kv_heads,
                head_dim: cache.head_dim,
                page_size: self.page_size,
                sm_scale,
                slots: self.slots.slice(),
                seq_lens: self.seq_lens.slice(),
                page_table: self.page_table.slice(),
                table_width: self.table_width,
                threads,
            }
        }
    }
}

/// One layer's cache: cache_k, cache_v (bf16, or packed u8 with k_params, v_params fp16 when `int4`), k_mean (f32,
/// optional), `hadamard_order`, `rotate_v`, `kv_heads`, `head_dim`; ring_k, ring_v (bf16), `sinks`, `window` where
/// the layer keeps a ring.
#[derive(Clone, Copy, Debug)]
pub struct CacheParts {
    kv_heads: usize,
    head_dim: usize,
    k: Raw,
    v: Raw,
    /// k_params, v_params, k_mean, hadamard_order, rotate_v
    int4: Option<(Raw, Raw, Option<Raw>, usize, bool)>,
    /// ring_k, ring_v, sinks, window
    ring: Option<(Raw, Raw, usize, usize)>,
}

impl CacheParts {
    pub fn parse(f: &Fields) -> Result<Self, String> {
        let int4 = if f.get("int4")? != 0 {
            let (order, rotate_v) = (f.get("hadamard_order")?, f.get("rotate_v")? != 0);
            Some((f.raw("k_params")?, f.raw("v_params")?, f.optional("k_mean")?, order, rotate_v))
        } else {
            None
        };
        let ring = if f.has("ring_k") {
            Some((f.raw("ring_k")?, f.raw("ring_v")?, f.get("sinks")?, f.get("window")?))
        } else {
            None
        };
        Ok(CacheParts {
            kv_heads: f.get("kv_heads")?,
            head_dim: f.get("head_dim")?,
            k: f.raw("cache_k")?,
            v: f.raw("cache_v")?,
            int4,
            ring,
        })
    }

    /// The cache and, where the layer keeps one, its ring with the step's window layout.
    ///
    /// # Safety
    /// The tensors live while the store and ring do, and nothing else touches the cache and the rings meanwhile.
    pub unsafe fn store<'s>(&self, step: &StepParts) -> Result<(Store<'s>, Option<Ring<'s>>), String> {
        // SAFETY (the slices): the caller's contract.
        unsafe {
            let store = match self.int4 {
                Some((k_params, v_params, k_mean, hadamard_order, rotate_v)) => Store::Int4 {
                    k: self.k.slice_mut(),
                    v: self.v.slice_mut(),
                    k_params: k_params.slice_mut(),
                    v_params: v_params.slice_mut(),
                    k_mean: k_mean.map(|m| m.slice()),
                    hadamard_order,
                    rotate_v,
                },
                None => Store::Bf16 { k: self.k.slice_mut(), v: self.v.slice_mut() },
            };
            let ring = match (self.ring, step.window) {
                (Some((k, v, sinks, window)), Some([rows, quant_lens, held_sinks, write_slots])) => {
                    Some(Ring {
                        k: k.slice_mut(),
                        v: v.slice_mut(),
                        sinks,
                        window,
                        rows: rows.slice(),
                        quant_lens: quant_lens.slice(),
                        held_sinks: held_sinks.slice(),
                        write_slots: write_slots.slice(),
                    })
                }
                (Some(_), None) => {
                    return Err("the layer keeps a ring but the step has no window layout".into())
                }
                (None, _) => None,
            };
            Ok((store, ring))
        }
    }
}

/// A GGUF weight as its segments: `{p}segments` of them, segment i's blocks in `{p}w{i}` (u8), its ggml type
/// `{p}w{i}_type` and `{p}w{i}_rows`, over `{p}k` columns (`p` the prefix).
#[derive(Clone, Debug)]
pub struct WeightParts {
    pub k: usize,
    segments: Vec<(Format, usize, Raw)>,
}

impl WeightParts {
    pub fn parse(f: &Fields, p: &str) -> Result<Self, String> {
        let segments = (0..f.get(&format!("{p}segments"))?)
            .map(|i| {
                let ggml = f.get(&format!("{p}w{i}_type"))?;
                let format = Format::from_ggml(ggml).ok_or(format!("ggml type {ggml} is not supported"))?;
                Ok((format, f.get(&format!("{p}w{i}_rows"))?, f.raw(&format!("{p}w{i}"))?))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(WeightParts { k: f.get(&format!("{p}k"))?, segments })
    }

    /// Output features (the segments' rows).
    pub fn rows(&self) -> usize {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// # Safety
    /// The blocks live, unchanged, while the segments do.
    pub unsafe fn segments<'s>(&self) -> Vec<Segment<'s>> {
        // SAFETY: the caller's contract.
        self.segments
            .iter()
            .map(|&(format, rows, data)| Segment { format, rows, data: unsafe { data.slice() } })
            .collect()
    }
}
