//! Prefill products of block-quantised weights with int8-quantised activations on AVX-512
//! VNNI, or AVX2: the decode kernels' arithmetic ([`super::qdot`]) for many activation rows at
//! once, as llama.cpp's CPU matmul quantises activations to Q8_0 for its Q4_0/Q8_0 weights.
//!
//! `vpdpbusd` does 64 byte products per instruction, twice `vdpbf16ps`'s 32 and four times an
//! f32 FMA's 16, and quantised weights are read as they are stored (no dequantisation).
//!
//! * Activations are quantised once per call (the Q8_0 rule per block of 32, [`QActs`]), their
//!   quants copied in the weight format's run order, so each 32-bit lane of a product
//!   accumulates one block of a run of 16 (see `quant`).
//! * A register tile of [`MR`] weight rows × [`NR`] activation rows holds 16 integer
//!   accumulators. Per 64-byte chunk each weight row is unpacked once (Q4_0/Q6_0 nibbles, Q8_0
//!   bytes made unsigned) and each activation chunk loaded once and multiplied into all
//!   pairs. After each run (512 weights) the block sums become f32 and are scaled by
//!   `d_w·d_x` into f32 accumulators. The format is a const parameter (no Q6_0 branches in
//!   the inner loop). Per pair and run, eight `vpdpbusd` against three cvt/mul/FMA (and the
//!   nibble unpacking shared by the tile's activation rows) on the same two ports bound the
//!   tile at ~55% of the `vpdpbusd` peak (a C model of the loop measured that); 3 × 8 and
//!   2 × 8 tiles were no faster than 4 × 4 over a whole product on two threads (1.00 ± 0.05,
//!   alternating in one process), and 2 × 8 lost 15–20% at 8192 columns (activations past L1).
//! * The weights' unsigned offset (8 for Q4_0, 32 for Q6_0, 128 for flipped Q8_0) comes out
//!   exactly: each run's integer accumulators start at `−offset·Σq_x` ([`start_sums`], once
//!   per product: `Σ (q+c)·x = Σ q·x + c·Σ x`), so integer block sums equal the decode
//!   kernel's and only the f32 order differs.
//!
//! * AVX2 (no `vpdpbusd`, 16 registers of 256 bits): `vpmaddubsw` + `vpmaddwd` on 32-byte
//!   halves of each chunk (blocks 0–7, then 8–15 of a run), as the AVX2 decode kernel does, in
//!   a 2 × 2 tile (four integer and four f32 accumulators). Q8_0 takes the signed product by
//!   the sign trick (`|w| · sign(x, w)`, which stays below 32767), so its sums start at zero;
//!   a Q4_0/Q6_0 pair of products stays below 32767 too (63·127·2, twice).
//!
//! Only matrices made of whole runs (width a multiple of 512, as every decoder projection of
//! the full model) come here; the caller keeps the other path for the rest.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::Out;
use crate::model::quant::{QActs, QMatrix, QType, BLOCK, GROUP};

/// Weight rows per register tile.
pub const MR: usize = 4;
/// Activation rows per register tile.
pub const NR: usize = 4;
// `dispatch` has tiles for 1..=8 activation rows.
const _: () = assert!(NR >= 1 && NR <= 8 && MR > 1);

/// Weight rows × activation rows of the AVX2 tile.
const MR2: usize = 2;
const NR2: usize = 2;

/// Whether [`gemm`] runs products by `q` on this CPU: whole runs of 16 blocks only.
pub fn takes(q: &QMatrix) -> bool {
    let cpu = super::cpu::cpu();
    q.cols().is_multiple_of(GROUP * BLOCK) && q.cols() > 0 && (cpu.vnni || cpu.avx2_f16c)
}

/// Weight rows per tile of the kernel this CPU runs (block splits align to it).
pub fn tile_rows() -> usize {
    if super::cpu::cpu().vnni {
        MR
    } else {
        MR2
    }
}

/// Each block's starting integer sum for weights in `qtype`: `−c·Σq_x`, `c` the format's
/// unsigned offset (8 for Q4_0, 32 for Q6_0, 128 for flipped Q8_0).
pub fn start_sums(acts: &QActs, qtype: QType) -> Vec<i32> {
    let shift = match qtype {
        QType::Q8_0 => 7,
        QType::Q4_0 => 3,
        QType::Q6_0 => 5,
    };
    acts.s.iter().map(|s| -(s << shift)).collect()
}

