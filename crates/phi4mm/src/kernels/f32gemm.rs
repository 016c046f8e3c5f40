//! f32 × f32 register-tiled product with AVX-512F FMAs, for prefill where AVX-512 BF16 is
//! missing (or the activations are f32). The `gemm` crate's kernels stop at 256-bit FMAs
//! without its nightly feature; this one uses 512-bit FMAs with embedded broadcasts.
//!
//! The activations are packed once per call into panels of [`XR`] rows interleaved along `k`
//! ([`pack`]: for each column, the panel's 32 values, zero past the last row), so one column
//! of a panel is two vectors. The caller widens (or dequantises) a block of weight rows to f32
//! once, kept in L2; a tile of [`WR`] weight rows × one panel then keeps 24 accumulators in
//! registers: per column, two vector loads of the panel and one broadcast of each weight
//! row's value feed 24 FMAs. Each accumulator holds finished sums for 16 activation rows of
//! one weight row (no horizontal sums).

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
        std::arch::is_x86_feature_detected!("avx512f")
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
        for (i, row) in rows.chunks_exact(k).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                panel[c * XR + i] = v;
            }
        }
    });
    p
}

/// Where weight `(r, p)` of `rows` rows of `k` goes in the tile layout [`tiles`] reads:
/// rows in tiles of [`WR`] (the last one narrower), each tile interleaved along `k`, so one
/// column of a tile is its rows' values side by side.
#[inline(always)]
pub fn weight_index(r: usize, p: usize, rows: usize, k: usize) -> usize {
    let j = r / WR * WR;
    j * k + p * WR.min(rows - j) + (r - j)
}

/// `x` (packed by [`pack`] from `n` rows of `k`) · `w` `[rows, k]`ᵀ into `out` `[n, rows]`,
/// plus `bias[j]` on column `j` when given; `wp` holds the weights in the [`weight_index`]
/// layout.
///
/// # Safety
/// Only call when [`available`] is true; `xp` is `pack(x, n, k)`, `wp` holds `rows·k` values,
/// `bias` (if any) `rows`, and `out` covers `n` rows of `rows` columns that no other thread
/// writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn gemm(xp: &[f32], n: usize, k: usize, wp: &[f32], rows: usize, bias: Option<&[f32]>, out: Out) {
    let mut tmp = [0f32; XR];
    for panel in 0..n.div_ceil(XR) {
        let xs = xp.as_ptr().add(panel * k * XR);
        let valid = (n - panel * XR).min(XR);
        let o = out.ptr.add(panel * XR * out.stride);
        tiles(xs, wp.as_ptr(), k, rows, |j, a0, a1| {
            let b = bias.map_or(0.0, |b| b[j]);
            _mm512_storeu_ps(tmp.as_mut_ptr(), a0);
            _mm512_storeu_ps(tmp.as_mut_ptr().add(16), a1);
            for (i, &v) in tmp.iter().take(valid).enumerate() {
                *o.add(i * out.stride + j) = v + b;
            }
        });
    }
}

// `tiles` has tiles for 1..=12 weight rows.
const _: () = assert!(WR <= 12 && XR == 32);

/// One panel `xs` (`k` columns of [`XR`] values) times `rows` weight rows of `k` (in the
/// [`weight_index`] layout) in tiles of up to [`WR`] rows; `store(j, a0, a1)` receives weight
/// row `j`'s sums for the panel's rows 0..16 and 16..32.
///
/// # Safety
/// Only call when [`available`] is true; `xs` holds `k·XR` values and `wp` `rows·k`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn tiles(xs: *const f32, wp: *const f32, k: usize, rows: usize, mut store: impl FnMut(usize, __m512, __m512)) {
    let mut j = 0;
    while j < rows {
        let m = (rows - j).min(WR);
        let wj = wp.add(j * k);
        let mut put = |jj: usize, a0, a1| store(j + jj, a0, a1);
        macro_rules! tiles {
            ($($m:literal)*) => {
                match m {
                    $($m => tile::<$m>(xs, wj, k, &mut put),)*
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
    fn matches_f64_for_every_tile_shape() {
        if !available() {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        for (n, k, rows) in [(1, 7, 1), (5, 64, 13), (33, 100, 6), (40, 3072, 25), (7, 33, 20), (64, 16, 7)] {
            let x = crate::quant::test_values(n * k, k as u64);
            let w = crate::quant::test_values(rows * k, 3 + k as u64);
            let bias: Vec<f32> = (0..rows).map(|j| j as f32 * 0.25 - 1.0).collect();
            let mut wp = vec![f32::NAN; rows * k];
            for (r, row) in w.chunks(k).enumerate() {
                for (p, &v) in row.iter().enumerate() {
                    wp[weight_index(r, p, rows, k)] = v;
                }
            }
            let mut y = vec![f32::NAN; n * rows];
            let xp = pack(&x, n, k);
            // SAFETY: feature checked above; sizes as documented.
            unsafe { gemm(&xp, n, k, &wp, rows, Some(&bias), Out { ptr: y.as_mut_ptr(), stride: rows }) };
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
