//! The prefill (many-row) products behind [`super::product`]: the int8 GEMM for quantised
//! weights, the `vdpbf16ps` tile over blocks of weight rows, and the f32 tile (or the `gemm`
//! crate) over weights widened to f32, with the blocking and thread split of each.

use std::borrow::Cow;

use half::bf16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::{bf16dot, f32gemm, qgemm};
use super::{add_bias, Out, SharedOut, Source};
use crate::model::quant::{QActs, QMatrix};

/// Bytes of weight rows kept in L2 at once on the GEMM paths.
const W_BLOCK_BYTES: usize = 384 << 10;
/// Bytes of f32 weight rows kept in L2 at once by the AVX-512F f32 GEMM.
#[cfg(target_arch = "x86_64")]
const F32_BLOCK_BYTES: usize = 1 << 20;
/// Packed f32 activations above which [`f32_tile_gemm`] splits the panels over the threads (a
/// 512-token decoder prefill, 6 MB, keeps the row-block split: it measured 7% slower split).
#[cfg(target_arch = "x86_64")]
const X_SPLIT_BYTES: usize = 16 << 20;
/// Bytes of activation rows (bf16) per panel on the tiled path (stays in L3).
const X_PANEL_BYTES: usize = 4 << 20;

impl Source<'_> {
    /// Rows `first..first+rows` as bf16 (`k` values each).
    fn bf16_rows(&self, first: usize, rows: usize, k: usize) -> Cow<'_, [bf16]> {
        match self {
            Source::Bf16(w) => Cow::Borrowed(&w[first * k..(first + rows) * k]),
            Source::Quant(q) => {
                let mut out = vec![bf16::ZERO; rows * k];
                for (r, o) in out.chunks_mut(k).enumerate() {
                    let (wq, wd) = q.row(first + r);
                    #[cfg(target_arch = "x86_64")]
                    if bf16dot::available() {
                        // SAFETY: the features were just detected; `o` holds the row's k values.
                        unsafe { bf16dot::dequantize(q.qtype(), wq, wd, o) };
                        continue;
                    }
                    let mut tmp = vec![0f32; k];
                    crate::model::quant::dequantize_row(q.qtype(), wq, wd, &mut tmp);
                    for (d, v) in o.iter_mut().zip(&tmp) {
                        *d = bf16::from_f32(*v);
                    }
                }
                Cow::Owned(out)
            }
        }
    }

    /// Tile `t` (rows `t·WR..`) of columns `k0..k0+kc` of the block of rows
    /// `first..first+rows`, as f32 into `dst` (that tile's part of the f32 tile's weight layout,
    /// [`f32gemm::weight_index`]); `row` is scratch. Quantised rows are dequantised whole, so
    /// they are read with `kc = k`.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    fn f32_tile_into(&self, first: usize, rows: usize, k: usize, (k0, kc): (usize, usize), t: usize, dst: &mut [f32], row: &mut Vec<f32>) {
        let r0 = t * f32gemm::WR;
        let m = f32gemm::WR.min(rows - r0);
        // Column by column of the tile: contiguous stores, m sequential reads.
        match self {
            Source::Bf16(w) => {
                let srcs: [&[bf16]; f32gemm::WR] = std::array::from_fn(|jj| if jj < m { &w[(first + r0 + jj) * k + k0..][..kc] } else { &[] });
                // SAFETY: the caller runs this only with AVX-512F; m ≤ WR ≤ 16 sources of kc
                // values; dst holds this tile's m·kc values.
                unsafe { f32gemm::interleave_bf16(&srcs[..m], kc, &mut dst[..m * kc]) };
            }
            Source::Quant(q) => {
                row.resize(m * k, 0.0);
                for (jj, r) in row.chunks_exact_mut(k).enumerate() {
                    q.dequantize_row(first + r0 + jj, r);
                }
                for (p, col) in dst.chunks_exact_mut(m).take(kc).enumerate() {
                    for (jj, d) in col.iter_mut().enumerate() {
                        *d = row[jj * k + k0 + p];
                    }
                }
            }
        }
    }

    /// Rows `first..first+rows` as f32 into `out` (resized to `rows·k`).
    fn f32_rows_into(&self, first: usize, rows: usize, k: usize, out: &mut Vec<f32>) {
        out.resize(rows * k, 0.0);
        match self {
            Source::Bf16(w) => {
                for (o, v) in out.iter_mut().zip(&w[first * k..(first + rows) * k]) {
                    *o = v.to_f32();
                }
            }
            Source::Quant(q) => {
                for (r, o) in out.chunks_mut(k).enumerate() {
                    q.dequantize_row(first + r, o);
                }
            }
        }
    }
}

