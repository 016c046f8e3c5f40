//! Encoder self-attention over whole groups of rows (SigLIP: one crop's 1024 patches attend to
//! each other; the Conformer: one window's frames), `softmax(q·kᵀ·scale + terms)·v` per head,
//! on the f32 register tile of [`f32gemm`] with AVX-512F. The additive terms ([`ScoreTerms`]):
//! a value per key (padding masks, 0 or −∞) and a value per head and query−key offset (the
//! Conformer's T5 relative bias), so no `[heads, n, n]` bias tensor is read per layer.
//!
//! Per (group, head) task, 32 queries at a time (one packed panel): the scores come out of the
//! tile transposed, `sᵀ [keys, 32]`, as two vector stores per key (the terms added as they are
//! stored), so the softmax over keys is vertical (lane-wise max, exp, sum; no horizontal
//! reductions) and `sᵀ` is already the packed panel layout the tile takes as its left operand
//! for `p·v` (the values as `d` weight rows over the keys; keys and values put in the tile's
//! weight layout once per task). The panel's scores (32 × keys f32: 128 KB for a crop) stay
//! in L2; the whole score matrix is never formed. A query whose keys are all masked gets zero
//! probabilities (the Conformer reference zeroes masked weights after the softmax). Measured on
//! a 2-crop image and 30 s of speech (Intel, 2 threads): see the README.
//!
//! [`causal`] is the decoder's prefill attention on the same pieces: grouped-query (each query
//! head reads its KV head's keys and values from the cache), causal (each panel reads only the
//! keys its last query sees, later keys masked lane by lane as the scores are stored).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::f32gemm::{self, XR};
use crate::error::Result;

/// Whether [`self_attention`] has a kernel for this CPU.
pub fn available() -> bool {
    f32gemm::available()
}

/// Whether the encoders' attention on `device` with activations of `dtype` runs here: f32 on a
/// CPU with the kernel (else the caller's portable path).
pub fn takes(device: &candle_core::Device, dtype: candle_core::DType) -> bool {
    device.is_cpu() && dtype == candle_core::DType::F32 && available()
}

/// Terms added to the scaled scores before the softmax.
#[derive(Debug, Clone, Default)]
pub struct ScoreTerms {
    /// `[groups, n]`: added to every query's score for key `j` of each group (0 or −∞).
    pub keys: Option<Arc<[f32]>>,
    /// `[heads, relative_len(n)]` from [`relative`]: a term per head and query−key offset.
    pub relative: Option<Arc<[f32]>>,
}

/// Values per head in a [`relative`] table for groups of `n` rows: offsets `i − j` from
/// `−(n−1)` to `n−1`, then a panel's width of zeros (the last panel's rows past `n` read there).
pub fn relative_len(n: usize) -> usize {
    2 * n + XR
}

/// The relative terms `f(head, i − j)` for query `i`, key `j` of groups of `n` rows, laid out
/// for [`ScoreTerms::relative`]: per head, value `u` is offset `u − (n−1)`, so one key's terms
/// for 16 consecutive queries are 16 consecutive values.
pub fn relative(n: usize, heads: usize, f: impl Fn(usize, isize) -> f32) -> Arc<[f32]> {
    let len = relative_len(n);
    let mut t = vec![0f32; heads * len];
    for (h, row) in t.chunks_exact_mut(len).enumerate() {
        for (u, v) in row[..(2 * n).saturating_sub(1)].iter_mut().enumerate() {
            *v = f(h, u as isize - (n as isize - 1));
        }
    }
    t.into()
}

/// Multi-head self-attention within groups: `qkv` `[groups·n, 3·heads·d]` (f32, each row
/// its queries, keys and values, head-major inside each) → `[groups·n, heads·d]`. Scores are
/// scaled by `scale`, then `terms` are added. Only call when [`available`] is true (the caller
/// keeps a portable path).
pub fn self_attention(qkv: &Tensor, groups: usize, heads: usize, scale: f32, terms: &ScoreTerms) -> Result<Tensor> {
    let op = SelfAttention { groups, heads, scale, terms: terms.clone() };
    Ok(qkv.contiguous()?.apply_op1_no_bwd(&op)?)
}

