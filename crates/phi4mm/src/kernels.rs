//! CPU kernels the backend lacks. candle 0.11 has no bf16 GEMM on the CPU: it widens both
//! operands to f32 on every call, so each decode step would convert all 7.7 GB of decoder
//! weights (measured: 0.10 tok/s on the full model). [`linear`] multiplies by a bf16 weight
//! directly:
//!
//! * few rows (decode): one dot product per weight row, bf16 widened in registers, rows split
//!   over the thread pool, with AVX-512 / AVX2+FMA versions chosen at run time;
//! * many rows (prefill): weight rows widened block by block into an L2-sized f32 buffer and
//!   multiplied with an f32 GEMM, blocks split over the thread pool.
//!
//! Accumulation is in f32, as PyTorch's CPU bf16 matmul does; a bf16 input gives a bf16
//! output. Other dtypes and devices use the backend's own matmul.

use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::Result;

/// `x` `[.., in]` times `w` `[out, in]` transposed → `[.., out]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() != DType::BF16 || !x.device().is_cpu() || !matches!(x.dtype(), DType::BF16 | DType::F32) {
        return Ok(x.broadcast_matmul(&w.t()?)?);
    }
    Ok(x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Bf16Linear)?)
}

struct Bf16Linear;

/// Rows of `x` up to which the dot-product path is used.
const DOT_ROWS: usize = 4;
/// Weight rows widened at once on the GEMM path (≈ 768 KiB of f32 at in = 3072).
const BLOCK_ROWS: usize = 64;

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
        let dims = l1.shape().dims();
        let k = dims.last().copied().unwrap_or(0);
        if k != in_dim {
            candle_core::bail!("bf16-linear: input width {k} but weight is [{out_dim}, {in_dim}]");
        }
        let n = l1.shape().elem_count() / k.max(1);
        let w: &[bf16] = match s2 {
            CpuStorage::BF16(v) => &v[l2.start_offset()..l2.start_offset() + out_dim * in_dim],
            _ => candle_core::bail!("bf16-linear: weight must be bf16"),
        };
        let off = l1.start_offset();
        let x: Cow<[f32]> = match s1 {
            CpuStorage::F32(v) => Cow::Borrowed(&v[off..off + n * k]),
            CpuStorage::BF16(v) => Cow::Owned(v[off..off + n * k].iter().map(|b| b.to_f32()).collect()),
            _ => candle_core::bail!("bf16-linear: input must be f32 or bf16"),
        };
        let y = if n <= DOT_ROWS {
            matvec(&x, n, k, w, out_dim)
        } else {
            blocked_gemm(&x, n, k, w, out_dim)
        };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = out_dim;
        }
        let storage = match s1 {
            CpuStorage::BF16(_) => CpuStorage::BF16(y.iter().map(|&v| bf16::from_f32(v)).collect()),
            _ => CpuStorage::F32(y),
        };
        Ok((storage, Shape::from(out_dims)))
    }
}

/// Decode path: `y[i, j] = x[i] · w[j]`.
fn matvec(x: &[f32], n: usize, k: usize, w: &[bf16], out: usize) -> Vec<f32> {
    let threads = rayon::current_num_threads().max(1);
    let rows_per_task = out.div_ceil(threads * 8).max(16);
    // Work in [out, n] (each task owns whole weight rows), then transpose.
    let mut yt = vec![0f32; out * n];
    yt.par_chunks_mut(rows_per_task * n)
        .enumerate()
        .for_each(|(t, chunk)| {
            let first = t * rows_per_task;
            for (r, ys) in chunk.chunks_mut(n).enumerate() {
                let row = &w[(first + r) * k..(first + r + 1) * k];
                for (i, y) in ys.iter_mut().enumerate() {
                    *y = dot(&x[i * k..(i + 1) * k], row);
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

/// Prefill path: widen `BLOCK_ROWS` weight rows at a time to f32 and multiply with an f32
/// GEMM, blocks split over the threads. (Measured on the full decoder, 128-token prefill:
/// 20.8 tok/s; widening the whole weight and one threaded GEMM instead: 11.6 tok/s; tiling
/// `x` into 256-row panels made no difference to the SigLIP encoder.)
fn blocked_gemm(x: &[f32], n: usize, k: usize, w: &[bf16], out: usize) -> Vec<f32> {
    let blocks: Vec<(usize, Vec<f32>)> = (0..out.div_ceil(BLOCK_ROWS))
        .into_par_iter()
        .map(|b| {
            let first = b * BLOCK_ROWS;
            let rows = BLOCK_ROWS.min(out - first);
            let wf: Vec<f32> = w[first * k..(first + rows) * k].iter().map(|v| v.to_f32()).collect();
            let mut dst = vec![0f32; n * rows]; // [n, rows]
            // SAFETY: every pointer covers the extent implied by its dims and strides:
            // dst n×rows (row stride rows), x n×k (row stride k), wf rows×k read as k×rows.
            unsafe {
                gemm::gemm(
                    n,
                    rows,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    wf.as_ptr(),
                    k as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            (first, dst)
        })
        .collect();
    let mut y = vec![0f32; n * out];
    for (first, dst) in blocks {
        let rows = dst.len() / n;
        for i in 0..n {
            y[i * out + first..i * out + first + rows].copy_from_slice(&dst[i * rows..(i + 1) * rows]);
        }
    }
    y
}

/// `x · w` with `w` in bf16, picking the widest SIMD the CPU has.
fn dot(x: &[f32], w: &[bf16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            return unsafe { dot_avx512(x, w) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { dot_avx2(x, w) };
        }
    }
    dot_portable(x, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(x: &[f32], w: &[bf16]) -> f32 {
    dot_lanes::<32>(x, w, true)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], w: &[bf16]) -> f32 {
    dot_lanes::<16>(x, w, true)
}

fn dot_portable(x: &[f32], w: &[bf16]) -> f32 {
    dot_lanes::<8>(x, w, false)
}

/// `L` independent accumulators so the compiler vectorises across lanes; bf16 → f32 is a
/// 16-bit shift.
#[inline(always)]
fn dot_lanes<const L: usize>(x: &[f32], w: &[bf16], fma: bool) -> f32 {
    let mut acc = [0f32; L];
    let chunks = x.len() / L;
    for c in 0..chunks {
        let xs = &x[c * L..(c + 1) * L];
        let ws = &w[c * L..(c + 1) * L];
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

    fn reference(x: &Tensor, w: &Tensor) -> Vec<f32> {
        let xf = x.to_dtype(DType::F32).unwrap();
        let wf = w.to_dtype(DType::F32).unwrap();
        xf.matmul(&wf.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn matches_f32_matmul_on_both_paths() {
        let dev = Device::Cpu;
        for (n, k, out) in [(1, 100, 37), (3, 64, 129), (9, 300, 70), (130, 77, 200), (600, 40, 70)] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (out, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let got: Vec<f32> = linear(&x, &w).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let want = reference(&x, &w);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "n={n} k={k} out={out}: {a} vs {b}");
            }
            // bf16 input → bf16 output.
            let xb = x.to_dtype(DType::BF16).unwrap();
            let yb = linear(&xb, &w).unwrap();
            assert_eq!(yb.dtype(), DType::BF16);
            assert_eq!(yb.dims(), &[n, out]);
        }
    }
}
