//! CPU kernels the backend lacks. candle 0.11 has no bf16 GEMM on the CPU (it widens both
//! operands to f32 on every call: 0.10 tok/s on the full decoder) and no quantised formats.
//! Every decoder projection goes through [`Matrix::forward`], whose weight is either a dense
//! tensor or a block-quantised [`QMatrix`]:
//!
//! * few rows (decode, ≤ 4): one dot product per weight row, rows split evenly over the
//!   threads — bf16 rows with `vdpbf16ps` (bf16 activations) or widened in registers (f32),
//!   quantised rows against int8-quantised activations with `vpdpbusd` ([`qdot`]); the
//!   decode step calls [`Matrix::matvec`] directly, inside a spinning [`team`];
//! * many rows (prefill, encoders): quantised weights whose rows are whole runs of 512 go
//!   through the int8 `vpdpbusd` GEMM against int8-quantised activations ([`qgemm`]) with
//!   AVX-512 VNNI; otherwise blocks of weight rows are kept in L2 (dequantised to bf16 first
//!   for quantised weights) and multiplied by a 4×4 `vdpbf16ps` register tile over panels of
//!   activation rows; without AVX-512 BF16, or for f32 activations (the encoders), the block is
//!   widened to f32 and multiplied with an f32 GEMM ([`f32gemm`]; blocking and thread split of every prefill path in `prefill.rs`);
//! * the encoders' self-attention: [`attention`].
//!
//! Accumulation is in f32, as PyTorch's CPU bf16 matmul does; a bf16 input gives a bf16
//! output. Other dtypes and devices use the backend's own matmul. Threads come from rayon's
//! one persistent pool (borrowed as a spinning team during a decode step).

pub(crate) mod attend;
pub mod attention;
pub mod batch;
mod bf16dot;
pub mod cpu;
pub mod elementwise;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod f32gemm;
mod frozen;
pub use frozen::frozen_linear;
pub mod qdot;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod prefill;
mod qgemm;
pub mod team;

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::quant::{Act, Bf16Act, QActs, QMatrix};
#[cfg(target_arch = "x86_64")]
use prefill::{quant_gemm, tiled_gemm};
use prefill::blocked_gemm;
use qdot::XRow;

/// A weight `[out, in]`: dense (any dtype, any device) or block-quantised (CPU).
#[derive(Debug, Clone)]
pub enum Matrix {
    Dense(Tensor),
    Quant(Arc<QMatrix>),
}

impl Matrix {
    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Matrix::Dense(t) => Ok(t.dims2()?),
            Matrix::Quant(q) => Ok((q.rows(), q.cols())),
        }
    }

    /// `x` `[.., in]` times the weight transposed → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Matrix::Dense(w) => linear(x, w),
            Matrix::Quant(q) => {
                if !x.device().is_cpu() || !matches!(x.dtype(), DType::BF16 | DType::F32) {
                    return Err(Error::Request(format!(
                        "{} weights need f32 or bf16 activations on the CPU",
                        q.qtype().name()
                    )));
                }
                Ok(x.contiguous()?.apply_op1_no_bwd(&QuantLinear(q.clone()))?)
            }
        }
    }

    /// `bf16`, `f32`, `q8_0`, ….
    pub fn format(&self) -> String {
        match self {
            Matrix::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Matrix::Quant(q) => q.qtype().name().to_string(),
        }
    }

    /// Bytes the weight occupies.
    pub fn nbytes(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Matrix::Quant(q) => q.nbytes(),
        }
    }
}

/// Working space for [`Matrix::matvec`], reused from token to token.
#[derive(Debug, Default)]
pub struct VecScratch {
    xb: Vec<bf16>,
    /// One per activation row.
    acts: Vec<QActs>,
}

impl Matrix {
    /// Whether [`Matrix::matvec`] runs this weight (CPU: dense f32 or bf16, or quantised).
    pub fn has_matvec(&self) -> bool {
        match self {
            Matrix::Quant(_) => true,
            Matrix::Dense(t) => t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::BF16) && t.is_contiguous(),
        }
    }

    /// The decode product without tensors: one activation row `x` `[in]` → `y` `[out]`, weight
    /// rows split over the threads. `x` holds values of the weight's activation dtype (bf16
    /// weights take bf16-exact activations); quantised weights quantise `x` per block as
    /// [`Matrix::forward`] does, so both give the same sums.
    pub fn matvec(&self, x: &[f32], y: &mut [f32], s: &mut VecScratch) -> Result<()> {
        let (out, k) = self.dims()?;
        if x.len() != k || y.len() != out {
            return Err(Error::Request(format!(
                "mat-vec: input {} and output {} for a [{out}, {k}] weight",
                x.len(),
                y.len()
            )));
        }
        // `[out, 1]` is `[1, out]`: the batched product's layout needs no transpose.
        self.products(x, 1, y, s)
    }
}

