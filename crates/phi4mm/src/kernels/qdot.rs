//! Dot products of one quantised weight row with one row of int8-quantised activations
//! (`Σ_b d_w[b]·d_x[b]·Σ_i q_w[b,i]·q_x[b,i]`), as llama.cpp's `vec_dot_q8_0_q8_0` /
//! `vec_dot_q4_0_q8_0` compute them. Integer sums are exact, so every version gives the same
//! per-block sums; only the f32 accumulation order differs.
//!
//! Rows store runs of 16 blocks interleaved four bytes at a time (see `quant`), and the
//! activations come in the same order (`QActs::qi`), so each 32-bit lane of a product
//! accumulates one block:
//!
//! * AVX-512 VNNI: `vpdpbusd` (unsigned × signed bytes, 64 at a time) over a run's 64-byte
//!   chunks leaves the 16 block sums in one register: one conversion and one multiply-add by
//!   `d_w·d_x` per 512 weights. Q4_0 nibbles are already unsigned (0..=15) and Q8_0 quants
//!   are made unsigned by adding 128; the offset comes back out through the activations'
//!   per-block `d·Σq`: `Σ (q+c)·x = Σ q·x + c·Σ x`.
//! * AVX2: the same with `vpmaddubsw` + `vpmaddwd` on 256-bit halves (|w| and sign-adjusted x
//!   for Q8_0).
//! * Scalar for everything else, and for the blocks after the last whole run.

use half::f16;

use crate::model::quant::{unpack_block, QActs, QType, BLOCK};

/// One activation row in quantised form.
#[derive(Clone, Copy)]
pub struct XRow<'a> {
    pub q: &'a [i8],
    pub qi: &'a [i8],
    pub d: &'a [f32],
    pub ds: &'a [f32],
}

impl<'a> XRow<'a> {
    /// Row `i` of `acts` with `k` values per row.
    pub fn of(acts: &'a QActs, i: usize, k: usize) -> Self {
        let nb = k / BLOCK;
        XRow {
            q: &acts.q[i * k..(i + 1) * k],
            qi: &acts.qi[i * k..(i + 1) * k],
            d: &acts.d[i * nb..(i + 1) * nb],
            ds: &acts.ds[i * nb..(i + 1) * nb],
        }
    }
}

/// A dot-product kernel for one format.
pub type QDot = unsafe fn(&[u8], &[f16], XRow<'_>) -> f32;

/// Whether this CPU has AVX-512 F/BW/VNNI (the `vpdpbusd` kernels here and in `qgemm`).
pub fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::cpu::cpu().vnni
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The fastest kernel this CPU runs for `qtype`.
pub fn select(qtype: QType) -> QDot {
    #[cfg(target_arch = "x86_64")]
    {
        if vnni() {
            return match qtype {
                QType::Q8_0 => x86::q8_avx512,
                QType::Q4_0 => x86::q4_avx512,
                QType::Q6_0 => x86::q6_avx512,
            };
        }
        if super::cpu::cpu().avx2_f16c {
            return match qtype {
                QType::Q8_0 => x86::q8_avx2,
                QType::Q4_0 => x86::q4_avx2,
                QType::Q6_0 => x86::q6_avx2,
            };
        }
    }
    scalar(qtype)
}

fn scalar(qtype: QType) -> QDot {
    match qtype {
        QType::Q8_0 => q8_scalar,
        QType::Q4_0 => q4_scalar,
        QType::Q6_0 => q6_scalar,
    }
}

/// Every kernel this CPU can run for `qtype`, fastest first (for tests and benches).
pub fn all(qtype: QType) -> Vec<(&'static str, QDot)> {
    let mut v: Vec<(&'static str, QDot)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if vnni() {
            let k: QDot = match qtype {
                QType::Q8_0 => x86::q8_avx512,
                QType::Q4_0 => x86::q4_avx512,
                QType::Q6_0 => x86::q6_avx512,
            };
            v.push(("avx512-vnni", k));
        }
        if super::cpu::cpu().avx2_f16c {
            let k: QDot = match qtype {
                QType::Q8_0 => x86::q8_avx2,
                QType::Q4_0 => x86::q4_avx2,
                QType::Q6_0 => x86::q6_avx2,
            };
            v.push(("avx2", k));
        }
    }
    v.push(("scalar", scalar(qtype)));
    v
}

/// Portable version (also the reference the SIMD versions are tested against).
pub fn dot_scalar(qtype: QType, w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
    blocks_scalar(qtype, w, d, x, 0)
}

