//! Dot products of one quantised weight row with one row of int8-quantised activations
//! (`Σ_b d_w[b]·d_x[b]·Σ_i q_w[b,i]·q_x[b,i]`), as llama.cpp's `vec_dot_q8_0_q8_0` /
//! `vec_dot_q4_0_q8_0` compute them. Integer sums are exact, so every version gives the same
//! per-block sums; only the f32 accumulation order differs.
//!
//! * AVX-512 VNNI: `vpdpbusd` multiplies unsigned by signed bytes, 64 at a time (two blocks).
//!   Q4_0 nibbles are already unsigned (0..=15); Q8_0 quants are flipped to unsigned by adding
//!   128. The offset is taken back out with the activations' per-block `d·Σq`:
//!   `Σ (q+c)·x = Σ q·x + c·Σ x`.
//! * AVX2: `vpmaddubsw` on |w| and sign-adjusted x, one block at a time.
//! * Scalar for everything else.

use half::f16;

use crate::quant::{unpack_block, QActs, QType, BLOCK};

/// One activation row in quantised form.
#[derive(Clone, Copy)]
pub struct XRow<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub ds: &'a [f32],
}

impl<'a> XRow<'a> {
    /// Row `i` of `acts` with `k` values per row.
    pub fn of(acts: &'a QActs, i: usize, k: usize) -> Self {
        let nb = k / BLOCK;
        XRow {
            q: &acts.q[i * k..(i + 1) * k],
            d: &acts.d[i * nb..(i + 1) * nb],
            ds: &acts.ds[i * nb..(i + 1) * nb],
        }
    }
}

/// A dot-product kernel for one format.
pub type QDot = unsafe fn(&[u8], &[f16], XRow<'_>) -> f32;

/// The fastest kernel this CPU runs for `qtype`.
pub fn select(qtype: QType) -> QDot {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
        {
            return match qtype {
                QType::Q8_0 => x86::q8_avx512,
                QType::Q4_0 => x86::q4_avx512,
            };
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return match qtype {
                QType::Q8_0 => x86::q8_avx2,
                QType::Q4_0 => x86::q4_avx2,
            };
        }
    }
    match qtype {
        QType::Q8_0 => q8_scalar,
        QType::Q4_0 => q4_scalar,
    }
}

/// Portable version (also the reference the SIMD versions are tested against).
pub fn dot_scalar(qtype: QType, w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
    blocks_scalar(qtype, w, d, x, 0)
}

/// Blocks `from..` of the row, one at a time.
#[inline]
fn blocks_scalar(qtype: QType, w: &[u8], d: &[f16], x: XRow<'_>, from: usize) -> f32 {
    let nb = d.len();
    let mut vals = [0i8; BLOCK];
    let mut total = 0f32;
    for b in from..nb {
        unpack_block(qtype, w, b, nb, &mut vals);
        let xs = &x.q[b * BLOCK..(b + 1) * BLOCK];
        let s: i32 = vals.iter().zip(xs).map(|(&a, &c)| a as i32 * c as i32).sum();
        total += d[b].to_f32() * x.d[b] * s as f32;
    }
    total
}

unsafe fn q8_scalar(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
    blocks_scalar(QType::Q8_0, w, d, x, 0)
}

