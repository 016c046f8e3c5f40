//! Block-quantised weight matrices: Q8_0 and Q4_0, the block formats of GGML (32 weights per
//! block sharing one f16 scale `d`), made from bf16/f32 weights at load or read from a file
//! written by `phi4mm quantize`.
//!
//! * Q8_0: `w = d·q`, `q` int8, `d = max|w| / 127`, `q = round(w / d)` — 8.5 bits per weight.
//! * Q4_0: `w = d·(q − 8)`, `q` in 0..=15, `d = m / −8` where `m` is the weight of largest
//!   magnitude (sign kept), `q = min(15, trunc(w/d + 8.5))` — 4.5 bits per weight.
//! * Q6_0 (ours; the 6-bit LM head of Q4_0 models, as llama.cpp gives them a 6-bit Q6_K head):
//!   the Q4_0 rule with 64 levels, `w = d·(q − 32)`, `d = m / −32` — 6.5 bits per weight.
//!
//! Storage differs from GGML's interleaved blocks: a matrix keeps its quants and its scales in
//! two arrays (`qs` `[rows, row_bytes]`, `d` `[rows, cols/32]` f16), and inside a row every run
//! of 16 blocks (512 weights) is interleaved four bytes at a time: 64-byte chunk `t` holds, for
//! each block `j` of the run, four consecutive quants (Q8_0: weights `4t..4t+4` of block `j`;
//! Q4_0: weights `4t..4t+4` in the low nibbles and `16+4t..16+4t+4` in the high ones). One
//! `vpdpbusd` then leaves each 32-bit lane with one block's partial sum, so a run of 16 blocks
//! costs one int→float conversion and one multiply-add (see `kernels::qdot`). Blocks after the
//! last whole run are stored one after another (Q4_0: two blocks share 32 bytes, the first in
//! the low nibbles; a lone last block packs weight `i` low and `i + 16` high, as GGML does).
//! Q6_0 stores the low four bits of each quant exactly as Q4_0 does (256 bytes per run),
//! followed by the top two bits (128 bytes per run): for nibble chunk `t`, the bits of its
//! low-nibble values sit at bits `4(t mod 2)..+2` of high-bit chunk `t/2` (same byte
//! positions), those of its high-nibble values two bits above. A tail block is its 16 nibble
//! bytes (weight `i` low, `i + 16` high) then 8 bytes with weight `i`'s top bits at byte
//! `i mod 8`, bits `2(i/8)..+2`.

use std::sync::Arc;

use half::f16;
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Weights per block.
pub const BLOCK: usize = 32;
/// Blocks interleaved together in a row.
pub const GROUP: usize = 16;

/// A block quantisation format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    Q8_0,
    Q4_0,
    Q6_0,
}

impl QType {
    /// Parses `q8_0` / `q4_0` (case-insensitive); `none`, `bf16` and the empty string mean
    /// "not quantised".
    pub fn parse(s: &str) -> Result<Option<QType>> {
        match s.to_ascii_lowercase().as_str() {
            "" | "none" | "bf16" => Ok(None),
            "q8_0" | "q8" => Ok(Some(QType::Q8_0)),
            "q4_0" | "q4" => Ok(Some(QType::Q4_0)),
            "q6_0" | "q6" => Ok(Some(QType::Q6_0)),
            other => Err(Error::Request(format!(
                "unknown weight format `{other}` (use none, q8_0, q6_0 or q4_0)"
            ))),
        }
    }