struct SelfAttention {
    groups: usize,
    heads: usize,
    scale: f32,
    terms: ScoreTerms,
}

impl CustomOp1 for SelfAttention {
    fn name(&self) -> &'static str {
        "encoder-self-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, width) = l.shape().dims2()?;
        let CpuStorage::F32(v) = s else { candle_core::bail!("self-attention: f32 only") };
        let (g, heads) = (self.groups.max(1), self.heads.max(1));
        if rows % g != 0 || width % (3 * heads) != 0 {
            candle_core::bail!("self-attention: [{rows}, {width}] is not {g} groups of q, k, v for {heads} heads");
        }
        if self.terms.keys.as_ref().is_some_and(|m| m.len() != rows) {
            candle_core::bail!("self-attention: the key terms do not have one value per row");
        }
        if self.terms.relative.as_ref().is_some_and(|r| r.len() != heads * relative_len(rows / g)) {
            candle_core::bail!("self-attention: the relative terms do not match {heads} heads of groups of {}", rows / g);
        }
        if !available() {
            candle_core::bail!("self-attention: needs AVX-512F");
        }
        let (n, h) = (rows / g, width / 3);
        let x = &v[l.start_offset()..l.start_offset() + rows * width];
        let mut out = vec![0f32; rows * h];
        let ptr = super::SharedOut(out.as_mut_ptr());
        let (mask, relative) = (self.terms.keys.as_deref(), self.terms.relative.as_deref());
        let job = Job { x, n, h, d: h / heads, scale: self.scale, mask, relative };
        (0..g * heads).into_par_iter().for_each(|t| {
            let p = ptr;
            // SAFETY: AVX-512F was checked; the sizes were checked above; task t writes only
            // head t % heads's columns of group t / heads's rows.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                job.head(t / heads, t % heads, p.0)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (p, t, &job);
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, h))))
    }
}

/// Keys per chunk of the `p·v` sums.
const KEY_CHUNK: usize = 128;

/// One call's operands: `x` rows of `3h` (q | k | v), groups of `n` rows, heads of `d`.
struct Job<'a> {
    x: &'a [f32],
    n: usize,
    h: usize,
    d: usize,
    scale: f32,
    mask: Option<&'a [f32]>,
    relative: Option<&'a [f32]>,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Per-thread buffers: the head's keys and values in the tile's weight layout, the packed
    /// query panel, the panel's scores, its output sums.
    static BUFS: std::cell::RefCell<[Vec<f32>; 5]> = const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
}