/// Blocks `from..` of the row, one at a time.
#[inline]
fn blocks_scalar(qtype: QType, w: &[u8], d: &[f16], x: XRow<'_>, from: usize) -> f32 {
    let nb = d.len();
    // Q8_0 blocks after the last run (the whole row of a LoRA `B` matrix, whose rows hold only
    // r = 256 or 320 values) with AVX2 integer sums: the same exact per-block sums and the same
    // f32 accumulation as below, so the same bits, 6–8× faster.
    #[cfg(target_arch = "x86_64")]
    if qtype == QType::Q8_0 && from >= nb / crate::model::quant::GROUP * crate::model::quant::GROUP && super::cpu::cpu().avx2 {
        // SAFETY: AVX2 was just detected; tail blocks are stored plainly, 32 bytes each.
        return unsafe { x86::q8_tail_avx2(w, d, x, from) };
    }
    blocks_unpacked(qtype, w, d, x, from)
}

/// [`blocks_scalar`] without the AVX2 shortcut.
fn blocks_unpacked(qtype: QType, w: &[u8], d: &[f16], x: XRow<'_>, from: usize) -> f32 {
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

unsafe fn q6_scalar(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
    blocks_scalar(QType::Q6_0, w, d, x, 0)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{blocks_scalar, XRow};
    use crate::kernels::{prefetch, PREFETCH_AHEAD};
    use crate::model::quant::{QType, BLOCK, GROUP};

    /// Runs of 16 blocks: `chunks(g, a)` accumulates run `g`'s block sums into the two
    /// accumulators (one lane per block); `offset` is the constant that made the weights
    /// unsigned.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn runs<F: Fn(usize, &mut [__m512i; 4])>(d: &[f16], x: XRow<'_>, chunks: F, offset: f32, qtype: QType, w: &[u8]) -> f32 {
        let nb = d.len();
        let mut acc = _mm512_setzero_ps();
        let mut corr = _mm512_setzero_ps();
        let mut b = 0;
        let run_bytes = GROUP * qtype.block_bytes();
        while b + GROUP <= nb {
            prefetch_run(w, d, b, run_bytes);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr().add(b).cast()));
            let scale = _mm512_mul_ps(dw, _mm512_loadu_ps(x.d.as_ptr().add(b)));
            corr = _mm512_fmadd_ps(dw, _mm512_loadu_ps(x.ds.as_ptr().add(b)), corr);
            let mut a = [_mm512_setzero_si512(); 4];
            chunks(b / GROUP, &mut a);
            let sum = _mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3]));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc);
            b += GROUP;
        }
        let total = _mm512_reduce_add_ps(_mm512_fmadd_ps(corr, _mm512_set1_ps(-offset), acc));
        if b < nb {
            total + blocks_scalar(qtype, w, d, x, b)
        } else {
            total
        }
    }

    /// Prefetches the weights [`PREFETCH_AHEAD`] bytes past the run that starts at block `b`
    /// (`run_bytes` long), and the scales as many blocks ahead.
    #[inline(always)]
    fn prefetch_run(w: &[u8], d: &[f16], b: usize, run_bytes: usize) {
        let ahead = w.as_ptr().wrapping_add(b / GROUP * run_bytes + PREFETCH_AHEAD);
        for line in (0..run_bytes).step_by(64) {
            prefetch(ahead.wrapping_add(line));
        }
        prefetch(d.as_ptr().wrapping_add(b + PREFETCH_AHEAD * GROUP / run_bytes));
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load(p: *const u8) -> __m512i {
        _mm512_loadu_si512(p.cast())
    }

    /// [`blocks_scalar`] of Q8_0 blocks `from..` that lie after the last run.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn q8_tail_avx2(w: &[u8], d: &[f16], x: XRow<'_>, from: usize) -> f32 {
        let mut total = 0f32;
        for b in from..d.len() {
            let (wp, xp) = (w[b * BLOCK..(b + 1) * BLOCK].as_ptr(), x.q[b * BLOCK..(b + 1) * BLOCK].as_ptr());
            let mut acc = _mm256_setzero_si256();
            for h in 0..2 {
                let wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp.add(16 * h).cast()));
                let xv = _mm256_cvtepi8_epi16(_mm_loadu_si128(xp.add(16 * h).cast()));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(wv, xv));
            }
            let s128 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256::<1>(acc));
            let s64 = _mm_add_epi32(s128, _mm_unpackhi_epi64(s128, s128));
            let s = _mm_cvtsi128_si32(_mm_add_epi32(s64, _mm_shuffle_epi32::<1>(s64)));
            total += d[b].to_f32() * x.d[b] * s as f32;
        }
        total
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q8_avx512(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
        let flip = _mm512_set1_epi8(-128);
        let run = GROUP * BLOCK;
        let chunks = |g: usize, a: &mut [__m512i; 4]| {
            let (wp, xp) = (w.as_ptr().add(g * run), x.qi.as_ptr().add(g * run).cast::<u8>());
            for t in 0..8 {
                let wv = _mm512_xor_si512(load(wp.add(64 * t)), flip);
                a[t & 3] = _mm512_dpbusd_epi32(a[t & 3], wv, load(xp.add(64 * t)));
            }
        };
        runs(d, x, chunks, 128.0, QType::Q8_0, w)
    }

    /// The unsigned quants of 64-byte nibble chunk `t` (0..4) of a Q4_0 or Q6_0 run starting at
    /// `run`: its low-nibble values and its high-nibble values, each 64 bytes in run order
    /// (Q4_0: 0..=15; Q6_0: 0..=63, the top two bits taken from the run's high-bit chunk `t/2`,
    /// see `quant`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) unsafe fn nibble_values(qtype: QType, run: *const u8, t: usize) -> (__m512i, __m512i) {
        let low = _mm512_set1_epi8(0x0F);
        let v = load(run.add(64 * t));
        let (lo, hi) = (_mm512_and_si512(v, low), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
        if qtype != QType::Q6_0 {
            return (lo, hi);
        }
        // Bits 4(t mod 2)..+2 (low-nibble values) and two above (high-nibble values) moved to
        // bits 4–5 of each byte; 16-bit shifts by at most 4 never move them across a byte.
        let h = load(run.add(256 + 64 * (t / 2)));
        let (tl, th) = if t % 2 == 0 { (_mm512_slli_epi16(h, 4), _mm512_slli_epi16(h, 2)) } else { (h, _mm512_srli_epi16(h, 2)) };
        let top = _mm512_set1_epi8(0x30);
        (_mm512_or_si512(lo, _mm512_and_si512(tl, top)), _mm512_or_si512(hi, _mm512_and_si512(th, top)))
    }

    /// Q4_0 and Q6_0 rows: four nibble chunks per run, each feeding two `vpdpbusd`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn nibble_rows(qtype: QType, w: &[u8], d: &[f16], x: XRow<'_>, offset: f32) -> f32 {
        let run = GROUP * BLOCK;
        let run_bytes = GROUP * qtype.block_bytes();
        let chunks = |g: usize, a: &mut [__m512i; 4]| {
            let (wp, xp) = (w.as_ptr().add(g * run_bytes), x.qi.as_ptr().add(g * run).cast::<u8>());
            for t in 0..4 {
                let (lo, hi) = nibble_values(qtype, wp, t);
                let h = 2 * (t & 1);
                a[h] = _mm512_dpbusd_epi32(a[h], lo, load(xp.add(128 * t)));
                a[h + 1] = _mm512_dpbusd_epi32(a[h + 1], hi, load(xp.add(128 * t + 64)));
            }
        };
        runs(d, x, chunks, offset, qtype, w)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q4_avx512(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
        nibble_rows(QType::Q4_0, w, d, x, 8.0)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q6_avx512(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
        nibble_rows(QType::Q6_0, w, d, x, 32.0)
    }

    /// AVX2 version of [`runs`]: two 8-lane accumulators per run (blocks 0–7 and 8–15);
    /// `chunks(g, a)` adds 16-bit pair sums widened to 32 bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn runs_avx2<F: Fn(usize, &mut [__m256i; 2])>(d: &[f16], x: XRow<'_>, chunks: F, offset: f32, qtype: QType, w: &[u8]) -> f32 {
        let nb = d.len();
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut corr = _mm256_setzero_ps();
        let mut b = 0;
        let run_bytes = GROUP * qtype.block_bytes();
        while b + GROUP <= nb {
            prefetch_run(w, d, b, run_bytes);
            let mut a = [_mm256_setzero_si256(); 2];
            chunks(b / GROUP, &mut a);
            for (h, (acc, a)) in acc.iter_mut().zip(a).enumerate() {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(b + 8 * h).cast()));
                let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d.as_ptr().add(b + 8 * h)));
                corr = _mm256_fmadd_ps(dw, _mm256_loadu_ps(x.ds.as_ptr().add(b + 8 * h)), corr);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), scale, *acc);
            }
            b += GROUP;
        }
        hsum(_mm256_add_ps(acc[0], acc[1])) - offset * hsum(corr) + blocks_scalar(qtype, w, d, x, b)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load2(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p.cast())
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_avx2(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let run = GROUP * BLOCK;
        let chunks = |g: usize, a: &mut [__m256i; 2]| {
            let (wp, xp) = (w.as_ptr().add(g * run), x.qi.as_ptr().add(g * run).cast::<u8>());
            for t in 0..8 {
                for (h, a) in a.iter_mut().enumerate() {
                    let wv = load2(wp.add(64 * t + 32 * h));
                    let xv = load2(xp.add(64 * t + 32 * h));
                    let prod = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(prod, ones));
                }
            }
        };
        runs_avx2(d, x, chunks, 0.0, QType::Q8_0, w)
    }

    /// Q4_0 and Q6_0 rows on AVX2: [`nibble_values`] on 32-byte halves (`h`), with
    /// `vpmaddubsw` (a pair of products stays below 32767: 63·127·2 per pair, twice).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibble_rows_avx2(qtype: QType, w: &[u8], d: &[f16], x: XRow<'_>, offset: f32) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let (low, top) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let run = GROUP * BLOCK;
        let run_bytes = GROUP * qtype.block_bytes();
        let chunks = |g: usize, a: &mut [__m256i; 2]| {
            let (wp, xp) = (w.as_ptr().add(g * run_bytes), x.qi.as_ptr().add(g * run).cast::<u8>());
            for t in 0..4 {
                for (h, a) in a.iter_mut().enumerate() {
                    let v = load2(wp.add(64 * t + 32 * h));
                    let mut lo = _mm256_and_si256(v, low);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    if qtype == QType::Q6_0 {
                        let hb = load2(wp.add(256 + 64 * (t / 2) + 32 * h));
                        let (tl, th) = if t % 2 == 0 {
                            (_mm256_slli_epi16(hb, 4), _mm256_slli_epi16(hb, 2))
                        } else {
                            (hb, _mm256_srli_epi16(hb, 2))
                        };
                        lo = _mm256_or_si256(lo, _mm256_and_si256(tl, top));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(th, top));
                    }
                    let p_lo = _mm256_maddubs_epi16(lo, load2(xp.add(128 * t + 32 * h)));
                    let p_hi = _mm256_maddubs_epi16(hi, load2(xp.add(128 * t + 64 + 32 * h)));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(_mm256_add_epi16(p_lo, p_hi), ones));
                }
            }
        };
        runs_avx2(d, x, chunks, offset, qtype, w)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_avx2(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
        nibble_rows_avx2(QType::Q4_0, w, d, x, 8.0)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6_avx2(w: &[u8], d: &[f16], x: XRow<'_>) -> f32 {
        nibble_rows_avx2(QType::Q6_0, w, d, x, 32.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::{test_values as sample, QMatrix};


    /// The AVX2 sums of Q8_0 tail blocks give the unpacking loop's bits (LoRA `B` rows of 256
    /// and 320 values are all tail; 544 = one run + one tail block).
    #[test]
    fn q8_tail_blocks_give_the_scalar_bits() -> crate::error::Result<()> {
        for k in [32, 256, 320, 544] {
            let m = QMatrix::quantize(QType::Q8_0, &sample(4 * k, k as u64), 4, k)?;
            let mut acts = QActs::default();
            acts.quantize(&sample(k, 3 + k as u64), k, QType::Q8_0);
            let xr = XRow::of(&acts, 0, k);
            for r in 0..4 {
                let (w, d) = m.row(r);
                let from = d.len() / crate::model::quant::GROUP * crate::model::quant::GROUP;
                let (a, b) = (blocks_scalar(QType::Q8_0, w, d, xr, from), blocks_unpacked(QType::Q8_0, w, d, xr, from));
                assert_eq!(a.to_bits(), b.to_bits(), "k={k} row {r}: {a} vs {b}");
                assert!(a != 0.0);
            }
        }
        Ok(())
    }

    #[test]
    fn simd_matches_scalar_and_dequantised_product() -> crate::error::Result<()> {
        for qtype in [QType::Q8_0, QType::Q4_0, QType::Q6_0] {
            // Widths with and without a 16-block vector part and odd block counts.
            for k in [32, 96, 512, 544, 3072, 8224] {
                let rows = 3;
                let m = QMatrix::quantize(qtype, &sample(rows * k, k as u64), rows, k)?;
                let x = sample(k, 7 + k as u64);
                let mut acts = QActs::default();
                acts.quantize(&x, k, qtype);
                let xr = XRow::of(&acts, 0, k);
                for (name, kernel) in all(qtype) {
                for r in 0..rows {
                    let (w, d) = m.row(r);
                    // SAFETY: `all` only returns kernels the CPU supports.
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
                    assert!((fast as f64 - slow as f64).abs() <= tol, "{name} {qtype:?} k={k} r={r}: {fast} vs {slow}");
                    assert!((slow as f64 - exact).abs() <= tol, "{qtype:?} k={k} r={r}: {slow} vs {exact}");
                }
                }
            }
        }
        Ok(())
    }
}
