//! f32 × f32 register-tiled product with AVX-512F FMAs, for prefill where AVX-512 BF16 is
//! missing (or the activations are f32, as in the encoders). The `gemm` crate's kernels stop at
//! 256-bit FMAs without its nightly feature; this one uses 512-bit FMAs.
//!
//! The activations are packed once per call into panels of [`XR`] rows interleaved along `k`
//! ([`pack`]: for each column, the panel's 32 values, zero past the last row), so one column
//! of a panel is two vectors. The caller widens (or dequantises) a block of weights to f32 once,
//! kept in L2, in tiles of [`WR`] rows interleaved along `k` ([`weight_index`]), so a tile's
//! column is 12 consecutive values (one pointer, constant offsets: no per-row address
//! arithmetic competing with the FMA ports). A tile of 12 weight rows × one panel keeps 24
//! accumulators in registers: per column, two vector loads of the panel and one broadcast of
//! each weight row's value feed 24 FMAs; each accumulator holds finished sums for 16 activation
//! rows of one weight row (no horizontal sums). [`tiles`] is also the engine of the encoder
//! attention kernel (`attention.rs`).
//!
//! Measured alone on L1/L2-resident data the tile runs at 75–83 G multiply-adds/s per core (the
//! machine's 512-bit FMA peak measured 84); `cargo bench -p phi4mm --bench kernels -- encoder`
//! gives the whole product with packing, widening and stores.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

use super::Out;

/// Activation rows per packed panel (two vectors).
pub const XR: usize = 32;
/// Weight rows per register tile.
pub const WR: usize = 12;