impl Job<'_> {
    /// Head `hd` of group `g` into `out` (rows of `h`).
    ///
    /// # Safety
    /// AVX-512F present; `x` holds the group's rows; no other thread writes this head's
    /// columns of this group's rows of `out`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn head(&self, g: usize, hd: usize, out: *mut f32) {
        let (n, d, w) = (self.n, self.d, 3 * self.h);
        let rows = &self.x[g * n * w..(g + 1) * n * w];
        let (qo, ko, vo) = (hd * d, self.h + hd * d, 2 * self.h + hd * d);
        BUFS.with_borrow_mut(|[kp, vp, qp, st, oacc]| {
            pack_keys(rows, w, ko, n, d, kp);
            pack_values(rows, w, vo, n, d, vp);
            oacc.resize(d * XR, 0.0);
            qp.resize(d * XR, 0.0);
            st.resize(n * XR, 0.0);
            for q0 in (0..n).step_by(XR) {
                let valid = (n - q0).min(XR);
                f32gemm::pack_panel(&rows[q0 * w..], w, qo, valid, d, qp);
                let (s, scale) = (st.as_mut_ptr(), _mm512_set1_ps(self.scale));
                let mask = self.mask.map(|m| &m[g * n..(g + 1) * n]);
                // Key j's terms for queries q0.. start at offset q0 − j: value q0 − j + n − 1.
                let rel = self.relative.map(|r| r.as_ptr().add(hd * relative_len(n) + q0 + n - 1));
                // Scaled after the product (q·kᵀ·scale: SigLIP's order; the Conformer scales q
                // by 1/8, a power of two, so the order does not change a bit), then the terms.
                f32gemm::tiles(qp.as_ptr(), kp.as_ptr(), d, 0, d, n, |j, a0, a1| {
                    let (mut a0, mut a1) = (_mm512_mul_ps(a0, scale), _mm512_mul_ps(a1, scale));
                    if let Some(r) = rel {
                        a0 = _mm512_add_ps(a0, _mm512_loadu_ps(r.sub(j)));
                        a1 = _mm512_add_ps(a1, _mm512_loadu_ps(r.sub(j).add(16)));
                    }
                    if let Some(m) = mask {
                        let m = _mm512_set1_ps(m[j]);
                        (a0, a1) = (_mm512_add_ps(a0, m), _mm512_add_ps(a1, m));
                    }
                    _mm512_storeu_ps(s.add(j * XR), a0);
                    _mm512_storeu_ps(s.add(j * XR + 16), a1);
                });
                softmax_columns(st, n);
                // p·v over chunks of keys, summed chunk by chunk (shorter f32 sums).
                f32gemm::sums(st.as_ptr(), vp.as_ptr(), n, n, d, KEY_CHUNK, oacc.as_mut_ptr());
                let o = super::Out { ptr: out.add((g * n + q0) * self.h + qo), stride: self.h };
                f32gemm::store_sums(oacc, d, valid, true, None, o);
            }
        });
    }
}

/// Keys `j < n` (`d` values at `rows[j·stride + off..]`) as `n` weight rows of `d` in the tile's
/// layout, tile by tile (as `weight_index` places them, no per-value index arithmetic: a tile
/// of m keys holds column c's m values side by side).
fn pack_keys(rows: &[f32], stride: usize, off: usize, n: usize, d: usize, kp: &mut Vec<f32>) {
    kp.resize(n * d, 0.0);
    for j0 in (0..n).step_by(f32gemm::WR) {
        let m = (n - j0).min(f32gemm::WR);
        let at = f32gemm::weight_index(j0, 0, n, d);
        let tile = &mut kp[at..at + m * d];
        for (jj, r) in rows[j0 * stride..(j0 + m) * stride].chunks(stride).enumerate() {
            for (c, &v) in r[off..off + d].iter().enumerate() {
                tile[c * m + jj] = v;
            }
        }
    }
}

/// The same rows' values as `d` weight rows of `n` (the `p·v` product's weights).
fn pack_values(rows: &[f32], stride: usize, off: usize, n: usize, d: usize, vp: &mut Vec<f32>) {
    vp.resize(d * n, 0.0);
    for c0 in (0..d).step_by(f32gemm::WR) {
        let m = (d - c0).min(f32gemm::WR);
        let at = f32gemm::weight_index(c0, 0, d, n);
        for (dst, r) in vp[at..at + m * n].chunks_exact_mut(m).zip(rows.chunks(stride)) {
            dst.copy_from_slice(&r[off + c0..off + c0 + m]);
        }
    }
}

/// Causal grouped-query attention for a decoder prefill chunk: queries `q` `[heads, n, d]` at
/// positions `start..start+n`, `keys` and `values` `[kv_heads, start+n, d]` (the cache through
/// the chunk) → `[n, heads·d]` f32, `softmax(q·kᵀ·scale + causal mask)·v` with query head `h`
/// reading KV head `h / (heads / kv_heads)`. Every input is taken as f32. Per query head, 32
/// queries at a time as in [`self_attention`]; each panel multiplies only the keys its last
/// query sees (rounded up to the 12-key tile, the rest masked), so a chunk does half the
/// products of the full score matrix, which is never formed (the portable path's
/// `[heads, n, start+n]` scores bounded the prefill chunk). Only call when [`available`].
pub fn causal(q: &Tensor, keys: &Tensor, values: &Tensor, start: usize, scale: f32) -> Result<Tensor> {
    let f32c = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(candle_core::DType::F32)?.contiguous()?) };
    let op = Causal { start, scale };
    Ok(f32c(q)?.apply_op3_no_bwd(&f32c(keys)?, &f32c(values)?, &op)?)
}