/// Prefill path for quantised weights with AVX-512 VNNI: the activations quantised to int8
/// once, blocks of weight rows (kept in L2) over the threads, each through [`qgemm::gemm`].
#[cfg(target_arch = "x86_64")]
pub(super) fn quant_gemm(x: &[f32], n: usize, q: &QMatrix) -> Vec<f32> {
    let (k, out) = (q.cols(), q.rows());
    let mut acts = QActs::default();
    acts.quantize(x, k, q.qtype());
    let start = qgemm::start_sums(&acts, q.qtype());
    let mut y = vec![0f32; n * out];
    let ptr = SharedOut(y.as_mut_ptr());
    row_blocks(W_BLOCK_BYTES, q.qtype().row_bytes(k), out, qgemm::tile_rows()).into_par_iter().for_each(|(first, rows)| {
        let p = ptr;
        // SAFETY: `takes` checked the CPU and the width; `acts` holds n rows quantised for
        // q's format; this task writes only columns first..first+rows of `y` (n·out values).
        unsafe { qgemm::gemm(&acts, &start, 0, n, q, first, rows, Out { ptr: p.0.add(first), stride: out }) };
    });
    y
}

/// Blocks of weight rows `(first, rows)` for the threads: at most `budget` bytes of rows of
/// `row_bytes` each (as near as the register tile's `tile` rows allows), at least four per
/// thread, their count a multiple of the threads, and the tiles spread evenly (blocks differ by
/// at most one tile, the larger ones spread over the range): 9 blocks over 2 threads left one
/// idle for a ninth of every product, and equal blocks with a short last one (1024 rows as 7 ×
/// 132 + 100) left one idle for 6%.
pub(super) fn row_blocks(budget: usize, row_bytes: usize, out: usize, tile: usize) -> Vec<(usize, usize)> {
    let threads = rayon::current_num_threads().max(1);
    let tile = tile.max(1);
    let by_cache = (budget / row_bytes.max(1)).max(tile) / tile * tile;
    let per_thread = out.div_ceil(threads * by_cache).max(4);
    let tiles = out.div_ceil(tile);
    let count = (threads * per_thread).min(tiles);
    let mut first = 0;
    (0..count)
        .map(|b| {
            let t = (b + 1) * tiles / count - b * tiles / count;
            let rows = (t * tile).min(out - first);
            first += rows;
            (first - rows, rows)
        })
        .collect()
}

/// Prefill path with AVX-512 BF16: panels of activation rows, and within a panel blocks of
/// weight rows over the threads, each block multiplied by the register-tiled kernel.
#[cfg(target_arch = "x86_64")]
pub(super) fn tiled_gemm(x: &[bf16], n: usize, k: usize, w: Source<'_>, out: usize) -> Vec<f32> {
    // Quantised blocks are dequantised in storage order: permute the activations to match.
    let permuted;
    let x = match w {
        Source::Quant(q) => {
            let mut p = vec![bf16::ZERO; x.len()];
            crate::model::quant::to_run_order(x, &mut p, k, q.qtype());
            permuted = p;
            &permuted[..]
        }
        Source::Bf16(_) => x,
    };
    let mut y = vec![0f32; n * out];
    let ptr = SharedOut(y.as_mut_ptr());
    let blocks = row_blocks(W_BLOCK_BYTES, 2 * k, out, bf16dot::NR);
    let panel = (X_PANEL_BYTES / (2 * k.max(1))).max(4) / 4 * 4;
    let mut first_row = 0;
    while first_row < n {
        let rows_x = panel.min(n - first_row);
        let xs = &x[first_row * k..(first_row + rows_x) * k];
        blocks.par_iter().for_each(|&(first, rows)| {
            let wb = w.bf16_rows(first, rows, k);
            let p = ptr;
            // SAFETY: AVX-512 BF16 is checked by the caller; `xs` holds rows_x·k values and
            // `wb` rows·k; this task writes only columns first..first+rows of rows
            // first_row..first_row+rows_x of `y` (n·out values).
            unsafe {
                let o = Out { ptr: p.0.add(first_row * out + first), stride: out };
                bf16dot::gemm(xs, rows_x, k, &wb, rows, o);
            }
        });
        first_row += rows_x;
    }
    y
}