/// Whether this CPU has the instructions [`gemm`] needs.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::cpu::cpu().avx512f
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` `[n, k]` → panels `[⌈n/XR⌉, k, XR]` (rows past `n` are zero), panels over the threads.
pub fn pack(x: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut p = vec![0f32; n.div_ceil(XR) * k * XR];
    if k == 0 {
        return p;
    }
    p.par_chunks_mut(k * XR).zip(x[..n * k].par_chunks(k * XR)).for_each(|(panel, rows)| {
        pack_panel(rows, k, 0, rows.len() / k, k, panel);
    });
    p
}

/// One panel: columns `c0..c0+k` of the first `valid` (≤ [`XR`]) rows of `rows` (row stride
/// `stride`) into `panel` `[k, XR]`, zeros in the rows past `valid`. Blocks of 16 rows × 16
/// columns go through a register transpose (one vector store per column; value by value, the
/// stores 128 bytes apart were ~4% of a speech encode).
pub fn pack_panel(rows: &[f32], stride: usize, c0: usize, valid: usize, k: usize, panel: &mut [f32]) {
    // Full groups of 16 rows and full blocks of 16 columns through registers, the rest here.
    let (mut halves, mut done) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if available() && valid >= 16 {
        (halves, done) = ((valid / 16).min(2), k / 16 * 16);
        // SAFETY: AVX-512F was detected; the first 16·halves rows hold columns c0..c0+k (the
        // caller's slice), `panel` holds k·XR values.
        unsafe { pack_full(rows, stride, c0, halves, done, panel) };
    }
    for c in 0..k {
        let col = &mut panel[c * XR..(c + 1) * XR];
        let from = if c < done { 16 * halves } else { 0 };
        for (i, v) in col.iter_mut().enumerate().skip(from) {
            *v = if i < valid { rows[i * stride + c0 + c] } else { 0.0 };
        }
    }
}

/// Columns `c0..c0+k` (`k` a multiple of 16) of the first `16·halves` rows into a panel,
/// 16×16 at a time.
///
/// # Safety
/// Only call when [`available`] is true; `rows` holds `16·halves` rows of `stride` with the
/// columns, `panel` `k·XR` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_full(rows: &[f32], stride: usize, c0: usize, halves: usize, k: usize, panel: &mut [f32]) {
    for half in 0..halves {
        for cb in (0..k).step_by(16) {
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, v) in r.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(rows.as_ptr().add((16 * half + i) * stride + c0 + cb));
            }
            transpose16(&mut r);
            for (c, v) in r.iter().enumerate() {
                _mm512_storeu_ps(panel.as_mut_ptr().add((cb + c) * XR + 16 * half), *v);
            }
        }
    }
}

/// Where weight `(r, p)` of `rows` rows of `k` goes in the tile layout [`tiles`] reads:
/// rows in tiles of [`WR`] (the last one narrower), each tile interleaved along `k`, so one
/// column of a tile is its rows' values side by side.
#[inline(always)]
pub fn weight_index(r: usize, p: usize, rows: usize, k: usize) -> usize {
    let j = r / WR * WR;
    j * k + p * WR.min(rows - j) + (r - j)
}

/// Columns of `k` per pass over a panel in [`gemm`]: a panel's 256 columns (32 KB) stay in
/// L1 while every weight tile of the block passes over them.
const KC: usize = 256;

/// Columns of `k` the caller widens per weight block ([`gemm`]'s `kc`): a block of 512 rows of
/// 512 columns (1 MiB) stays in L2 and every activation value read from memory meets 512
/// weight rows. (Whole rows instead, as first written, left 60 rows of `fc2`'s 4304 columns per
/// block: `encoder/fc2` 66 → see the README for the measured gain.)
pub const K_BLOCK: usize = 512;

/// Columns `k0..k0+kc` of `x` (packed by [`pack`] from `n` rows of `k`) times a block of
/// weights `[rows, kc]` (`wp`, in the [`weight_index`] layout for `kc` columns), added into
/// `out` `[n, rows]` — or stored, plus `bias[j]` on column `j`, when `k0` is 0. `acc` is
/// scratch.
///
/// # Safety
/// Only call when [`available`] is true; `xp` is `pack(x, n, k)`, `k0 + kc ≤ k`, `wp` holds
/// `rows·kc` values, `bias` (if any) `rows`, and `out` covers `n` rows of `rows` columns
/// that no other thread writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    xp: &[f32],
    n: usize,
    k: usize,
    (k0, kc): (usize, usize),
    wp: &[f32],
    rows: usize,
    bias: Option<&[f32]>,
    out: Out,
    acc: &mut Vec<f32>,
) {
    acc.resize(rows * XR, 0.0);
    let a = acc.as_mut_ptr();
    for panel in 0..n.div_ceil(XR) {
        let xs = xp.as_ptr().add(panel * k * XR + k0 * XR);
        sums(xs, wp.as_ptr(), kc, kc, rows, KC, a);
        let valid = (n - panel * XR).min(XR);
        let o = out.ptr.add(panel * XR * out.stride);
        store_sums(acc, rows, valid, k0 == 0, bias, Out { ptr: o, stride: out.stride });
    }
}

/// `acc` `[rows, XR]` (sums per weight row `j` and panel row `i`) into the first `valid` rows
/// of `out` `[·, rows]`: stored plus `bias` when `first`, else added. 16×16 blocks are
/// transposed in registers so the output is written a row of 16 columns at a time (the scalar
/// strided read-modify-write took 15% of `fc1`'s time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn store_sums(acc: &[f32], rows: usize, valid: usize, first: bool, bias: Option<&[f32]>, out: Out) {
    let full = rows / 16 * 16;
    for j0 in (0..full).step_by(16) {
        let b = match (first, bias) {
            (true, Some(b)) => _mm512_loadu_ps(b.as_ptr().add(j0)),
            _ => _mm512_setzero_ps(),
        };
        for i0 in (0..valid).step_by(16) {
            let mut r = [_mm512_setzero_ps(); 16];
            for (jj, v) in r.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(acc.as_ptr().add((j0 + jj) * XR + i0));
            }
            transpose16(&mut r);
            for (ii, v) in r.iter().enumerate().take(valid - i0) {
                let y = out.ptr.add((i0 + ii) * out.stride + j0);
                let base = if first { b } else { _mm512_loadu_ps(y) };
                _mm512_storeu_ps(y, _mm512_add_ps(base, *v));
            }
        }
    }
    for j in full..rows {
        let b = if first { bias.map_or(0.0, |b| b[j]) } else { 0.0 };
        for i in 0..valid {
            let y = out.ptr.add(i * out.stride + j);
            *y = if first { acc[j * XR + i] + b } else { *y + acc[j * XR + i] };
        }
    }
}

/// Up to 16 bf16 weight rows (`srcs`, `kc` values each) widened into one tile of the
/// [`weight_index`] layout: `dst[p·m + j] = srcs[j][p]` for `m = srcs.len()`. 16 columns at a
/// time through a register transpose (contiguous stores; element by element it cost a
/// 16-token prefill half its speed).
///
/// # Safety
/// Only call when [`available`] is true; every source holds `kc` values, `dst` `m·kc`, `m ≤ 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn interleave_bf16(srcs: &[&[half::bf16]], kc: usize, dst: &mut [f32]) {
    let m = srcs.len();
    let full = kc / 16 * 16;
    let mask = ((1u32 << m) - 1) as u16;
    for p0 in (0..full).step_by(16) {
        let mut r = [_mm512_setzero_ps(); 16];
        for (v, src) in r.iter_mut().zip(srcs) {
            let h = _mm256_loadu_si256(src.as_ptr().add(p0) as *const __m256i);
            *v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
        }
        transpose16(&mut r);
        for (p, v) in r.iter().enumerate() {
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add((p0 + p) * m), mask, *v);
        }
    }
    for p in full..kc {
        for (j, src) in srcs.iter().enumerate() {
            dst[p * m + j] = src[p].to_f32();
        }
    }
}