struct Causal {
    start: usize,
    scale: f32,
}

impl candle_core::CustomOp3 for Causal {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (heads, n, d) = l1.shape().dims3()?;
        let (kv, total, dk) = l2.shape().dims3()?;
        if l3.shape().dims() != l2.shape().dims() || dk != d || kv == 0 || heads % kv != 0 || total != self.start + n {
            candle_core::bail!(
                "causal attention: queries {:?}, keys {:?}, values {:?} at position {} do not match",
                l1.shape().dims(),
                l2.shape().dims(),
                l3.shape().dims(),
                self.start
            );
        }
        let (q, k, v) = (f32_slice(s1, l1, heads * n * d)?, f32_slice(s2, l2, kv * total * d)?, f32_slice(s3, l3, kv * total * d)?);
        if !available() {
            candle_core::bail!("causal attention: needs AVX-512F");
        }
        let mut out = vec![0f32; n * heads * d];
        let ptr = super::SharedOut(out.as_mut_ptr());
        let job = CausalJob { q, k, v, n, total, d, heads, group: heads / kv, start: self.start, scale: self.scale };
        (0..heads).into_par_iter().for_each(|hd| {
            let p = ptr;
            // SAFETY: AVX-512F was checked; the sizes were checked above; task hd writes only
            // head hd's columns of `out`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                job.head(hd, p.0)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (p, hd, &job);
        });
        Ok((CpuStorage::F32(out), Shape::from((n, heads * d))))
    }
}

/// `len` f32 values of a contiguous input.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, len: usize) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..l.start_offset() + len]),
        _ => candle_core::bail!("causal attention: f32 only"),
    }
}

/// One [`causal`] call's operands.
struct CausalJob<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    n: usize,
    total: usize,
    d: usize,
    heads: usize,
    group: usize,
    start: usize,
    scale: f32,
}

impl CausalJob<'_> {
    /// Query head `hd` into `out` (rows of `heads·d`).
    ///
    /// # Safety
    /// AVX-512F present; the slices hold the shapes of [`Causal::cpu_fwd`]'s checks; no other
    /// thread writes this head's columns of `out`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn head(&self, hd: usize, out: *mut f32) {
        let (n, total, d) = (self.n, self.total, self.d);
        let g = hd / self.group;
        let kv_rows = g * total * d..(g + 1) * total * d;
        let queries = &self.q[hd * n * d..(hd + 1) * n * d];
        BUFS.with_borrow_mut(|[kp, vp, qp, st, oacc]| {
            pack_keys(&self.k[kv_rows.clone()], d, 0, total, d, kp);
            pack_values(&self.v[kv_rows], d, 0, total, d, vp);
            oacc.resize(d * XR, 0.0);
            qp.resize(d * XR, 0.0);
            st.resize(total * XR, 0.0);
            let (s, scale, masked) = (st.as_mut_ptr(), _mm512_set1_ps(self.scale), _mm512_set1_ps(f32::NEG_INFINITY));
            for q0 in (0..n).step_by(XR) {
                let valid = (n - q0).min(XR);
                f32gemm::pack_panel(&queries[q0 * d..], d, 0, valid, d, qp);
                // Query i of the panel (position start+q0+i) sees keys 0..=start+q0+i; the
                // panel reads the keys its last query sees, rounded up to whole key tiles (the
                // packed layout's tiles; keys past a query are masked below).
                let first = self.start + q0;
                let seen = ((first + valid).div_ceil(f32gemm::WR) * f32gemm::WR).min(total);
                f32gemm::tiles(qp.as_ptr(), kp.as_ptr(), d, 0, d, seen, |j, a0, a1| {
                    // Lanes i < j − first are queries before key j.
                    let hidden = j.saturating_sub(first);
                    let m0 = ((1u64 << hidden.min(16)) - 1) as __mmask16;
                    let m1 = ((1u64 << hidden.saturating_sub(16).min(16)) - 1) as __mmask16;
                    let a0 = _mm512_mask_mov_ps(_mm512_mul_ps(a0, scale), m0, masked);
                    let a1 = _mm512_mask_mov_ps(_mm512_mul_ps(a1, scale), m1, masked);
                    _mm512_storeu_ps(s.add(j * XR), a0);
                    _mm512_storeu_ps(s.add(j * XR + 16), a1);
                });
                softmax_columns(st, seen);
                f32gemm::sums(st.as_ptr(), vp.as_ptr(), total, seen, d, KEY_CHUNK, oacc.as_mut_ptr());
                let w = self.heads * d;
                let o = super::Out { ptr: out.add(q0 * w + hd * d), stride: w };
                f32gemm::store_sums(oacc, d, valid, true, None, o);
            }
        });
    }
}