/// How far ahead of the weights it is multiplying a decode kernel asks for them (bytes).
/// A mat-vec streams each weight once; the hardware prefetchers alone kept two cores at
/// 17–19 GB/s of the ~26 GB/s a plain read loop gets on the Intel machine, and prefetching
/// 4 KiB ahead raised decode 20–30% in every format (see the README). The bf16 `vdpbf16ps`
/// dot (AVX-512 BF16) keeps none: prefetching made it slower on the AMD machine it ran on.
pub(crate) const PREFETCH_AHEAD: usize = 4096;

/// Asks for the cache line holding `p` (a hint: any address will do, none faults).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and has no effect other than on the caches.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Weight rows per task of a mat-vec with `out` rows: about eight tasks per thread.
fn rows_per_task(out: usize) -> usize {
    out.div_ceil(rayon::current_num_threads().max(1) * 8).max(16)
}

/// `x · w` in f32 with independent lanes (vectorised by the compiler).
fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (xc, wc) in x.chunks_exact(16).zip(w.chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += xc[i] * wc[i];
        }
    }
    let tail = x.len() / 16 * 16;
    acc.iter().sum::<f32>() + x[tail..].iter().zip(&w[tail..]).map(|(a, b)| a * b).sum::<f32>()
}

/// `x` `[.., in]` times `w` `[out, in]` transposed → `[.., out]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !fast_linear(x, w) {
        return Ok(x.broadcast_matmul(&w.t()?)?);
    }
    Ok(x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Bf16Linear { bias: None })?)
}

/// `x · wᵀ + b` (`b` `[out]`); on the CPU kernels the bias is added as the results are stored.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fast_linear(x, w) {
        return Ok(x.broadcast_matmul(&w.t()?)?.broadcast_add(b)?);
    }
    let bias = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Bf16Linear { bias: Some(bias) })?)
}

/// Whether prefill with bf16 activations has the AVX-512 BF16 `vdpbf16ps` tile on this CPU.
pub fn bf16_tile_available() -> bool {
    bf16dot::available()
}

/// Whether [`linear`] runs on this module's CPU kernels (bf16 weight, f32 or bf16 input).
fn fast_linear(x: &Tensor, w: &Tensor) -> bool {
    w.dtype() == DType::BF16 && x.device().is_cpu() && matches!(x.dtype(), DType::BF16 | DType::F32)
}

/// Rows of `x` up to which the dot-product path is used.
const DOT_ROWS: usize = 4;
/// The activations as stored.
enum Input<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Input<'_> {
    fn f32(&self) -> Cow<'_, [f32]> {
        match self {
            Input::F32(v) => Cow::Borrowed(v),
            Input::Bf16(v) => Cow::Owned(elementwise::map_chunks(v, |b| b.to_f32())),
        }
    }
}

/// f32 → bf16 rounded to nearest even, as `bf16::from_f32` (vectorisable).
#[inline(always)]
fn round_bf16(v: f32) -> bf16 {
    if v.is_nan() {
        return bf16::from_f32(v);
    }
    bf16::from_bits((Bf16Act::round(v).to_bits() >> 16) as u16)
}

/// The weight as stored.
#[derive(Clone, Copy)]
enum Source<'a> {
    Bf16(&'a [bf16]),
    Quant(&'a QMatrix),
}

struct Bf16Linear {
    bias: Option<Vec<f32>>,
}

impl CustomOp2 for Bf16Linear {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out_dim, in_dim) = l2.shape().dims2()?;
        let w: &[bf16] = match s2 {
            CpuStorage::BF16(v) => &v[l2.start_offset()..l2.start_offset() + out_dim * in_dim],
            _ => candle_core::bail!("bf16-linear: weight must be bf16"),
        };
        if self.bias.as_ref().is_some_and(|b| b.len() != out_dim) {
            candle_core::bail!("bf16-linear: bias does not have {out_dim} values");
        }
        run_op(s1, l1, Source::Bf16(w), out_dim, in_dim, self.bias.as_deref())
    }
}