    /// The format's name (`q8_0`, `q4_0`).
    pub fn name(self) -> &'static str {
        match self {
            QType::Q8_0 => "q8_0",
            QType::Q4_0 => "q4_0",
            QType::Q6_0 => "q6_0",
        }
    }

    /// The format of the tied embedding / LM head when the projections are in `self`: Q6_0
    /// under Q4_0 and Q8_0 otherwise (llama.cpp gives the output matrix Q6_K under its 4-bit
    /// formats and keeps Q8_0 under Q8_0).
    pub fn head_format(self) -> QType {
        if self == QType::Q4_0 {
            QType::Q6_0
        } else {
            QType::Q8_0
        }
    }

    /// Bytes of quants in one row of `cols` weights.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / BLOCK * self.block_bytes()
    }

    /// Bytes of quants per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q8_0 => BLOCK,
            QType::Q4_0 => BLOCK / 2,
            QType::Q6_0 => BLOCK / 2 + BLOCK / 4,
        }
    }

    /// Within a run of 16 interleaved blocks, the weight (`block·32 + i`) that the `p`-th
    /// value of the run's storage order holds (Q4_0 and Q6_0: each 64-byte chunk's low nibbles,
    /// then its high nibbles). Kernels that decode a run in storage order permute activations
    /// with it.
    pub fn run_order(self, p: usize) -> usize {
        match self {
            QType::Q8_0 => {
                let (t, r) = (p / 64, p % 64);
                (r / 4) * BLOCK + 4 * t + r % 4
            }
            QType::Q4_0 | QType::Q6_0 => {
                let (t, r) = (p / 128, p % 128);
                let (h, r) = (r / 64, r % 64);
                (r / 4) * BLOCK + h * 16 + 4 * t + r % 4
            }
        }
    }
}

/// Bytes owned by the matrix, or a range of a mapped quantised checkpoint.
#[derive(Debug)]
pub enum Bytes {
    Owned(Vec<u8>),
    Mapped { map: Arc<Mmap>, start: usize, len: usize },
}

impl Bytes {
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }
}

/// A quantised `[rows, cols]` matrix (`cols` a multiple of 32).
#[derive(Debug)]
pub struct QMatrix {
    qtype: QType,
    rows: usize,
    cols: usize,
    qs: Bytes,
    d: Scales,
}

/// f16 scales: owned, or mapped (2-byte aligned, little-endian).
#[derive(Debug)]
enum Scales {
    Owned(Vec<f16>),
    Mapped(Bytes),
}

impl QMatrix {
    /// Wraps quants and scales, checking their sizes and the scales' alignment.
    pub fn from_parts(qtype: QType, rows: usize, cols: usize, qs: Bytes, d: Bytes) -> Result<Self> {
        let bad = |m: String| Error::Request(format!("{} matrix [{rows}, {cols}]: {m}", qtype.name()));
        if cols % BLOCK != 0 {
            return Err(bad(format!("width must be a multiple of {BLOCK}")));
        }
        if qs.as_slice().len() != rows * qtype.row_bytes(cols) {
            return Err(bad(format!("{} bytes of quants, expected {}", qs.as_slice().len(), rows * qtype.row_bytes(cols))));
        }
        if d.as_slice().len() != rows * (cols / BLOCK) * 2 {
            return Err(bad(format!("{} bytes of scales, expected {}", d.as_slice().len(), rows * cols / BLOCK * 2)));
        }
        // Scales are read as `&[f16]`: mapped ones in place when 2-byte aligned, else copied.
        let d = match d {
            Bytes::Mapped { .. } if d.as_slice().as_ptr().align_offset(2) == 0 => Scales::Mapped(d),
            d => Scales::Owned(
                d.as_slice().chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect(),
            ),
        };
        Ok(QMatrix { qtype, rows, cols, qs, d })
    }