unsafe fn q4_scalar(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
    blocks_scalar(QType::Q4_0, w, d, x, 0)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{blocks_scalar, XRow};
    use crate::quant::{QType, BLOCK};

    /// Sixteen blocks at a time: scales for 16 blocks in one register, then eight 64-byte
    /// `vpdpbusd` steps, each scaled by its two blocks' `d_w·d_x` (lanes 0–7 / 8–15).
    /// `load(p)` returns 64 unsigned weight bytes for the block pair `p` and `offset` is the
    /// constant added to make them unsigned.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn sixteen_blocks<F: Fn(usize) -> __m512i>(
        d: &[f16],
        x: XRow<'_>,
        load: F,
        offset: f32,
        qtype: QType,
        w: &[u8],
    ) -> f32 {
        let nb = d.len();
        let mut acc = _mm512_setzero_ps();
        let mut corr = _mm512_setzero_ps();
        let halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let mut b = 0;
        while b + 16 <= nb {
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr().add(b).cast()));
            let dx = _mm512_loadu_ps(x.d.as_ptr().add(b));
            let scale = _mm512_mul_ps(dw, dx);
            corr = _mm512_fmadd_ps(dw, _mm512_loadu_ps(x.ds.as_ptr().add(b)), corr);
            for p in 0..8 {
                let wv = load(b / 2 + p);
                let xv = _mm512_loadu_si512(x.q.as_ptr().add((b + 2 * p) * BLOCK).cast());
                let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
                let idx = _mm512_add_epi32(halves, _mm512_set1_epi32(2 * p as i32));
                let s = _mm512_permutexvar_ps(idx, scale);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), s, acc);
            }
            b += 16;
        }
        _mm512_reduce_add_ps(acc) - offset * _mm512_reduce_add_ps(corr) + blocks_scalar(qtype, w, d, x, b)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q8_avx512(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
        let flip = _mm512_set1_epi8(-128);
        let load = |p: usize| _mm512_xor_si512(_mm512_loadu_si512(w.as_ptr().add(p * 2 * BLOCK).cast()), flip);
        sixteen_blocks(d, x, load, 128.0, QType::Q8_0, w)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q4_avx512(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
        // Both halves hold the pair's 32 bytes; the upper half is shifted right by 4.
        let shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
        let low = _mm512_set1_epi8(0x0F);
        let load = |p: usize| {
            let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(w.as_ptr().add(p * BLOCK).cast()));
            _mm512_and_si512(_mm512_srlv_epi16(v, shifts), low)
        };
        sixteen_blocks(d, x, load, 8.0, QType::Q4_0, w)
    }

    /// Eight blocks at a time with 256-bit `vpmaddubsw`; `block(b)` gives block `b`'s signed
    /// quants.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn eight_blocks<F: Fn(usize) -> __m256i>(d: &[f16], x: XRow<'_>, block: F, qtype: QType, w: &[u8]) -> f32 {
        let nb = d.len();
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut scales = [0f32; 8];
        let mut b = 0;
        while b + 8 <= nb {
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(b).cast()));
            _mm256_storeu_ps(scales.as_mut_ptr(), _mm256_mul_ps(dw, _mm256_loadu_ps(x.d.as_ptr().add(b))));
            for (j, &s) in scales.iter().enumerate() {
                let wv = block(b + j);
                let xv = _mm256_loadu_si256(x.q.as_ptr().add((b + j) * BLOCK).cast());
                let prod = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                let sums = _mm256_madd_epi16(prod, ones);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(sums), acc);
            }
            b += 8;
        }
        let hi = _mm256_extractf128_ps(acc, 1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1) + blocks_scalar(qtype, w, d, x, b)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_avx2(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
        eight_blocks(d, x, |b| _mm256_loadu_si256(w.as_ptr().add(b * BLOCK).cast()), QType::Q8_0, w)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_avx2(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
        // The vector loop covers whole pairs only (8 blocks = 4 pairs), so a lone final block
        // is always left to the scalar tail.
        let low = _mm256_set1_epi8(0x0F);
        let eight = _mm256_set1_epi8(8);
        let block = |b: usize| {
            let v = _mm256_loadu_si256(w.as_ptr().add((b & !1) * BLOCK / 2).cast());
            let v = if b & 1 == 0 { v } else { _mm256_srli_epi16(v, 4) };
            _mm256_sub_epi8(_mm256_and_si256(v, low), eight)
        };
        eight_blocks(d, x, block, QType::Q4_0, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QMatrix;

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn simd_matches_scalar_and_dequantised_product() -> crate::error::Result<()> {
        for qtype in [QType::Q8_0, QType::Q4_0] {
            // Widths with and without a 16-block vector part and odd block counts.
            for k in [32, 96, 512, 544, 3072, 8224] {
                let rows = 3;
                let m = QMatrix::quantize(qtype, &sample(rows * k, k as u64), rows, k)?;
                let x = sample(k, 7 + k as u64);
                let mut acts = QActs::default();
                acts.quantize(&x, k);
                let xr = XRow::of(&acts, 0, k);
                let kernel = select(qtype);
                for r in 0..rows {
                    let (w, d) = m.row(r);
                    // SAFETY: `select` only returns kernels the CPU supports.
                    let fast = unsafe { kernel(w, d, xr) };
                    let slow = dot_scalar(qtype, w, d, xr);
                    let mut wf = vec![0f32; k];
                    m.dequantize_row(r, &mut wf);
                    let exact: f64 = wf
                        .iter()
                        .zip(&acts.q)
                        .enumerate()
                        .map(|(i, (&a, &q))| a as f64 * q as f64 * acts.d[i / BLOCK] as f64)
                        .sum();
                    let tol = 1e-5 * (1.0 + exact.abs()) * (k as f64).sqrt();
                    assert!((fast as f64 - slow as f64).abs() <= tol, "{qtype:?} k={k} r={r}: {fast} vs {slow}");
                    assert!((slow as f64 - exact).abs() <= tol, "{qtype:?} k={k} r={r}: {slow} vs {exact}");
                }
            }
        }
        Ok(())
    }
}