/// Activation rows `first..first+n` of `acts` (quantised for `q`'s format, `q.cols()` per row,
/// with their [`start_sums`] in `start`) times weight rows `w0..w0+rows` of `q` transposed,
/// into `out` `[n, rows]`.
///
/// # Safety
/// Only call when [`takes`] is true for `q`; `acts` holds at least `first + n` rows quantised
/// for `q.qtype()` and `start` is their `start_sums`, `w0 + rows ≤ q.rows()`, and `out` covers
/// `n` rows of `rows` columns that no other thread writes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(acts: &QActs, start: &[i32], first: usize, n: usize, q: &QMatrix, w0: usize, rows: usize, out: Out) {
    gemm_on(super::cpu::cpu().vnni, acts, start, first, n, q, w0, rows, out)
}

/// [`gemm`] with the AVX-512 VNNI tile (`vnni`) or the AVX2 one (the CPU must have it).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_on(vnni: bool, acts: &QActs, start: &[i32], first: usize, n: usize, q: &QMatrix, w0: usize, rows: usize, out: Out) {
    let k = q.cols();
    let nb = k / BLOCK;
    let rb = q.qtype().row_bytes(k);
    let x = Rows {
        q: acts.qi.as_ptr().add(first * k),
        d: acts.d.as_ptr().add(first * nb),
        s: start.as_ptr().add(first * nb),
        stride: k,
    };
    let w = Weights { q: q.qs().as_ptr().add(w0 * rb), d: q.scales().as_ptr().add(w0 * nb), stride: rb };
    let (mr, nr_max) = if vnni { (MR, NR) } else { (MR2, NR2) };
    let tile: Tile = match (vnni, q.qtype()) {
        (true, QType::Q8_0) => dispatch::<Q8>,
        (true, QType::Q4_0) => dispatch::<Q4>,
        (true, QType::Q6_0) => dispatch::<Q6>,
        (false, QType::Q8_0) => dispatch_avx2::<Q8>,
        (false, QType::Q4_0) => dispatch_avx2::<Q4>,
        (false, QType::Q6_0) => dispatch_avx2::<Q6>,
    };
    let mut i = 0;
    while i < n {
        let nr = (n - i).min(nr_max);
        let xi = x.skip(i, nb);
        let oi = Out { ptr: out.ptr.add(i * out.stride), stride: out.stride };
        let mut j = 0;
        while j < rows {
            let step = if rows - j >= mr { mr } else { 1 };
            tile(step, nr, w.skip(j, nb), xi, nb, Out { ptr: oi.ptr.add(j), stride: oi.stride });
            j += step;
        }
        i += nr;
    }
}

/// A tile kernel: `step` weight rows (the tile's or 1) × `nr` activation rows.
#[cfg(target_arch = "x86_64")]
type Tile = unsafe fn(usize, usize, Weights, Rows, usize, Out);

/// The formats as the tiles' const parameter.
const Q8: u8 = 0;
const Q4: u8 = 1;
const Q6: u8 = 2;

/// The format of the tiles' const parameter.
const fn format<const F: u8>() -> QType {
    match F {
        Q8 => QType::Q8_0,
        Q4 => QType::Q4_0,
        _ => QType::Q6_0,
    }
}

/// Activation rows: run-ordered quants, scales and per-block starting sums.
#[derive(Clone, Copy)]
struct Rows {
    q: *const i8,
    d: *const f32,
    s: *const i32,
    stride: usize,
}

impl Rows {
    unsafe fn skip(self, i: usize, nb: usize) -> Self {
        Rows { q: self.q.add(i * self.stride), d: self.d.add(i * nb), s: self.s.add(i * nb), stride: self.stride }
    }
}

/// Weight rows: quants (`stride` bytes a row) and f16 scales.
#[derive(Clone, Copy)]
struct Weights {
    q: *const u8,
    d: *const half::f16,
    stride: usize,
}

impl Weights {
    unsafe fn skip(self, j: usize, nb: usize) -> Self {
        Weights { q: self.q.add(j * self.stride), d: self.d.add(j * nb), stride: self.stride }
    }
}

/// The tile for `step` (MR or 1) weight rows × `nr` (1..=NR) activation rows of format `F`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dispatch<const F: u8>(step: usize, nr: usize, w: Weights, x: Rows, nb: usize, o: Out) {
    macro_rules! tiles {
        ($($n:literal)*) => {
            match (step == MR, nr) {
                $((true, $n) => tile::<MR, $n, F>(w, x, nb, o),)*
                $((false, $n) => tile::<1, $n, F>(w, x, nb, o),)*
                _ => {}
            }
        };
    }
    tiles!(1 2 3 4 5 6 7 8);
}