    pub fn qtype(&self) -> QType {
        self.qtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    /// All quants, row after row.
    #[inline]
    pub fn qs(&self) -> &[u8] {
        self.qs.as_slice()
    }

    /// All scales `[rows, blocks]`.
    #[inline]
    pub fn scales(&self) -> &[f16] {
        match &self.d {
            Scales::Owned(v) => v,
            Scales::Mapped(b) => {
                let b = b.as_slice();
                // SAFETY: alignment to 2 was checked in `from_parts`, the host is little-endian
                // (x86_64/aarch64), f16 has no invalid bit patterns, and the length is
                // b.len() / 2 elements of 2 bytes.
                unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<f16>(), b.len() / 2) }
            }
        }
    }

    /// The scales as little-endian bytes (for writing a quantised checkpoint).
    pub fn scale_bytes(&self) -> Vec<u8> {
        self.scales().iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Quants and scales of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> (&[u8], &[f16]) {
        let rb = self.qtype.row_bytes(self.cols);
        let nb = self.blocks();
        (&self.qs()[r * rb..(r + 1) * rb], &self.scales()[r * nb..(r + 1) * nb])
    }

    /// Bytes held (quants + scales).
    pub fn nbytes(&self) -> usize {
        self.qs.as_slice().len() + self.scales().len() * 2
    }

    /// Quantises `w` `[rows, cols]` (rows in parallel).
    pub fn quantize(qtype: QType, w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if cols % BLOCK != 0 || w.len() != rows * cols {
            return Err(Error::Request(format!(
                "cannot quantise a [{rows}, {cols}] matrix from {} values: the width must be a multiple of {BLOCK}",
                w.len()
            )));
        }
        QMatrix::quantize_rows(qtype, rows, cols, |r, out| out.copy_from_slice(&w[r * cols..(r + 1) * cols]))
    }

    /// Quantises a `[rows, cols]` matrix whose row `r` `fill(r, buf)` writes as f32 (rows in
    /// parallel, one row of f32 per task: a bf16 checkpoint is never widened whole).
    pub fn quantize_rows(
        qtype: QType,
        rows: usize,
        cols: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<Self> {
        if cols % BLOCK != 0 || cols == 0 {
            return Err(Error::Request(format!(
                "cannot quantise a [{rows}, {cols}] matrix: the width must be a multiple of {BLOCK}"
            )));
        }
        let rb = qtype.row_bytes(cols);
        let nb = cols / BLOCK;
        let mut qs = vec![0u8; rows * rb];
        let mut d = vec![f16::ZERO; rows * nb];
        qs.par_chunks_mut(rb)
            .zip(d.par_chunks_mut(nb))
            .enumerate()
            .for_each_init(
                || vec![0f32; cols],
                |buf, (r, (q, d))| {
                    fill(r, buf);
                    quantize_row(qtype, buf, q, d);
                },
            );
        Ok(QMatrix { qtype, rows, cols, qs: Bytes::Owned(qs), d: Scales::Owned(d) })
    }

    /// Row `r` as f32 into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (q, d) = self.row(r);
        dequantize_row(self.qtype, q, d, out);
    }
}

/// Quantises one row `x` into quants `q` and scales `d`.
pub fn quantize_row(qtype: QType, x: &[f32], q: &mut [u8], d: &mut [f16]) {
    let nb = x.len() / BLOCK;
    // Each block's quants as bytes (Q8_0: the int8 bit pattern; Q4_0: 0..=15).
    let mut vals = vec![[0u8; BLOCK]; nb];
    for (b, v) in vals.iter_mut().enumerate() {
        let xs = &x[b * BLOCK..(b + 1) * BLOCK];
        d[b] = match qtype {
            QType::Q8_0 => quantize_block_q8(xs, v),
            QType::Q4_0 => quantize_block_signed_max(xs, v, 8),
            QType::Q6_0 => quantize_block_signed_max(xs, v, 32),
        };
    }
    let runs = nb / GROUP;
    let bb = qtype.block_bytes();
    for g in 0..runs {
        let out = &mut q[g * GROUP * bb..(g + 1) * GROUP * bb];
        out.fill(0);
        for (j, v) in vals[g * GROUP..(g + 1) * GROUP].iter().enumerate() {
            let nibbles = if qtype == QType::Q8_0 { bb } else { BLOCK / 2 };
            for i in 0..nibbles {
                let (t, e) = (i / 4, i % 4);
                out[t * 64 + j * 4 + e] = match qtype {
                    QType::Q8_0 => v[i],
                    QType::Q4_0 | QType::Q6_0 => (v[i] & 0x0F) | (v[i + 16] << 4),
                };
                if qtype == QType::Q6_0 {
                    let shift = 4 * (t % 2);
                    out[256 + (t / 2) * 64 + j * 4 + e] |= ((v[i] >> 4) << shift) | ((v[i + 16] >> 4) << (shift + 2));
                }
            }
        }
    }
    let mut b = runs * GROUP;
    while b < nb {
        let out = &mut q[b * bb..];
        match qtype {
            QType::Q8_0 => {
                out[..BLOCK].copy_from_slice(&vals[b]);
                b += 1;
            }
            QType::Q4_0 if b + 1 < nb => {
                for i in 0..BLOCK {
                    out[i] = vals[b][i] | (vals[b + 1][i] << 4);
                }
                b += 2;
            }
            QType::Q4_0 => {
                for i in 0..BLOCK / 2 {
                    out[i] = vals[b][i] | (vals[b][i + BLOCK / 2] << 4);
                }
                b += 1;
            }
            QType::Q6_0 => {
                out[..bb].fill(0);
                for i in 0..BLOCK {
                    let v = vals[b][i];
                    if i < BLOCK / 2 {
                        out[i] = (v & 0x0F) | (vals[b][i + BLOCK / 2] << 4);
                    }
                    out[BLOCK / 2 + i % 8] |= (v >> 4) << (2 * (i / 8));
                }
                b += 1;
            }
        }
    }
}