/// Transposes the 16×16 matrix whose rows are `r` in place.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    // Pairs of rows interleaved, then groups of four: u[4g + c] holds, in 128-bit lane L,
    // column 4L + c of rows 4g..4g+4.
    let mut t = [_mm512_setzero_ps(); 16];
    for k in 0..8 {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (a, b) = (t[4 * g], t[4 * g + 1]);
        let (c, d) = (t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_shuffle_ps::<0x44>(a, c);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(b, d);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
    }
    // Then the lanes: column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
    for c in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        let w0 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        let w1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
        r[c] = _mm512_shuffle_f32x4::<0x88>(v0, v1);
        r[8 + c] = _mm512_shuffle_f32x4::<0xDD>(v0, v1);
        r[4 + c] = _mm512_shuffle_f32x4::<0x88>(w0, w1);
        r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(w0, w1);
    }
}

/// The first `k` columns of a panel `xs` times `rows` weight rows (a [`weight_index`] layout of
/// `wk ≥ k` columns), `chunk` columns per pass of [`tiles`] (kept in L1), the passes' sums
/// added up in `acc` `[rows, XR]` (weight row `j`'s sums for the panel's 32 rows at
/// `acc + j·XR`).
///
/// # Safety
/// Only call when [`available`] is true; `xs` holds `k·XR` values, `wp` `rows·wk`, `k ≤ wk`,
/// and `acc` `rows·XR`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn sums(xs: *const f32, wp: *const f32, wk: usize, k: usize, rows: usize, chunk: usize, acc: *mut f32) {
    for c0 in (0..k).step_by(chunk.max(1)) {
        tiles(xs.add(c0 * XR), wp, wk, c0, chunk.min(k - c0), rows, |j, a0, a1| {
            let (p0, p1) = (acc.add(j * XR), acc.add(j * XR + 16));
            if c0 > 0 {
                _mm512_storeu_ps(p0, _mm512_add_ps(_mm512_loadu_ps(p0), a0));
                _mm512_storeu_ps(p1, _mm512_add_ps(_mm512_loadu_ps(p1), a1));
            } else {
                _mm512_storeu_ps(p0, a0);
                _mm512_storeu_ps(p1, a1);
            }
        });
    }
}

// `tiles` has tiles for 1..=12 weight rows.
const _: () = assert!(WR <= 12 && XR == 32);

/// `kc` columns of a panel (`xs` points at the first: [`XR`] values per column) times `rows`
/// weight rows — columns `w0..w0+kc` of a [`weight_index`] layout of `wk` columns — in tiles of
/// up to [`WR`] rows; `store(j, a0, a1)` receives weight row `j`'s sums for the panel's rows
/// 0..16 and 16..32.
///
/// # Safety
/// Only call when [`available`] is true; `xs` holds `kc·XR` values, `wp` `rows·wk`, and
/// `w0 + kc ≤ wk`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn tiles(
    xs: *const f32,
    wp: *const f32,
    wk: usize,
    w0: usize,
    kc: usize,
    rows: usize,
    mut store: impl FnMut(usize, __m512, __m512),
) {
    let mut j = 0;
    while j < rows {
        let m = (rows - j).min(WR);
        let wj = wp.add(j * wk + w0 * m);
        let mut put = |jj: usize, a0, a1| store(j + jj, a0, a1);
        macro_rules! tiles {
            ($($m:literal)*) => {
                match m {
                    $($m => tile::<$m>(xs, wj, kc, &mut put),)*
                    _ => {}
                }
            };
        }
        tiles!(1 2 3 4 5 6 7 8 9 10 11 12);
        j += m;
    }
}

