//! bf16 × bf16 products with AVX-512 BF16's `vdpbf16ps` (two bf16 products added into each f32
//! lane per instruction, twice the f32 FMA rate): a dot product for decode and a register-tiled
//! micro-kernel for prefill. Both operands are K-contiguous (activation rows and weight rows),
//! so no packing is needed; the caller keeps a block of weight rows in L2.
//!
//! Products of two bf16 values are exact in f32, as when both are widened first; the sums are
//! f32 with a different order than a widening GEMM (differences at f32 rounding level).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::bf16;

use super::Out;
use crate::model::quant::{unpack_block, QType, BLOCK, GROUP};

/// Whether this CPU has the instructions [`dot`] and [`gemm`] need.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::cpu::cpu().avx512bf16
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x · w`.
///
/// # Safety
/// Only call when [`available`] is true; `x` and `w` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn dot(x: &[bf16], w: &[bf16]) -> f32 {
    let k = x.len().min(w.len());
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i + 64 <= k {
        // No software prefetch: with the decode step's spinning team, prefetching 4 KiB ahead
        // made bf16 decode slower (4.0–4.1 against 5.3–5.7 tok/s without, alternating runs of
        // `phi4mm bench --gen-tokens 32` on the full decoder); it had helped (3.9 → 4.7) when
        // each mat-vec went through rayon separately.
        for (h, a) in acc.iter_mut().enumerate() {
            let xv = load(x.as_ptr().add(i + 32 * h));
            let wv = load(w.as_ptr().add(i + 32 * h));
            *a = _mm512_dpbf16_ps(*a, xv, wv);
        }
        i += 64;
    }
    while i < k {
        let n = (k - i).min(32);
        let xv = load_masked(x.as_ptr().add(i), n);
        let wv = load_masked(w.as_ptr().add(i), n);
        acc[0] = _mm512_dpbf16_ps(acc[0], xv, wv);
        i += n;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load(p: *const bf16) -> __m512bh {
    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast()))
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load_masked(p: *const bf16, n: usize) -> __m512bh {
    let mask: __mmask32 = if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
    std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, p.cast()))
}

/// Row `q`/`d` of a quantised matrix as bf16 (`d·q` rounded to nearest even, as
/// `bf16::from_f32`) in storage order: runs of 16 blocks come out in [`QType::run_order`]
/// (the caller permutes the activations the same way), the blocks after them in order.
///
/// # Safety
/// Only call when [`available`] is true; `out` holds `d.len()·32` values and `q` the row's
/// quants.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn dequantize(qtype: QType, q: &[u8], d: &[half::f16], out: &mut [bf16]) {
    let nb = d.len();
    let runs = nb / GROUP;
    let bb = qtype.block_bytes();
    // 64 signed bytes (lane j of 16 = 4 values of block j of the run) × their blocks' scales.
    let chunk = |bytes: __m512i, scales: __m512, dst: *mut bf16| {
        for c in 0..4 {
            let part = match c {
                0 => _mm512_extracti32x4_epi32::<0>(bytes),
                1 => _mm512_extracti32x4_epi32::<1>(bytes),
                2 => _mm512_extracti32x4_epi32::<2>(bytes),
                _ => _mm512_extracti32x4_epi32::<3>(bytes),
            };
            // Values 16c..16c+16 belong to blocks 4c..4c+4, four each.
            let idx = _mm512_add_epi32(
                _mm512_set1_epi32(4 * c as i32),
                _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
            );
            let f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(part)), _mm512_permutexvar_ps(idx, scales));
            let bh: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(f));
            _mm256_storeu_si256(dst.add(16 * c).cast(), bh);
        }
    };
    for g in 0..runs {
        let scales = _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr().add(g * GROUP).cast()));
        let src = q.as_ptr().add(g * GROUP * bb);
        let dst = out.as_mut_ptr().add(g * GROUP * BLOCK);
        match qtype {
            QType::Q8_0 => {
                for t in 0..8 {
                    chunk(_mm512_loadu_si512(src.add(64 * t).cast()), scales, dst.add(64 * t));
                }
            }
            QType::Q4_0 | QType::Q6_0 => {
                let bias = _mm512_set1_epi8(if qtype == QType::Q4_0 { 8 } else { 32 });
                for t in 0..4 {
                    let (lo, hi) = super::qdot::x86::nibble_values(qtype, src, t);
                    chunk(_mm512_sub_epi8(lo, bias), scales, dst.add(128 * t));
                    chunk(_mm512_sub_epi8(hi, bias), scales, dst.add(128 * t + 64));
                }
            }
        }
    }
    let mut vals = [0i8; BLOCK];
    for b in runs * GROUP..nb {
        unpack_block(qtype, q, b, nb, &mut vals);
        let s = _mm512_set1_ps(d[b].to_f32());
        for h in 0..2 {
            let part = _mm_loadu_si128(vals.as_ptr().add(16 * h).cast());
            let f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(part)), s);
            let bh: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(f));
            _mm256_storeu_si256(out.as_mut_ptr().add(b * BLOCK + 16 * h).cast(), bh);
        }
    }
}

/// Weight rows per register tile: 4×4 accumulators stay in registers (a 4×6 tile made LLVM
/// spill seven of them and measured 119 against 175 G multiply-adds/s for 4×4 on
/// `cargo bench --bench kernels -- prefill/bf16`).
pub const NR: usize = 4;


/// x `[n, k]` · w `[rows, k]`ᵀ into `out` (tiles of 4 activation rows × [`NR`] weight rows).
///
/// # Safety
/// Only call when [`available`] is true; `x` holds `n·k` values, `w` `rows·k`, and `out`
/// covers `n` rows of `rows` columns that no other thread writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn gemm(x: &[bf16], n: usize, k: usize, w: &[bf16], rows: usize, out: Out) {
    let mut i = 0;
    while i < n {
        let mr = (n - i).min(4);
        let xp = x.as_ptr().add(i * k);
        let o = Out { ptr: out.ptr.add(i * out.stride), stride: out.stride };
        let mut j = 0;
        while j < rows {
            let wp = w.as_ptr().add(j * k);
            let oj = Out { ptr: o.ptr.add(j), stride: o.stride };
            let step = if rows - j >= NR { NR } else { 1 };
            match (mr, step) {
                (4, NR) => tile::<4, NR>(xp, wp, k, oj),
                (3, NR) => tile::<3, NR>(xp, wp, k, oj),
                (2, NR) => tile::<2, NR>(xp, wp, k, oj),
                (1, NR) => tile::<1, NR>(xp, wp, k, oj),
                (4, _) => tile::<4, 1>(xp, wp, k, oj),
                (3, _) => tile::<3, 1>(xp, wp, k, oj),
                (2, _) => tile::<2, 1>(xp, wp, k, oj),
                _ => tile::<1, 1>(xp, wp, k, oj),
            }
            j += step;
        }
        i += mr;
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile<const MR: usize, const NR: usize>(x: *const bf16, w: *const bf16, k: usize, out: Out) {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let mut xv = [load_masked(x, 0); MR];
    let mut p = 0;
    while p + 32 <= k {
        for (i, v) in xv.iter_mut().enumerate() {
            *v = load(x.add(i * k + p));
        }
        for j in 0..NR {
            let wv = load(w.add(j * k + p));
            for i in 0..MR {
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
            }
        }
        p += 32;
    }
    if p < k {
        let n = k - p;
        for (i, v) in xv.iter_mut().enumerate() {
            *v = load_masked(x.add(i * k + p), n);
        }
        for j in 0..NR {
            let wv = load_masked(w.add(j * k + p), n);
            for i in 0..MR {
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            *out.ptr.add(i * out.stride + j) = _mm512_reduce_add_ps(*a);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u64) -> Vec<bf16> {
        crate::model::quant::test_values(n, seed).into_iter().map(bf16::from_f32).collect()
    }

    fn exact(x: &[bf16], w: &[bf16]) -> f64 {
        x.iter().zip(w).map(|(a, b)| a.to_f64() * b.to_f64()).sum()
    }

    #[test]
    fn dequantise_matches_scalar_in_storage_order() -> crate::error::Result<()> {
        if !available() {
            return Ok(());
        }
        for qtype in [QType::Q8_0, QType::Q4_0, QType::Q6_0] {
            for k in [32, 64, 96, 512, 544, 608, 3072] {
                let w: Vec<f32> = sample(2 * k, k as u64).iter().map(|v| v.to_f32()).collect();
                let m = crate::model::quant::QMatrix::quantize(qtype, &w, 2, k)?;
                let mut natural = vec![0f32; k];
                let mut got = vec![bf16::ZERO; k];
                m.dequantize_row(1, &mut natural);
                let (q, d) = m.row(1);
                // SAFETY: features checked above; `got` holds k values.
                unsafe { dequantize(qtype, q, d, &mut got) };
                let run = GROUP * BLOCK;
                let want: Vec<bf16> = (0..k)
                    .map(|p| {
                        let src = if p < k / run * run { p / run * run + qtype.run_order(p % run) } else { p };
                        bf16::from_f32(natural[src])
                    })
                    .collect();
                assert_eq!(got, want, "{qtype:?} k={k}");
            }
        }
        Ok(())
    }

    #[test]
    fn dot_and_gemm_match_f64() -> crate::error::Result<()> {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return Ok(());
        }
        for (n, k, rows) in [(1, 7, 1), (5, 64, 13), (9, 100, 6), (4, 3072, 12), (7, 33, 20)] {
            let x = sample(n * k, k as u64);
            let w = sample(rows * k, 3 + k as u64);
            let mut y = vec![f32::NAN; n * rows];
            // SAFETY: features checked above; sizes as documented.
            unsafe { gemm(&x, n, k, &w, rows, Out { ptr: y.as_mut_ptr(), stride: rows }) };
            for i in 0..n {
                for j in 0..rows {
                    let want = exact(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                    let tol = 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt();
                    assert!((y[i * rows + j] as f64 - want).abs() <= tol, "gemm n={n} k={k} ({i},{j})");
                    // SAFETY: as above.
                    let d = unsafe { dot(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]) };
                    assert!((d as f64 - want).abs() <= tol, "dot k={k}");
                }
            }
        }
        Ok(())
    }
}