/// One Q8_0 block: int8 quants (as bytes) into `q`, returns the scale.
fn quantize_block_q8(x: &[f32], q: &mut [u8; BLOCK]) -> f16 {
    let mut v = [0i8; BLOCK];
    let scale = quantize_i8(x, &mut v);
    for (o, v) in q.iter_mut().zip(v) {
        *o = v as u8;
    }
    f16::from_f32(scale)
}

/// The Q8_0 rule for any vector: `q = round(x / d)` with `d = max|x| / 127`; returns `d`.
/// (Weights' blocks, activations' blocks and the 8-bit KV cache all use it.)
#[inline(always)]
pub fn quantize_i8(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    for (o, v) in q.iter_mut().zip(x) {
        *o = (v * inv).round() as i8;
    }
    scale
}

/// Copies rows of `src` `[n, k]` to `dst` with every run of 512 columns put in `qtype`'s run
/// order (the columns after the last whole run stay in place). Both run orders move groups of
/// four consecutive values of a block, so groups are copied whole.
pub fn to_run_order<T: Copy>(src: &[T], dst: &mut [T], k: usize, qtype: QType) {
    let run = GROUP * BLOCK;
    let mut from = [0usize; GROUP * BLOCK / 4];
    for (g, f) in from.iter_mut().enumerate() {
        *f = qtype.run_order(4 * g);
    }
    for (src, dst) in src.chunks(k.max(1)).zip(dst.chunks_mut(k.max(1))) {
        let whole = k / run * run;
        dst[whole..].copy_from_slice(&src[whole..]);
        for (src, dst) in src[..whole].chunks_exact(run).zip(dst[..whole].chunks_exact_mut(run)) {
            for (g, &f) in from.iter().enumerate() {
                dst[4 * g..4 * g + 4].copy_from_slice(&src[f..f + 4]);
            }
        }
    }
}

/// One Q4_0 (`half` = 8) or Q6_0 (`half` = 32) block: unsigned quants (0..2·half) into `q`,
/// returns the scale `m / −half` (`m` the value of largest magnitude).
fn quantize_block_signed_max(x: &[f32], q: &mut [u8; BLOCK], half: i32) -> f16 {
    let mut m = 0f32;
    for &v in x {
        if v.abs() > m.abs() {
            m = v;
        }
    }
    let scale = m / -(half as f32);
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = ((v * inv + half as f32 + 0.5) as i32).clamp(0, 2 * half - 1) as u8;
    }
    f16::from_f32(scale)
}

/// The signed quants of block `b` of a row of `nb` blocks (Q4_0: `q − 8`, Q6_0: `q − 32`).
#[inline]
pub fn unpack_block(qtype: QType, q: &[u8], b: usize, nb: usize, out: &mut [i8; BLOCK]) {
    let runs = nb / GROUP;
    let bb = qtype.block_bytes();
    if b < runs * GROUP {
        let (g, j) = (b / GROUP, b % GROUP);
        let run = &q[g * GROUP * bb..(g + 1) * GROUP * bb];
        let nibbles = if qtype == QType::Q8_0 { bb } else { BLOCK / 2 };
        for i in 0..nibbles {
            let (t, e) = (i / 4, i % 4);
            let byte = run[t * 64 + j * 4 + e];
            match qtype {
                QType::Q8_0 => out[i] = byte as i8,
                QType::Q4_0 => {
                    out[i] = (byte & 0x0F) as i8 - 8;
                    out[i + 16] = (byte >> 4) as i8 - 8;
                }
                QType::Q6_0 => {
                    let top = run[256 + (t / 2) * 64 + j * 4 + e] >> (4 * (t % 2));
                    out[i] = ((byte & 0x0F) | ((top & 3) << 4)) as i8 - 32;
                    out[i + 16] = ((byte >> 4) | (((top >> 2) & 3) << 4)) as i8 - 32;
                }
            }
        }
        return;
    }
    match qtype {
        QType::Q8_0 => {
            for (o, &v) in out.iter_mut().zip(&q[b * BLOCK..(b + 1) * BLOCK]) {
                *o = v as i8;
            }
        }
        QType::Q6_0 => {
            let bytes = &q[b * bb..(b + 1) * bb];
            for i in 0..BLOCK {
                let nib = if i < BLOCK / 2 { bytes[i] & 0x0F } else { bytes[i - BLOCK / 2] >> 4 };
                let top = (bytes[BLOCK / 2 + i % 8] >> (2 * (i / 8))) & 3;
                out[i] = (nib | (top << 4)) as i8 - 32;
            }
        }
        QType::Q4_0 => {
            // Pairs are counted from the start of the tail.
            let first = runs * GROUP + ((b - runs * GROUP) & !1);
            let bytes = &q[first * bb..];
            if first + 1 < nb {
                let shift = if b == first { 0 } else { 4 };
                for i in 0..BLOCK {
                    out[i] = ((bytes[i] >> shift) & 0x0F) as i8 - 8;
                }
            } else {
                for i in 0..BLOCK / 2 {
                    out[i] = (bytes[i] & 0x0F) as i8 - 8;
                    out[i + BLOCK / 2] = (bytes[i] >> 4) as i8 - 8;
                }
            }
        }
    }
}