/// Prefill path without AVX-512 BF16 (or with f32 activations): widen (or dequantise) a block
/// of weight rows to f32 and multiply with an f32 GEMM, blocks split over the threads.
/// (Measured on the full decoder, 128-token prefill: 20.8 tok/s; widening the whole weight and
/// one threaded GEMM instead: 11.6 tok/s.)
pub(super) fn blocked_gemm(x: &[f32], n: usize, k: usize, w: Source<'_>, out: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0f32; n * out];
    let ptr = SharedOut(y.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if f32gemm::available() {
        f32_tile_gemm(x, n, k, w, bias, &mut y, out);
        return y;
    }
    row_blocks(W_BLOCK_BYTES, 2 * k, out, 4).into_par_iter().for_each(|(first, rows)| {
        let mut wf = Vec::new();
        w.f32_rows_into(first, rows, k, &mut wf);
        let p = ptr;
        // SAFETY: every pointer covers the extent implied by its dims and strides: dst is
        // columns first..first+rows of y (n rows, stride out; only this task writes them),
        // x n×k (row stride k), wf rows×k read as k×rows.
        unsafe {
            gemm::gemm(
                n,
                rows,
                k,
                p.0.add(first),
                1,
                out as isize,
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
    });
    add_bias(&mut y, out, bias);
    y
}

/// The AVX-512F f32 tile over blocks of weights widened (or dequantised) to f32. Blocks of whole
/// weight rows (kept in L2) are split over the threads and each task runs all the panels of
/// activation rows — unless the packed activations are large (more than [`X_SPLIT_BYTES`], with
/// at least two panels per thread: the encoders' 4096-row batches): then bf16 weights go in
/// blocks of [`f32gemm::K_BLOCK`] columns whose sums are added into `y`, each block widened once
/// (its tiles over the threads), and the panels are split over the threads, so a block's rows
/// fill L2 whatever the width (every activation value read meets up to 512 weight rows instead
/// of `fc2`'s 60). Measured in the README (`cargo bench -p phi4mm --bench kernels -- encoder`).
#[cfg(target_arch = "x86_64")]
fn f32_tile_gemm(x: &[f32], n: usize, k: usize, w: Source<'_>, bias: Option<&[f32]>, y: &mut [f32], out: usize) {
    let xp = f32gemm::pack(x, n, k);
    let ptr = SharedOut(y.as_mut_ptr());
    let panels = n.div_ceil(f32gemm::XR);
    let threads = rayon::current_num_threads().max(1);
    let split = panels >= 2 * threads && 4 * n * k > X_SPLIT_BYTES;
    let k_block = match w {
        Source::Bf16(_) if split => f32gemm::K_BLOCK.min(k.max(1)),
        _ => k.max(1),
    };
    let by_cache = (F32_BLOCK_BYTES / (4 * k_block)).max(f32gemm::WR) / f32gemm::WR * f32gemm::WR;
    // One block of weights times the panels `ps` (this task alone writes their rows of
    // columns first..first+rows of y).
    let run = |wf: &[f32], first: usize, rows: usize, (k0, kc): (usize, usize), ps: std::ops::Range<usize>, acc: &mut Vec<f32>| {
        let p = ptr;
        let b = bias.map(|b| &b[first..first + rows]);
        let (x0, n0) = (ps.start * f32gemm::XR, (ps.end * f32gemm::XR).min(n));
        // SAFETY: AVX-512F was detected (the caller); `xp` packs x's n rows, so from panel
        // ps.start on it packs n0 − x0 rows; `wf` holds rows×kc values; the output pointer
        // covers rows x0..n0 of columns first.. of y (n·out values).
        unsafe {
            let o = Out { ptr: p.0.add(x0 * out + first), stride: out };
            f32gemm::gemm(&xp[x0 * k..], n0 - x0, k, (k0, kc), wf, rows, b, o, acc);
        }
    };
    if split {
        let mut wf = vec![0f32; by_cache.min(out) * k_block];
        for first in (0..out).step_by(by_cache) {
            let rows = by_cache.min(out - first);
            for k0 in (0..k).step_by(k_block) {
                let kc = k_block.min(k - k0);
                let wf = &mut wf[..rows * kc];
                // The block's tiles widened over the threads.
                wf.par_chunks_mut(f32gemm::WR * kc).enumerate().for_each(|(t, dst)| {
                    ROW.with_borrow_mut(|row| w.f32_tile_into(first, rows, k, (k0, kc), t, dst, row))
                });
                let wf = &*wf;
                (0..panels).into_par_iter().for_each(|p| ACC.with_borrow_mut(|acc| run(wf, first, rows, (k0, kc), p..p + 1, acc)));
            }
        }
        return;
    }
    row_blocks(F32_BLOCK_BYTES, 4 * k_block, out, f32gemm::WR).into_par_iter().for_each(|(first, rows)| {
        WIDE.with_borrow_mut(|wf| {
            wf.resize(rows * k_block, 0.0);
            ACC.with_borrow_mut(|acc| {
                for k0 in (0..k).step_by(k_block) {
                    let kc = k_block.min(k - k0);
                    ROW.with_borrow_mut(|row| {
                        for (t, dst) in wf[..rows * kc].chunks_mut(f32gemm::WR * kc).enumerate() {
                            w.f32_tile_into(first, rows, k, (k0, kc), t, dst, row);
                        }
                    });
                    run(&wf[..rows * kc], first, rows, (k0, kc), 0..panels, acc);
                }
            })
        });
    });
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The f32 tile's per-thread sums of one panel.
    static ACC: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A weight block widened to f32, kept per thread from block to block (a fresh one per
    /// block was page-faulted in every time: 8% of a bf16 prefill's CPU time).
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One weight row widened or dequantised on its way into the tile layout.
    static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::row_blocks;

    #[test]
    fn row_blocks_cover_the_rows_evenly() {
        let threads = rayon::current_num_threads().max(1);
        for (budget, row_bytes, out, tile) in [(1 << 20, 4096, 1024, 12), (1 << 20, 4096, 3072, 12), (1 << 20, 6144, 1024, 12), (1 << 20, 2048, 16384, 4), (1 << 20, 4096, 7, 12), (1 << 20, 4096, 100, 16), (64, 4096, 50, 4), (1 << 20, 4096, 0, 12)] {
            let b = row_blocks(budget, row_bytes, out, tile);
            let mut next = 0;
            for (i, &(first, rows)) in b.iter().enumerate() {
                assert_eq!(first, next, "{out}: block {i} is not contiguous");
                assert!(rows > 0 && (rows % tile == 0 || i + 1 == b.len()), "{out}: block {i} has {rows} rows");
                next += rows;
            }
            assert_eq!(next, out, "{out}: the blocks do not cover the rows");
            let tiles: Vec<usize> = b.iter().map(|&(_, r)| r.div_ceil(tile)).collect();
            let (lo, hi) = (tiles.iter().min().copied().unwrap_or(0), tiles.iter().max().copied().unwrap_or(0));
            assert!(hi - lo <= 1, "{out}: blocks of {lo} to {hi} tiles");
            // (Unless the budget leaves fewer tiles than blocks wanted: the last case but one.)
            if out.div_ceil(tile) >= 4 * threads && budget >= row_bytes * tile {
                assert_eq!(b.len() % threads, 0, "{out}: {} blocks over {threads} threads", b.len());
            }
        }
    }
}

