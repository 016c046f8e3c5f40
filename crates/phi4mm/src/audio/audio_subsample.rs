//! The speech encoder's NeMo "dw_striding" ×8 subsampling (spec §5.4 item 2): Conv2d(1 → ch,
//! 3×3, stride 2) → ReLU → depthwise 3×3 stride 2 → pointwise → ReLU → depthwise → pointwise →
//! ReLU over the (time × mel) plane, then the channel-major flatten and Linear(ch·10 → hidden).
//! Names follow the hub checkpoint (`…encoder.embed.conv.{0,2,3,5,6}`, `…embed.out`).
//!
//! Computed on the CPU in f32, channel-last (`[time, mel, ch]`), rows of output over the
//! threads. The 3×3 filters are stored tap-major so every tap is one contiguous multiply-add
//! over the channels (the compiler vectorises it). The first convolution is fused into the first
//! depthwise one: each task computes the few first-stage rows its output rows read (a 250-frame
//! chunk's first stage is 166 MB that would be written and read back). The pointwise
//! convolutions are GEMMs; their ReLU is applied as the next stage reads them.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::audio::audio_features::N_MELS;
use crate::model::encoder_config::AudioConfig;
use crate::error::{Error, Result};
use crate::decoder::layers::Linear;
use crate::model::weights::Scope;

/// Output rows of the fused first stages computed per task.
const ROWS_PER_TASK: usize = 4;

/// A 3×3 filter per channel with its bias, tap-major: `w[(ky·3 + kx)·ch + c]`.
#[derive(Debug, Clone)]
struct Taps {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Taps {
    /// `{i}.weight` `[ch, 1, 3, 3]` and `{i}.bias` `[ch]`.
    fn load(s: &Scope, i: usize, ch: usize) -> Result<Self> {
        let w: Vec<f32> = s.get(&format!("conv.{i}.weight"), &[ch, 1, 3, 3], DType::F32)?.flatten_all()?.to_vec1()?;
        let mut t = vec![0f32; 9 * ch];
        for (c, taps) in w.chunks_exact(9).enumerate() {
            for (tap, &v) in taps.iter().enumerate() {
                t[tap * ch + c] = v;
            }
        }
        Ok(Taps { w: t, b: s.get(&format!("conv.{i}.bias"), &[ch], DType::F32)?.to_vec1()? })
    }

    /// Channel-wise `out[c] = b[c] + Σ_taps w[tap][c]·src(tap)[c]` (`src(tap)` is `None`
    /// outside the padded input) for one output position; `relu` applies max(0, ·) to the
    /// source values as they are read.
    #[inline(always)]
    fn depthwise<'a>(&self, out: &mut [f32], src: impl Fn(usize, usize) -> Option<&'a [f32]>, relu: bool) {
        let ch = out.len();
        out.copy_from_slice(&self.b);
        for ky in 0..3 {
            for kx in 0..3 {
                let Some(s) = src(ky, kx) else { continue };
                let w = &self.w[(ky * 3 + kx) * ch..(ky * 3 + kx + 1) * ch];
                if relu {
                    for ((o, &w), &x) in out.iter_mut().zip(w).zip(s) {
                        *o += w * x.max(0.0);
                    }
                } else {
                    for ((o, &w), &x) in out.iter_mut().zip(w).zip(s) {
                        *o += w * x;
                    }
                }
            }
        }
    }
}

/// The NeMo ×8 subsampling with its output projection.
#[derive(Debug, Clone)]
pub(crate) struct Subsampling {
    conv0: Taps,
    dw1: Taps,
    pw1: Linear,
    dw2: Taps,
    pw2: Linear,
    out: Linear,
    channels: usize,
}

/// `x` `[h, w, ch]` (channel-last) and its sizes.
struct Plane {
    x: Vec<f32>,
    h: usize,
    w: usize,
}

impl Subsampling {
    pub(crate) fn load(s: &Scope, c: &AudioConfig, dtype: DType) -> Result<Self> {
        let ch = c.nemo_conv_channels;
        let pw = |i: usize| Linear::load_pointwise(&s.pp(format!("conv.{i}")), ch, ch, 4, dtype);
        Ok(Subsampling {
            conv0: Taps::load(s, 0, ch)?,
            dw1: Taps::load(s, 2, ch)?,
            pw1: pw(3)?,
            dw2: Taps::load(s, 5, ch)?,
            pw2: pw(6)?,
            out: Linear::load(&s.pp("out"), ch * N_MELS.div_ceil(8), c.hidden_size, dtype)?,
            channels: ch,
        })
    }

    /// Output frames `k0..k1` of the subsampled sequence `[k1−k0, hidden]` from normalised
    /// features `[t, 80]`. Each output frame sees input frames `8k−7..=8k+7`, so a slice with a
    /// margin of 16 input frames on each side gives exact results.
    pub(crate) fn forward_range(&self, feats: &[f32], t: usize, k0: usize, k1: usize, device: &Device, act: DType) -> Result<Tensor> {
        let ch = self.channels;
        let start = (8 * k0).saturating_sub(16);
        let end = (8 * k1 + 16).min(t);
        if end <= start || feats.len() < end * N_MELS {
            return Err(Error::Media("audio subsampling range out of bounds".into()));
        }
        let a = self.first_stages(&feats[start * N_MELS..end * N_MELS], end - start);
        let a = self.pointwise(&a, &self.pw1, device, act)?;
        let a = stride2(&a, ch, &self.dw2);
        let a = self.pointwise(&a, &self.pw2, device, act)?;
        // [t', f, ch] → channel-major rows [t', ch·f] (ReLU of pw2 applied here) → Linear.
        let skip = k0 - start / 8;
        let rows = k1 - k0;
        if skip + rows > a.h {
            return Err(Error::Media("audio subsampling range out of bounds".into()));
        }
        let w3 = a.w;
        let mut flat = vec![0f32; rows * ch * w3];
        flat.par_chunks_mut(ch * w3).enumerate().for_each(|(r, dst)| {
            for f in 0..w3 {
                let src = &a.x[((skip + r) * w3 + f) * ch..((skip + r) * w3 + f + 1) * ch];
                for (c, &v) in src.iter().enumerate() {
                    dst[c * w3 + f] = v.max(0.0);
                }
            }
        });
        let flat = Tensor::from_vec(flat, (rows, ch * w3), device)?.to_dtype(act)?;
        self.out.forward(&flat)
    }