/// Row quants + scales → f32 values.
pub fn dequantize_row(qtype: QType, q: &[u8], d: &[f16], out: &mut [f32]) {
    let nb = d.len();
    let mut vals = [0i8; BLOCK];
    for b in 0..nb {
        unpack_block(qtype, q, b, nb, &mut vals);
        let s = d[b].to_f32();
        for (o, &v) in out[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(&vals) {
            *o = s * v as f32;
        }
    }
}

/// The activation dtype of a tensor-free computation: where a tensor op would store its result
/// in that dtype, the f32 value goes through [`Act::round`].
pub trait Act {
    fn round(v: f32) -> f32;
}

/// f32 activations (no rounding).
pub struct F32Act;

impl Act for F32Act {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
}

/// bf16 activations: round to nearest even, as `half::bf16::from_f32` does (NaN kept), in a
/// form the compiler vectorises.
pub struct Bf16Act;

impl Act for Bf16Act {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        let b = v.to_bits();
        let r = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
        if v.is_nan() { v } else { f32::from_bits(r) }
    }
}

/// Activations quantised to int8 per block of 32 (the Q8_0 rule, f32 scales), with each
/// block's `Σq` and `d·Σq` for the kernels that work on unsigned weights, and a copy of the
/// quants in a weight format's run order (see [`QType::run_order`]) for the interleaved
/// kernels.
#[derive(Debug, Default)]
pub struct QActs {
    pub q: Vec<i8>,   // [n, k]
    pub qi: Vec<i8>,  // [n, k], runs of 512 in run order
    pub d: Vec<f32>,  // [n, k/32]
    pub s: Vec<i32>,  // [n, k/32] Σq
    pub ds: Vec<f32>, // [n, k/32] d·Σq
}

impl QActs {
    /// Quantises the rows of `x` `[n, k]` for weights in `qtype` (rows in parallel when there
    /// are more than four: never inside a decode step's team, which runs one row).
    pub fn quantize(&mut self, x: &[f32], k: usize, qtype: QType) {
        let k = k.max(1);
        let blocks = x.len() / BLOCK;
        let nb = k / BLOCK;
        self.q.resize(x.len(), 0);
        self.qi.resize(x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0);
        self.ds.resize(blocks, 0.0);
        let rows = self
            .q
            .chunks_mut(k)
            .zip(self.qi.chunks_mut(k))
            .zip(self.d.chunks_mut(nb.max(1)))
            .zip(self.s.chunks_mut(nb.max(1)))
            .zip(self.ds.chunks_mut(nb.max(1)))
            .zip(x.chunks(k));
        let one = |((((q, qi), d), s), ds): ActRow<'_>, x: &[f32]| quantize_act_row(x, q, qi, d, s, ds, qtype);
        if x.len() > 4 * k {
            rows.par_bridge().for_each(|(r, x)| one(r, x));
        } else {
            rows.for_each(|(r, x)| one(r, x));
        }
    }
}

/// One row's quants, run-ordered quants, scales, sums and scaled sums.
type ActRow<'a> = ((((&'a mut [i8], &'a mut [i8]), &'a mut [f32]), &'a mut [i32]), &'a mut [f32]);