struct QuantLinear(Arc<QMatrix>);

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "quant-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        run_op(s, l, Source::Quant(&self.0), self.0.rows(), self.0.cols(), None)
    }
}

/// Shared body of both ops: checks the input, runs the product, restores the input's dtype.
fn run_op(
    s: &CpuStorage,
    l: &Layout,
    w: Source<'_>,
    out_dim: usize,
    in_dim: usize,
    bias: Option<&[f32]>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let dims = l.shape().dims();
    let k = dims.last().copied().unwrap_or(0);
    if k != in_dim {
        candle_core::bail!("linear: input width {k} but weight is [{out_dim}, {in_dim}]");
    }
    let n = l.shape().elem_count() / k.max(1);
    let off = l.start_offset();
    let x = match s {
        CpuStorage::F32(v) => Input::F32(&v[off..off + n * k]),
        CpuStorage::BF16(v) => Input::Bf16(&v[off..off + n * k]),
        _ => candle_core::bail!("linear: input must be f32 or bf16"),
    };
    let y = product(&x, n, k, w, out_dim, bias);
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_dim;
    }
    let storage = match x {
        Input::Bf16(_) => CpuStorage::BF16(elementwise::map_chunks(&y, round_bf16)),
        Input::F32(_) => CpuStorage::F32(y),
    };
    Ok((storage, Shape::from(out_dims)))
}

/// `y` `[n, out]` = `x` `[n, k]` · `w` `[out, k]`ᵀ, picking the path (see the module docs).
fn product(x: &Input<'_>, n: usize, k: usize, w: Source<'_>, out: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let tiled = bf16dot::available();
    let mut y = if n <= DOT_ROWS {
        match (w, x) {
            (Source::Quant(q), _) => {
                let mut acts = QActs::default();
                acts.quantize(&x.f32(), k, q.qtype());
                let kernel = qdot::select(q.qtype());
                matvec(n, out, |r, i| {
                    let (wq, wd) = q.row(r);
                    // SAFETY: `select` returns only kernels this CPU supports.
                    unsafe { kernel(wq, wd, XRow::of(&acts, i, k)) }
                })
            }
            #[cfg(target_arch = "x86_64")]
            (Source::Bf16(w), Input::Bf16(xb)) if tiled => matvec(n, out, |r, i| {
                // SAFETY: AVX-512 BF16 was detected; both slices hold k values.
                unsafe { bf16dot::dot(&xb[i * k..(i + 1) * k], &w[r * k..(r + 1) * k]) }
            }),
            (Source::Bf16(w), _) => {
                let xf = x.f32();
                matvec(n, out, |r, i| dot(&xf[i * k..(i + 1) * k], &w[r * k..(r + 1) * k]))
            }
        }
    } else {
        match (x, w) {
            #[cfg(target_arch = "x86_64")]
            (_, Source::Quant(q)) if qgemm::takes(q) => quant_gemm(&x.f32(), n, q),
            #[cfg(target_arch = "x86_64")]
            (Input::Bf16(xb), _) if tiled => tiled_gemm(xb, n, k, w, out),
            _ => return blocked_gemm(&x.f32(), n, k, w, out, bias),
        }
    };
    add_bias(&mut y, out, bias);
    y
}