    /// Conv2d(1 → ch, 3×3, stride 2, pad 1) + ReLU, then the first depthwise 3×3 stride-2
    /// conv, on features `[n, 80]` → `[⌈n/4⌉, 20, ch]`. Each task computes the first-stage rows
    /// its output rows read (`2y−1..=2y+1` for output row `y`).
    fn first_stages(&self, feats: &[f32], n: usize) -> Plane {
        let ch = self.channels;
        let (h1, w1) = (n.div_ceil(2), N_MELS.div_ceil(2));
        let (h2, w2) = (h1.div_ceil(2), w1.div_ceil(2));
        let mut out = vec![0f32; h2 * w2 * ch];
        out.par_chunks_mut(ROWS_PER_TASK * w2 * ch).enumerate().for_each_init(Vec::new, |a, (task, dst)| {
            let y0 = task * ROWS_PER_TASK;
            let y1 = y0 + dst.len() / (w2 * ch);
            // First-stage rows lo..hi, the ones rows y0..y1 read.
            let (lo, hi) = ((2 * y0).saturating_sub(1), (2 * y1).min(h1));
            a.resize((hi - lo) * w1 * ch, 0.0);
            for (r, row) in a.chunks_exact_mut(w1 * ch).enumerate() {
                let y = lo + r;
                for (x, o) in row.chunks_exact_mut(ch).enumerate() {
                    self.conv0_at(feats, n, y, x, o);
                }
            }
            for (yy, row) in dst.chunks_exact_mut(w2 * ch).enumerate() {
                let y = y0 + yy;
                for (x, o) in row.chunks_exact_mut(ch).enumerate() {
                    let src = |ky: usize, kx: usize| {
                        let iy = (2 * y + ky).checked_sub(1).filter(|&v| v < h1)?;
                        let ix = (2 * x + kx).checked_sub(1).filter(|&v| v < w1)?;
                        Some(&a[((iy - lo) * w1 + ix) * ch..((iy - lo) * w1 + ix + 1) * ch])
                    };
                    self.dw1.depthwise(o, src, false);
                }
            }
        });
        Plane { x: out, h: h2, w: w2 }
    }

    /// The first convolution (one input channel) + ReLU at output `(y, x)` into `o` `[ch]`.
    #[inline(always)]
    fn conv0_at(&self, feats: &[f32], n: usize, y: usize, x: usize, o: &mut [f32]) {
        let ch = o.len();
        o.copy_from_slice(&self.conv0.b);
        for ky in 0..3 {
            let Some(iy) = (2 * y + ky).checked_sub(1).filter(|&v| v < n) else { continue };
            for kx in 0..3 {
                let Some(ix) = (2 * x + kx).checked_sub(1).filter(|&v| v < N_MELS) else { continue };
                let v = feats[iy * N_MELS + ix];
                let w = &self.conv0.w[(ky * 3 + kx) * ch..(ky * 3 + kx + 1) * ch];
                for (o, &w) in o.iter_mut().zip(w) {
                    *o += w * v;
                }
            }
        }
        o.iter_mut().for_each(|v| *v = v.max(0.0));
    }

    /// A pointwise convolution `[h, w, ch]` → `[h, w, ch]` as one product (its ReLU is left to
    /// the reader).
    fn pointwise(&self, a: &Plane, pw: &Linear, device: &Device, act: DType) -> Result<Plane> {
        let t = Tensor::from_slice(&a.x, (a.h * a.w, self.channels), device)?.to_dtype(act)?;
        let x = pw.forward(&t)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Plane { x, h: a.h, w: a.w })
    }
}

/// The depthwise 3×3 stride-2 convolution (pad 1) `taps` of `relu(a)`, `a` `[h, w, ch]` →
/// `[⌈h/2⌉, ⌈w/2⌉, ch]`, output rows over the threads.
fn stride2(a: &Plane, ch: usize, taps: &Taps) -> Plane {
    let (ho, wo) = (a.h.div_ceil(2), a.w.div_ceil(2));
    let mut out = vec![0f32; ho * wo * ch];
    out.par_chunks_mut(wo * ch).enumerate().for_each(|(y, row)| {
        for (x, o) in row.chunks_exact_mut(ch).enumerate() {
            let src = |ky: usize, kx: usize| {
                let iy = (2 * y + ky).checked_sub(1).filter(|&v| v < a.h)?;
                let ix = (2 * x + kx).checked_sub(1).filter(|&v| v < a.w)?;
                Some(&a.x[(iy * a.w + ix) * ch..(iy * a.w + ix + 1) * ch])
            };
            taps.depthwise(o, src, true);
        }
    });
    Plane { x: out, h: ho, w: wo }
}