/// One activation row (see [`QActs`]).
fn quantize_act_row(x: &[f32], q: &mut [i8], qi: &mut [i8], d: &mut [f32], s: &mut [i32], ds: &mut [f32], qtype: QType) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::cpu::cpu().avx512f {
        // SAFETY: the feature was just detected.
        unsafe { quantize_blocks_avx512(x, q, d, s, ds) };
    } else {
        quantize_blocks(x, q, d, s, ds);
    }
    #[cfg(not(target_arch = "x86_64"))]
    quantize_blocks(x, q, d, s, ds);
    to_run_order(q, qi, q.len(), qtype);
}

/// [`quantize_blocks`] with AVX-512: the same values ([`quantize_i8`]'s `round` is half away
/// from zero, here `trunc(v + copysign(0.5⁻, v))`, exact for |v| ≤ 2²³).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_blocks_avx512(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [i32], ds: &mut [f32]) {
    use std::arch::x86_64::*;
    let half = _mm512_set1_ps(0.499_999_97);
    let sign = _mm512_set1_epi32(i32::MIN);
    for (b, (xs, qs)) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).enumerate() {
        let v = [_mm512_loadu_ps(xs.as_ptr()), _mm512_loadu_ps(xs.as_ptr().add(16))];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        let scale = amax / 127.0;
        let inv = _mm512_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let mut sum = _mm512_setzero_si512();
        for (h, v) in v.iter().enumerate() {
            let y = _mm512_mul_ps(*v, inv);
            let bias = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(y), sign), _mm512_castps_si512(half)));
            let i = _mm512_cvttps_epi32(_mm512_add_ps(y, bias));
            sum = _mm512_add_epi32(sum, i);
            _mm_storeu_si128(qs.as_mut_ptr().add(16 * h).cast(), _mm512_cvtsepi32_epi8(i));
        }
        let sum = _mm512_reduce_add_epi32(sum);
        d[b] = scale;
        s[b] = sum;
        ds[b] = scale * sum as f32;
    }
}

/// The Q8_0 rule per block of 32 ([`quantize_i8`]), with each block's `Σq` and `d·Σq`.
#[inline(always)]
fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [i32], ds: &mut [f32]) {
    for (b, (xs, qs)) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).enumerate() {
        let scale = quantize_i8(xs, qs);
        let sum = qs.iter().map(|&v| v as i32).sum::<i32>();
        d[b] = scale;
        s[b] = sum;
        ds[b] = scale * sum as f32;
    }
}