/// `M` weight rows × `N` activation rows of format `F` over every run of the rows.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const M: usize, const N: usize, const F: u8>(w: Weights, x: Rows, nb: usize, out: Out) {
    let qtype = format::<F>();
    let run = GROUP * BLOCK;
    let run_bytes = GROUP * qtype.block_bytes();
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [[_mm512_setzero_ps(); N]; M];
    for g in 0..nb / GROUP {
        let mut a = [[_mm512_setzero_si512(); N]; M];
        for j in 0..N {
            for row in a.iter_mut() {
                row[j] = _mm512_loadu_si512(x.s.add(j * nb + g * GROUP).cast());
            }
        }
        let xg = x.q.add(g * run).cast::<u8>();
        let wg = w.q.add(g * run_bytes);
        if F == Q8 {
            for t in 0..8 {
                let wv: [__m512i; M] = std::array::from_fn(|i| _mm512_xor_si512(_mm512_loadu_si512(wg.add(i * w.stride + 64 * t).cast()), flip));
                for j in 0..N {
                    let xv = _mm512_loadu_si512(xg.add(j * x.stride + 64 * t).cast());
                    for (row, wv) in a.iter_mut().zip(&wv) {
                        row[j] = _mm512_dpbusd_epi32(row[j], *wv, xv);
                    }
                }
            }
        } else {
            for t in 0..4 {
                let wv: [(__m512i, __m512i); M] = std::array::from_fn(|i| super::qdot::x86::nibble_values(qtype, wg.add(i * w.stride), t));
                for j in 0..N {
                    let lo = _mm512_loadu_si512(xg.add(j * x.stride + 128 * t).cast());
                    for (row, wv) in a.iter_mut().zip(&wv) {
                        row[j] = _mm512_dpbusd_epi32(row[j], wv.0, lo);
                    }
                    let hi = _mm512_loadu_si512(xg.add(j * x.stride + 128 * t + 64).cast());
                    for (row, wv) in a.iter_mut().zip(&wv) {
                        row[j] = _mm512_dpbusd_epi32(row[j], wv.1, hi);
                    }
                }
            }
        }
        for (i, (row, acc)) in a.iter().zip(acc.iter_mut()).enumerate() {
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.add(i * nb + g * GROUP).cast()));
            for (j, (s, acc)) in row.iter().zip(acc.iter_mut()).enumerate() {
                let dx = _mm512_loadu_ps(x.d.add(j * nb + g * GROUP));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*s), _mm512_mul_ps(dw, dx), *acc);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            *out.ptr.add(j * out.stride + i) = _mm512_reduce_add_ps(*a);
        }
    }
}

/// [`dispatch`] for the AVX2 tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dispatch_avx2<const F: u8>(step: usize, nr: usize, w: Weights, x: Rows, nb: usize, o: Out) {
    match (step == MR2, nr) {
        (true, 2) => tile_avx2::<MR2, 2, F>(w, x, nb, o),
        (true, _) => tile_avx2::<MR2, 1, F>(w, x, nb, o),
        (false, 2) => tile_avx2::<1, 2, F>(w, x, nb, o),
        (false, _) => tile_avx2::<1, 1, F>(w, x, nb, o),
    }
}