/// `M` weight rows (interleaved: column `p` at `w + p·M`) × one panel over all of `k`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const M: usize>(xs: *const f32, w: *const f32, k: usize, store: &mut impl FnMut(usize, __m512, __m512)) {
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    for p in 0..k {
        let x0 = _mm512_loadu_ps(xs.add(p * XR));
        let x1 = _mm512_loadu_ps(xs.add(p * XR + 16));
        for (j, a) in acc.iter_mut().enumerate() {
            let b = _mm512_set1_ps(*w.add(p * M + j));
            a[0] = _mm512_fmadd_ps(x0, b, a[0]);
            a[1] = _mm512_fmadd_ps(x1, b, a[1]);
        }
    }
    for (j, a) in acc.iter().enumerate() {
        store(j, a[0], a[1]);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !available() {
            return;
        }
        let m: Vec<f32> = (0..256).map(|v| v as f32).collect();
        let mut got = [0f32; 256];
        // SAFETY: feature checked above; 256 values each.
        unsafe {
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, v) in r.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(m.as_ptr().add(16 * i));
            }
            transpose16(&mut r);
            for (i, v) in r.iter().enumerate() {
                _mm512_storeu_ps(got.as_mut_ptr().add(16 * i), *v);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[16 * i + j], m[16 * j + i], "({i}, {j})");
            }
        }
    }

    #[test]
    fn pack_panel_places_columns_of_any_row_range() {
        // Full panels, one full group of 16 rows, fewer; column ranges inside wider rows.
        for (valid, stride, c0, k) in [(32, 70, 3, 64), (32, 40, 0, 40), (23, 50, 7, 33), (16, 16, 0, 16), (9, 30, 5, 20), (1, 8, 0, 8)] {
            let rows = crate::model::quant::test_values(valid * stride, (stride + k) as u64);
            let mut got = vec![f32::NAN; k * XR];
            pack_panel(&rows, stride, c0, valid, k, &mut got);
            for c in 0..k {
                for i in 0..XR {
                    let want = if i < valid { rows[i * stride + c0 + c] } else { 0.0 };
                    assert_eq!(got[c * XR + i], want, "valid={valid} c0={c0} k={k} ({i}, {c})");
                }
            }
        }
    }

    #[test]
    fn interleave_matches_the_layout() {
        if !available() {
            return;
        }
        for (m, kc) in [(12, 40), (5, 33), (1, 7), (12, 512)] {
            let rows: Vec<Vec<half::bf16>> = (0..m)
                .map(|j| crate::model::quant::test_values(kc, j as u64 + 1).iter().map(|&v| half::bf16::from_f32(v)).collect())
                .collect();
            let srcs: Vec<&[half::bf16]> = rows.iter().map(|r| &r[..]).collect();
            let mut got = vec![f32::NAN; m * kc];
            // SAFETY: feature checked above; sizes as documented.
            unsafe { interleave_bf16(&srcs, kc, &mut got) };
            for (j, r) in rows.iter().enumerate() {
                for (p, v) in r.iter().enumerate() {
                    assert_eq!(got[weight_index(j, p, m, kc)], v.to_f32(), "m={m} kc={kc} ({j}, {p})");
                }
            }
        }
    }

    #[test]
    fn matches_f64_for_every_tile_shape() {
        if !available() {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        for (n, k, rows) in [(1, 7, 1), (5, 64, 13), (33, 100, 6), (40, 3072, 25), (7, 33, 20), (64, 16, 7), (50, 40, 48), (32, 9, 37)] {
            let x = crate::model::quant::test_values(n * k, k as u64);
            let w = crate::model::quant::test_values(rows * k, 3 + k as u64);
            let bias: Vec<f32> = (0..rows).map(|j| j as f32 * 0.25 - 1.0).collect();
            let mut y = vec![f32::NAN; n * rows];
            let xp = pack(&x, n, k);
            // Two column blocks (k0 = 0 stores with the bias, the second adds), as the caller
            // splits k.
            let half = k / 2;
            for (k0, kc) in [(0, half), (half, k - half)] {
                if kc == 0 {
                    continue;
                }
                let mut wp = vec![f32::NAN; rows * kc];
                for (r, row) in w.chunks(k).enumerate() {
                    for (p, &v) in row[k0..k0 + kc].iter().enumerate() {
                        wp[weight_index(r, p, rows, kc)] = v;
                    }
                }
                // SAFETY: feature checked above; sizes as documented.
                unsafe { gemm(&xp, n, k, (k0, kc), &wp, rows, Some(&bias), Out { ptr: y.as_mut_ptr(), stride: rows }, &mut Vec::new()) };
            }
            for i in 0..n {
                for j in 0..rows {
                    let want: f64 = bias[j] as f64 + (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>();
                    let tol = 1e-6 * (1.0 + want.abs()) * (k as f64).sqrt();
                    assert!((y[i * rows + j] as f64 - want).abs() <= tol, "n={n} k={k} ({i},{j}): {} vs {want}", y[i * rows + j]);
                }
            }
        }
    }
}