/// `y[i, j] += bias[j]` over rows of `out` (for the paths that do not add it as they store).
fn add_bias(y: &mut [f32], out: usize, bias: Option<&[f32]>) {
    if let Some(b) = bias {
        y.par_chunks_mut(out.max(1)).for_each(|r| r.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
}

/// Decode path: `y[i, r] = f(r, i)` with weight rows split evenly over the threads.
fn matvec(n: usize, out: usize, f: impl Fn(usize, usize) -> f32 + Sync) -> Vec<f32> {
    let rows_per_task = rows_per_task(out);
    // Work in [out, n] (each task owns whole weight rows), then transpose.
    let mut yt = vec![0f32; out * n];
    yt.par_chunks_mut(rows_per_task * n)
        .enumerate()
        .for_each(|(t, chunk)| {
            let first = t * rows_per_task;
            for (r, ys) in chunk.chunks_mut(n).enumerate() {
                for (i, y) in ys.iter_mut().enumerate() {
                    *y = f(first + r, i);
                }
            }
        });
    if n == 1 {
        return yt;
    }
    let mut y = vec![0f32; n * out];
    for j in 0..out {
        for i in 0..n {
            y[i * out + j] = yt[j * n + i];
        }
    }
    y
}

/// Where a GEMM kernel's results go: `y[i·stride + j]` for activation row `i` and weight row
/// `j` (shared by the bf16, f32 and int8 tiles).
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub ptr: *mut f32,
    pub stride: usize,
}

/// A pointer that tasks write disjoint parts through.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes a disjoint set of columns (its weight rows) of the output.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// `x · w` with `w` in bf16, picking the widest SIMD the CPU has.
fn dot(x: &[f32], w: &[bf16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if cpu::cpu().avx512f {
            // SAFETY: the feature was just detected.
            return unsafe { dot_avx512(x, w) };
        }
        if cpu::cpu().avx2 {
            // SAFETY: the features were just detected.
            return unsafe { dot_avx2(x, w) };
        }
    }
    dot_portable(x, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(x: &[f32], w: &[bf16]) -> f32 {
    dot_lanes::<32, true>(x, w, true)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], w: &[bf16]) -> f32 {
    dot_lanes::<16, true>(x, w, true)
}

fn dot_portable(x: &[f32], w: &[bf16]) -> f32 {
    dot_lanes::<8, false>(x, w, false)
}

/// `L` independent accumulators so the compiler vectorises across lanes; bf16 → f32 is a
/// 16-bit shift. `PREFETCH`: one [`prefetch`] per 64 bytes of weights, [`PREFETCH_AHEAD`] ahead.
#[inline(always)]
fn dot_lanes<const L: usize, const PREFETCH: bool>(x: &[f32], w: &[bf16], fma: bool) -> f32 {
    let mut acc = [0f32; L];
    let chunks = x.len() / L;
    for c in 0..chunks {
        let xs = &x[c * L..(c + 1) * L];
        let ws = &w[c * L..(c + 1) * L];
        if PREFETCH && (c * L) % 32 == 0 {
            prefetch(ws.as_ptr().wrapping_add(PREFETCH_AHEAD / 2));
        }
        for i in 0..L {
            let wv = f32::from_bits((ws[i].to_bits() as u32) << 16);
            acc[i] = if fma { xs[i].mul_add(wv, acc[i]) } else { acc[i] + xs[i] * wv };
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * L..x.len() {
        s += x[i] * w[i].to_f32();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn reference(x: &Tensor, w: &Tensor) -> crate::error::Result<Vec<f32>> {
        let xf = x.to_dtype(DType::F32)?;
        let wf = w.to_dtype(DType::F32)?;
        Ok(xf.matmul(&wf.t()?)?.flatten_all()?.to_vec1()?)
    }

    #[test]
    fn matches_f32_matmul_on_both_paths() -> crate::error::Result<()> {
        let dev = Device::Cpu;
        // The last shape packs to more than 16 MB: the f32 tile's split path, 512-column blocks.
        for (n, k, out) in [(1, 100, 37), (3, 64, 129), (9, 300, 70), (130, 77, 200), (600, 40, 70), (4200, 1100, 30)] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (out, k), &dev)?.to_dtype(DType::BF16)?;
            let got: Vec<f32> = linear(&x, &w)?.flatten_all()?.to_vec1()?;
            let want = reference(&x, &w)?;
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "n={n} k={k} out={out}: {a} vs {b}");
            }
            // bf16 input → bf16 output.
            let xb = x.to_dtype(DType::BF16)?;
            let yb = linear(&xb, &w)?;
            assert_eq!(yb.dtype(), DType::BF16);
            assert_eq!(yb.dims(), &[n, out]);
        }
        Ok(())
    }

    #[test]
    fn bias_is_added_on_every_path() -> crate::error::Result<()> {
        let dev = Device::Cpu;
        // Dot-product rows, the f32 tile (or gemm crate), and more than 16 MB of activations
        // (the f32 tile's split path with its 512-column blocks).
        for (n, k, out) in [(2, 96, 40), (70, 300, 53), (4200, 1100, 30)] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (out, k), &dev)?.to_dtype(DType::BF16)?;
            let b = Tensor::randn(0f32, 1.0, out, &dev)?;
            for x in [x.clone(), x.to_dtype(DType::BF16)?] {
                let got: Vec<f32> = linear_bias(&x, &w, &b)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let pre = linear(&x, &w)?.to_dtype(DType::F32)?;
                let want: Vec<f32> = pre.broadcast_add(&b)?.flatten_all()?.to_vec1()?;
                let pre: Vec<f32> = pre.flatten_all()?.to_vec1()?;
                // bf16 outputs are rounded at the size of the product before the bias (a sum of
                // 1100 terms, ~33, has a bf16 step of 0.25), so the bound scales with it too.
                let tol = if x.dtype() == DType::BF16 { 1e-2 } else { 1e-4 };
                for ((a, e), p) in got.iter().zip(&want).zip(&pre) {
                    assert!((a - e).abs() <= tol * (1.0 + e.abs() + p.abs()), "n={n} k={k} out={out} {:?}: {a} vs {e}", x.dtype());
                }
            }
        }
        Ok(())
    }

    #[test]
    fn quantised_prefill_gives_the_decode_sums() -> crate::error::Result<()> {
        // With AVX-512 VNNI a prefill of whole runs multiplies the same int8 quants as decode:
        // only the f32 order of the per-block sums differs.
        use crate::model::quant::QType;
        let dev = Device::Cpu;
        for qtype in [QType::Q8_0, QType::Q4_0, QType::Q6_0] {
            let (n, k, out) = (11, 1536, 45);
            let w: Vec<f32> = crate::model::quant::test_values(out * k, 9);
            let q = Arc::new(QMatrix::quantize(qtype, &w, out, k)?);
            if !qgemm::takes(&q) {
                return Ok(());
            }
            let m = Matrix::Quant(q);
            let x: Vec<f32> = crate::model::quant::test_values(n * k, 4);
            let batch: Vec<f32> = m.forward(&Tensor::from_vec(x.clone(), (n, k), &dev)?)?.flatten_all()?.to_vec1()?;
            let mut s = VecScratch::default();
            let mut y = vec![0f32; out];
            for i in 0..n {
                m.matvec(&x[i * k..(i + 1) * k], &mut y, &mut s)?;
                for (r, (&a, &b)) in batch[i * out..(i + 1) * out].iter().zip(&y).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{qtype:?} row {i} col {r}: {a} vs {b}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn quantised_matrix_matches_dequantised_product() -> crate::error::Result<()> {
        use crate::model::quant::QType;
        let dev = Device::Cpu;
        for qtype in [QType::Q8_0, QType::Q4_0, QType::Q6_0] {
            for (n, k, out) in [(1, 64, 37), (3, 96, 50), (9, 3072, 20), (70, 160, 130), (37, 1024, 66)] {
                let wf = Tensor::randn(0f32, 1.0, (out, k), &dev)?;
                let q = QMatrix::quantize(qtype, &wf.flatten_all()?.to_vec1()?, out, k)?;
                let mut deq = vec![0f32; out * k];
                for r in 0..out {
                    q.dequantize_row(r, &mut deq[r * k..(r + 1) * k]);
                }
                let wd = Tensor::from_vec(deq, (out, k), &dev)?;
                // Prefill of whole runs takes int8 activations too (with AVX-512 VNNI).
                let int8 = qgemm::takes(&q);
                let m = Matrix::Quant(Arc::new(q));
                let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                for xin in [x.clone(), x.to_dtype(DType::BF16)?] {
                    // What the kernel multiplies: decode and the int8 GEMM quantise the
                    // activations to int8 per block, the other prefill paths take them as
                    // they are (bf16 or f32).
                    let xf: Vec<f32> = xin.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    let xr = if n <= DOT_ROWS || int8 {
                        let mut acts = QActs::default();
                        acts.quantize(&xf, k, qtype);
                        acts.q.iter().enumerate().map(|(i, &q)| q as f32 * acts.d[i / 32]).collect()
                    } else {
                        xf
                    };
                    // The tiled bf16 path dequantises weight blocks to bf16 first.
                    let wr = if n > DOT_ROWS && !int8 && xin.dtype() == DType::BF16 && bf16dot::available() {
                        wd.to_dtype(DType::BF16)?
                    } else {
                        wd.clone()
                    };
                    let want = reference(&Tensor::from_vec(xr, (n, k), &dev)?, &wr)?;
                    let y = m.forward(&xin)?;
                    assert_eq!(y.dtype(), xin.dtype());
                    let got: Vec<f32> = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    let tol = if xin.dtype() == DType::BF16 { 1e-2 } else { 1e-4 };
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{qtype:?} n={n} k={k}: {a} vs {b}");
                    }
                }
            }
        }
        Ok(())
    }
}