/// `M` weight rows × `N` activation rows of format `F` on AVX2 (see the module doc).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const M: usize, const N: usize, const F: u8>(w: Weights, x: Rows, nb: usize, out: Out) {
    let qtype = format::<F>();
    let (run, run_bytes) = (GROUP * BLOCK, GROUP * qtype.block_bytes());
    let ones = _mm256_set1_epi16(1);
    let (low, top) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    let load = |p: *const u8| _mm256_loadu_si256(p.cast());
    let mut acc = [[_mm256_setzero_ps(); N]; M];
    for g in 0..nb / GROUP {
        let xg = x.q.add(g * run).cast::<u8>();
        let wg = w.q.add(g * run_bytes);
        for h in 0..2 {
            let b = g * GROUP + 8 * h;
            let mut a = [[_mm256_setzero_si256(); N]; M];
            if F != Q8 {
                for j in 0..N {
                    let s = load(x.s.add(j * nb + b).cast());
                    a.iter_mut().for_each(|row| row[j] = s);
                }
            }
            if F == Q8 {
                for t in 0..8 {
                    let wv: [__m256i; M] = std::array::from_fn(|i| load(wg.add(i * w.stride + 64 * t + 32 * h)));
                    for j in 0..N {
                        let xv = load(xg.add(j * x.stride + 64 * t + 32 * h));
                        for (row, wv) in a.iter_mut().zip(&wv) {
                            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(*wv, *wv), _mm256_sign_epi8(xv, *wv));
                            row[j] = _mm256_add_epi32(row[j], _mm256_madd_epi16(p, ones));
                        }
                    }
                }
            } else {
                for t in 0..4 {
                    let wv: [(__m256i, __m256i); M] = std::array::from_fn(|i| {
                        let v = load(wg.add(i * w.stride + 64 * t + 32 * h));
                        let (lo, hi) = (_mm256_and_si256(v, low), _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
                        if F != Q6 {
                            return (lo, hi);
                        }
                        let hb = load(wg.add(i * w.stride + 256 + 64 * (t / 2) + 32 * h));
                        let (tl, th) = if t % 2 == 0 { (_mm256_slli_epi16(hb, 4), _mm256_slli_epi16(hb, 2)) } else { (hb, _mm256_srli_epi16(hb, 2)) };
                        (_mm256_or_si256(lo, _mm256_and_si256(tl, top)), _mm256_or_si256(hi, _mm256_and_si256(th, top)))
                    });
                    for j in 0..N {
                        let xl = load(xg.add(j * x.stride + 128 * t + 32 * h));
                        let xh = load(xg.add(j * x.stride + 128 * t + 64 + 32 * h));
                        for (row, wv) in a.iter_mut().zip(&wv) {
                            let p = _mm256_add_epi16(_mm256_maddubs_epi16(wv.0, xl), _mm256_maddubs_epi16(wv.1, xh));
                            row[j] = _mm256_add_epi32(row[j], _mm256_madd_epi16(p, ones));
                        }
                    }
                }
            }
            for (i, (row, acc)) in a.iter().zip(acc.iter_mut()).enumerate() {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(w.d.add(i * nb + b).cast()));
                for (j, (s, acc)) in row.iter().zip(acc.iter_mut()).enumerate() {
                    let dx = _mm256_loadu_ps(x.d.add(j * nb + b));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*s), _mm256_mul_ps(dw, dx), *acc);
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let s4 = _mm_add_ps(_mm256_castps256_ps128(*v), _mm256_extractf128_ps(*v, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            *out.ptr.add(j * out.stride + i) = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::qdot::{self, XRow};
    use crate::model::quant::test_values as sample;

    #[test]
    fn matches_the_decode_kernel_for_every_tile_shape() -> crate::error::Result<()> {
        let cpu = crate::kernels::cpu::cpu();
        // Every tile this CPU runs: the AVX-512 VNNI one and the AVX2 one.
        let isas: Vec<bool> = [(true, cpu.vnni), (false, cpu.avx2_f16c)].iter().filter(|i| i.1).map(|i| i.0).collect();
        if isas.is_empty() {
            eprintln!("skipped: neither AVX-512 VNNI nor AVX2 on this CPU");
        }
        for (vnni, qtype) in isas.iter().flat_map(|&v| [QType::Q8_0, QType::Q4_0, QType::Q6_0].map(|q| (v, q))) {
            // Row counts that leave every partial tile in both directions.
            for (n, k, rows) in [(1, 512, 1), (7, 512, 9), (4, 1024, 4), (13, 3072, 6), (5, 8192, 7)] {
                let m = QMatrix::quantize(qtype, &sample(rows * k, k as u64), rows, k)?;
                let x = sample(n * k, 11 + k as u64);
                let mut acts = QActs::default();
                acts.quantize(&x, k, qtype);
                let mut y = vec![f32::NAN; n * rows];
                // SAFETY: checked `available`; k is a multiple of 512; `y` is [n, rows].
                unsafe { gemm_on(vnni, &acts, &start_sums(&acts, qtype), 0, n, &m, 0, rows, Out { ptr: y.as_mut_ptr(), stride: rows }) };
                for i in 0..n {
                    for r in 0..rows {
                        let (wq, wd) = m.row(r);
                        let want = qdot::dot_scalar(qtype, wq, wd, XRow::of(&acts, i, k));
                        let got = y[i * rows + r];
                        let tol = 1e-5 * (1.0 + want.abs()) * (k as f32).sqrt();
                        assert!((got - want).abs() <= tol, "vnni {vnni} {qtype:?} n={n} k={k} ({i},{r}): {got} vs {want}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn offsets_into_rows_and_weights() -> crate::error::Result<()> {
        let cpu = crate::kernels::cpu::cpu();
        if !(cpu.vnni || cpu.avx2_f16c) {
            return Ok(());
        }
        let (n, k, rows) = (6, 1024, 10);
        let qtype = QType::Q4_0;
        let m = QMatrix::quantize(qtype, &sample(rows * k, 3), rows, k)?;
        let mut acts = QActs::default();
        acts.quantize(&sample(n * k, 5), k, qtype);
        let mut whole = vec![0f32; n * rows];
        let mut part = vec![0f32; 2 * 3];
        // SAFETY: as above; the part is rows 3..5 of the activations and 4..7 of the weights.
        unsafe {
            let start = start_sums(&acts, qtype);
            gemm(&acts, &start, 0, n, &m, 0, rows, Out { ptr: whole.as_mut_ptr(), stride: rows });
            gemm(&acts, &start, 3, 2, &m, 4, 3, Out { ptr: part.as_mut_ptr(), stride: 3 });
        }
        for i in 0..2 {
            for j in 0..3 {
                assert_eq!(part[i * 3 + j], whole[(3 + i) * rows + 4 + j]);
            }
        }
        Ok(())
    }
}