/// `st` `[n, XR]` scores (one row per key) → the softmax of each column,
/// `e^(s − max) / Σ`, normalised before `p·v` as the reference does; a column whose scores are
/// all −∞ (every key masked) becomes zeros.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_columns(st: &mut [f32], n: usize) {
    let s = st.as_mut_ptr();
    let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); 2];
    for j in 0..n {
        for (half, m) in mx.iter_mut().enumerate() {
            *m = _mm512_max_ps(*m, _mm512_loadu_ps(s.add(j * XR + 16 * half)));
        }
    }
    // All keys masked: subtract 0 instead (e^−∞ = 0, no NaN from −∞ − −∞).
    for m in &mut mx {
        let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(*m, _mm512_set1_ps(f32::NEG_INFINITY));
        *m = _mm512_mask_blend_ps(none, *m, _mm512_setzero_ps());
    }
    // Four partial sums per column (keys j mod 4), added at the end: shorter f32 sums.
    let mut sum = [[_mm512_setzero_ps(); 2]; 4];
    for j in 0..n {
        for half in 0..2 {
            let p = s.add(j * XR + 16 * half);
            let e = super::elementwise::exp16(_mm512_sub_ps(_mm512_loadu_ps(p), mx[half]));
            _mm512_storeu_ps(p, e);
            sum[j % 4][half] = _mm512_add_ps(sum[j % 4][half], e);
        }
    }
    let sum = [0, 1].map(|h| _mm512_add_ps(_mm512_add_ps(sum[0][h], sum[1][h]), _mm512_add_ps(sum[2][h], sum[3][h])));
    // A zero sum (all keys masked) gives zero probabilities, not 0·∞.
    let inv = sum.map(|v| _mm512_maskz_div_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, _mm512_setzero_ps()), _mm512_set1_ps(1.0), v));
    for j in 0..n {
        for (half, inv) in inv.iter().enumerate() {
            let p = s.add(j * XR + 16 * half);
            _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), *inv));
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_f64_attention_with_masks_and_relative_terms() -> crate::error::Result<()> {
        if !available() {
            eprintln!("skipped: no AVX-512F on this CPU");
            return Ok(());
        }
        // Group sizes around the 32-query panel and the 12-key tile; head widths 8 and 72;
        // mask: 0 none, 1 the last 3 keys of each group, 2 also every key of the last group.
        for (groups, n, heads, d, masked, rel) in
            [(2, 45, 3, 8, 0, false), (1, 33, 2, 72, 1, false), (3, 7, 1, 16, 1, true), (1, 64, 2, 24, 0, true), (2, 40, 2, 16, 2, true)]
        {
            let (h, w) = (heads * d, 3 * heads * d);
            let x = crate::model::quant::test_values(groups * n * w, (n * d) as u64);
            let keys: Option<Arc<[f32]>> = (masked > 0).then(|| {
                (0..groups * n)
                    .map(|i| if i % n >= n - 3 || (masked == 2 && i / n == groups - 1) { f32::NEG_INFINITY } else { 0.0 })
                    .collect()
            });
            let term = |hd: usize, off: isize| (hd as f32 + 1.0) * 0.3 * (off as f32 * 0.37).sin();
            let terms = ScoreTerms { keys: keys.clone(), relative: rel.then(|| relative(n, heads, term)) };
            let scale = 1.0 / (d as f32).sqrt();
            let qkv = Tensor::from_vec(x.clone(), (groups * n, w), &Device::Cpu)?;
            let got: Vec<f32> = self_attention(&qkv, groups, heads, scale, &terms)?.flatten_all()?.to_vec1()?;
            for g in 0..groups {
                for hd in 0..heads {
                    let at = |r: usize, off: usize, c: usize| x[(g * n + r) * w + off + hd * d + c] as f64;
                    for i in 0..n {
                        let mut s: Vec<f64> = (0..n)
                            .map(|j| {
                                let dot: f64 = (0..d).map(|c| at(i, 0, c) * at(j, h, c)).sum();
                                let r = if rel { term(hd, i as isize - j as isize) as f64 } else { 0.0 };
                                dot * scale as f64 + r + keys.as_ref().map_or(0.0, |m| m[g * n + j] as f64)
                            })
                            .collect();
                        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        // Every key masked: zero probabilities (the Conformer reference).
                        s.iter_mut().for_each(|v| *v = if mx == f64::NEG_INFINITY { 0.0 } else { (*v - mx).exp() });
                        let sum: f64 = s.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                        for c in 0..d {
                            let want: f64 = (0..n).map(|j| s[j] / sum * at(j, 2 * h, c)).sum();
                            let y = got[(g * n + i) * h + hd * d + c] as f64;
                            assert!((y - want).abs() <= 1e-5 * (1.0 + want.abs()), "n{n} g{g} h{hd} ({i},{c}): {y} vs {want}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn causal_matches_f64_grouped_attention() -> crate::error::Result<()> {
        if !available() {
            eprintln!("skipped: no AVX-512F on this CPU");
            return Ok(());
        }
        // Chunks shorter and longer than a panel, at the start and after cached positions,
        // groups of 1–3 query heads per KV head, key counts off the 12-key tile.
        for (heads, kv, n, start, d) in [(4, 2, 45, 0, 16), (6, 2, 33, 20, 72), (3, 3, 1, 7, 8), (2, 1, 70, 5, 128), (3, 1, 32, 0, 24)] {
            let total = start + n;
            let q = crate::model::quant::test_values(heads * n * d, 1 + n as u64);
            let k = crate::model::quant::test_values(kv * total * d, 2 + total as u64);
            let v = crate::model::quant::test_values(kv * total * d, 3 + d as u64);
            let scale = 1.0 / (d as f32).sqrt();
            let t = |x: &[f32], a, b| Tensor::from_vec(x.to_vec(), (a, b, d), &Device::Cpu);
            let got: Vec<f32> = causal(&t(&q, heads, n)?, &t(&k, kv, total)?, &t(&v, kv, total)?, start, scale)?.flatten_all()?.to_vec1()?;
            for hd in 0..heads {
                let g = hd / (heads / kv);
                for i in 0..n {
                    let seen = start + i + 1;
                    let s: Vec<f64> = (0..seen)
                        .map(|j| (0..d).map(|c| q[(hd * n + i) * d + c] as f64 * k[(g * total + j) * d + c] as f64).sum::<f64>() * scale as f64)
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..seen).map(|j| e[j] / sum * v[(g * total + j) * d + c] as f64).sum();
                        let y = got[i * heads * d + hd * d + c] as f64;
                        assert!((y - want).abs() <= 1e-5 * (1.0 + want.abs()), "h{heads}/{kv} n{n} start{start} ({hd},{i},{c}): {y} vs {want}");
                    }
                }
            }
        }
        Ok(())
    }
}
