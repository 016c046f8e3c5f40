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

/// `x` `[n, k]` → panels `[⌈n/XR⌉, k, XR]` (rows past `n` are zero).
pub fn pack(x: &[f32], n: usize, k: usize) -> Vec<f32> {
    let panels = n.div_ceil(XR);
    let mut p = vec![0f32; panels * k * XR];
    for (i, row) in x.chunks_exact(k.max(1)).take(n).enumerate() {
        let base = (i / XR) * k * XR + i % XR;
        for (c, &v) in row.iter().enumerate() {
            p[base + c * XR] = v;
        }
    }
    p
}


/// `x` (packed by [`pack`] from `n` rows of `k`) · `w` `[rows, k]`ᵀ into `out` `[n, rows]`.
///
/// # Safety
/// Only call when [`available`] is true; `xp` is `pack(x, n, k)`, `w` holds `rows·k` values,
/// and `out` covers `n` rows of `rows` columns that no other thread writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn gemm(xp: &[f32], n: usize, k: usize, w: &[f32], rows: usize, out: Out) {
    for panel in 0..n.div_ceil(XR) {
        let xs = xp.as_ptr().add(panel * k * XR);
        let valid = (n - panel * XR).min(XR);
        let o = Out { ptr: out.ptr.add(panel * XR * out.stride), stride: out.stride };
        let mut j = 0;
        while j < rows {
            let m = (rows - j).min(WR);
            let (wj, oj) = (w.as_ptr().add(j * k), Out { ptr: o.ptr.add(j), stride: o.stride });
            macro_rules! tiles {
                ($($m:literal)*) => {
                    match m {
                        $($m => tile::<$m>(xs, wj, k, valid, oj),)*
                        _ => {}
                    }
                };
            }
            tiles!(1 2 3 4 5 6 7 8 9 10 11 12);
            j += m;
        }
    }
}

// `gemm` has tiles for 1..=12 weight rows.
const _: () = assert!(WR <= 12 && XR == 32);

/// `M` weight rows × one panel over all of `k`; writes the first `valid` activation rows.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const M: usize>(xs: *const f32, w: *const f32, k: usize, valid: usize, out: Out) {
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    for p in 0..k {
        let x0 = _mm512_loadu_ps(xs.add(p * XR));
        let x1 = _mm512_loadu_ps(xs.add(p * XR + 16));
        for (j, a) in acc.iter_mut().enumerate() {
            let b = _mm512_set1_ps(*w.add(j * k + p));
            a[0] = _mm512_fmadd_ps(x0, b, a[0]);
            a[1] = _mm512_fmadd_ps(x1, b, a[1]);
        }
    }
    let mut tmp = [0f32; XR];
    for (j, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(tmp.as_mut_ptr(), a[0]);
        _mm512_storeu_ps(tmp.as_mut_ptr().add(16), a[1]);
        for (i, &v) in tmp.iter().take(valid).enumerate() {
            *out.ptr.add(i * out.stride + j) = v;
        }
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
            let mut y = vec![f32::NAN; n * rows];
            let xp = pack(&x, n, k);
            // SAFETY: feature checked above; sizes as documented.
            unsafe { gemm(&xp, n, k, &w, rows, Out { ptr: y.as_mut_ptr(), stride: rows }) };
            for i in 0..n {
                for j in 0..rows {
                    let want: f64 = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
                    let tol = 1e-6 * (1.0 + want.abs()) * (k as f64).sqrt();
                    assert!((y[i * rows + j] as f64 - want).abs() <= tol, "n={n} k={k} ({i},{j}): {} vs {want}", y[i * rows + j]);
                }
            }
        }
    }
}