/// Deterministic test values uniform in [−0.5, 0.5) (shared by the kernel tests).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        test_values(n, seed).iter().map(|v| v * 0.2).collect()
    }

    #[test]
    fn blocks_round_trip_exactly() -> Result<()> {
        for qtype in [QType::Q8_0, QType::Q4_0, QType::Q6_0] {
            for cols in [32, 64, 96, 512, 544, 608, 3072] {
                let rows = 5;
                let w = sample(rows * cols, cols as u64);
                let m = QMatrix::quantize(qtype, &w, rows, cols)?;
                let mut deq = vec![0f32; rows * cols];
                for r in 0..rows {
                    m.dequantize_row(r, &mut deq[r * cols..(r + 1) * cols]);
                }
                let again = QMatrix::quantize(qtype, &deq, rows, cols)?;
                assert_eq!(m.qs(), again.qs(), "{qtype:?} cols={cols}: quants");
                assert_eq!(m.scale_bytes(), again.scale_bytes(), "{qtype:?} cols={cols}: scales");
                // Error bounded by half a step (Q4_0: a whole step at the end of the range
                // opposite the largest weight, which GGML clamps from 16 to 15).
                for (b, (x, y)) in w.chunks(BLOCK).zip(deq.chunks(BLOCK)).enumerate() {
                    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let step = match qtype {
                        QType::Q8_0 => amax / 127.0,
                        QType::Q4_0 => amax / 4.0,
                        QType::Q6_0 => amax / 16.0,
                    };
                    for (a, c) in x.iter().zip(y) {
                        assert!((a - c).abs() <= 0.5 * step + 2e-3 * amax, "{qtype:?} block {b}: {a} vs {c}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn known_blocks() -> Result<()> {
        // 0, 1, .., 31 scaled: Q8_0 maps the largest to 127.
        let x: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let m = QMatrix::quantize(QType::Q8_0, &x, 1, 32)?;
        assert_eq!(m.qs()[31] as i8, 127);
        assert_eq!(m.qs()[0], 0);
        assert_eq!(m.scales()[0], f16::from_f32(31.0 / 127.0));
        // Q4_0: the largest magnitude (−31) maps to q = 0, the scale is −31 / −8.
        let neg: Vec<f32> = (0..32).map(|i| -(i as f32)).collect();
        let m = QMatrix::quantize(QType::Q4_0, &neg, 1, 32)?;
        assert_eq!(m.scales()[0], f16::from_f32(31.0 / 8.0));
        let mut vals = [0i8; BLOCK];
        unpack_block(QType::Q4_0, m.qs(), 0, 1, &mut vals);
        assert_eq!(vals[31], -8);
        assert_eq!(vals[0], 0);
        // Q6_0: the same rule with 64 levels.
        let m = QMatrix::quantize(QType::Q6_0, &neg, 1, 32)?;
        assert_eq!(m.scales()[0], f16::from_f32(31.0 / 32.0));
        unpack_block(QType::Q6_0, m.qs(), 0, 1, &mut vals);
        assert_eq!((vals[31], vals[0], vals[16]), (-32, 0, -17)); // −16 / (31/32) = −16.5 → −17
        // A zero block stays zero.
        let m = QMatrix::quantize(QType::Q4_0, &[0.0; 64], 1, 64)?;
        assert!(m.qs().iter().all(|&b| b == 0x88));
        Ok(())
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut vals: Vec<f32> = test_values(100_000, 7).iter().map(|v| v * 1e3).collect();
        vals.extend([0.0, -0.0, 1.0, f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-40, f32::INFINITY, f32::NEG_INFINITY]);
        // Exact ties (even and odd lower halves) and their neighbours.
        for b in [0x3f80_8000u32, 0x3f81_8000, 0x3f80_8001, 0x3f80_7fff, 0xbf81_8000, 0x7f7f_ffff] {
            vals.push(f32::from_bits(b));
        }
        for v in vals {
            assert_eq!(Bf16Act::round(v).to_bits(), half_round(v).to_bits(), "{v:e}");
        }
        assert!(Bf16Act::round(f32::NAN).is_nan());
    }

    fn half_round(v: f32) -> f32 {
        half::bf16::from_f32(v).to_f32()
    }

    #[test]
    fn vector_activation_quantisation_equals_the_scalar_rule() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // Blocks whose largest value is 127 (scale 1), so the others land exactly on
            // half steps (−15.5..15.5) or next to them.
            let mut x: Vec<f32> = test_values(32 * 400, 3).iter().map(|v| v * 7.0).collect();
            for (i, v) in x.iter_mut().enumerate().take(32 * 64) {
                let step = (i % 32) as f32 - 15.5;
                *v = if i % 32 == 31 { 127.0 } else { step * if i % 64 < 32 { 1.0 } else { 1.000_000_1 } };
            }
            let halves = x[..31].iter().filter(|v| v.fract().abs() == 0.5).count();
            assert_eq!(halves, 31);
            x[32 * 70..32 * 71].fill(0.0);
            let n = x.len() / BLOCK;
            let (mut q1, mut q2) = (vec![0i8; x.len()], vec![0i8; x.len()]);
            let (mut d1, mut d2, mut s1, mut s2, mut e1, mut e2) =
                (vec![0f32; n], vec![0f32; n], vec![0i32; n], vec![0i32; n], vec![0f32; n], vec![0f32; n]);
            quantize_blocks(&x, &mut q1, &mut d1, &mut s1, &mut e1);
            // SAFETY: the feature was just detected.
            unsafe { quantize_blocks_avx512(&x, &mut q2, &mut d2, &mut s2, &mut e2) };
            assert_eq!(q1, q2);
            assert_eq!((d1, s1, e1), (d2, s2, e2));
        }
    }

    #[test]
    fn bad_widths_are_errors() {
        assert!(QMatrix::quantize(QType::Q8_0, &[0.0; 40], 1, 40).is_err());
        assert!(QType::parse("q5_1").is_err());
        assert_eq!(QType::parse("Q4_0").ok().flatten(), Some(QType::Q4_0));
    }
}
