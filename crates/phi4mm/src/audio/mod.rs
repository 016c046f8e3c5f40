//! The speech encoder (spec §5.4–5.5): global mean/invstd normalisation, NeMo "dw_striding"
//! ×8 subsampling, a Conformer of macaron blocks with T5 relative bias over independent
//! 500-frame windows, and the two audio projectors (speech for audio-only requests, vision
//! when an image is present). Names follow the hub checkpoint
//! (`model.embed_tokens_extend.audio_embed.*`), structure the original
//! `speech_conformer_encoder.py`. Long audio is processed window by window, so memory is
//! bounded by a window, not by the recording.

pub mod audio_features;
pub mod audio_io;
mod audio_subsample;
pub mod resample;
pub mod split;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::audio::audio_features::{LogMel, N_MELS};
use crate::audio::audio_subsample::Subsampling;
use crate::model::encoder_config::AudioConfig;
use crate::error::Result;
use crate::kernels;
use crate::kernels::attention::ScoreTerms;
use crate::decoder::layers::{LayerNorm, Linear, Projector as MlpProjector};
use crate::model::weights::{Scope, Weights};

/// Hub prefix of the audio encoder.
pub const PREFIX: &str = "model.embed_tokens_extend.audio_embed";
/// LayerNorm epsilon of the Conformer (PyTorch's default).
const EPS: f64 = 1e-5;
/// Subsampled frames per attention window.
const WINDOW: usize = 500;
/// Subsampled frames computed per subsampling chunk.
const SUB_CHUNK: usize = 250;

/// Which projector maps the encoder output into the decoder (spec §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projector {
    Speech,
    Vision,
}

/// Macaron feed-forward: LN → Linear(d, 2i) → value·swish(gate) → Linear(i, d).
#[derive(Debug, Clone)]
struct FeedForward {
    norm: LayerNorm,
    up: Linear,
    down: Linear,
}

impl FeedForward {
    fn load(s: &Scope, c: &AudioConfig, dtype: DType, act: DType) -> Result<Self> {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        Ok(FeedForward {
            norm: LayerNorm::load(&s.pp("layer_norm"), d, EPS, act)?,
            up: Linear::load(&s.pp("net.0.linear"), d, 2 * i, dtype)?,
            down: Linear::load(&s.pp("net.2"), i, d, dtype)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.up.forward(&self.norm.forward(x)?)?;
        self.down.forward(&kernels::elementwise::gated_silu(&h, None)?)
    }
}

/// Multi-head self-attention with the shared relative bias.
#[derive(Debug, Clone)]
struct Attention {
    /// q, k and v as one product (`[3d, d]`).
    qkv: Linear,
    out: Linear,
    heads: usize,
}

/// A batch of windows' additive attention terms, in the form its attention path takes.
#[derive(Debug)]
enum WindowBias {
    /// The CPU kernel's: the key mask and the relative bias per head and offset.
    Terms(ScoreTerms),
    /// `[nw or 1, heads, t, t]` with the mask folded in as −∞ (the backend's matmul path).
    Dense(Tensor),
}

impl Attention {
    fn load(s: &Scope, d: usize, heads: usize, dtype: DType) -> Result<Self> {
        let qkv = [Linear::load(&s.pp("linear_q"), d, d, dtype)?, Linear::load(&s.pp("linear_k"), d, d, dtype)?, Linear::load(&s.pp("linear_v"), d, d, dtype)?];
        Ok(Attention {
            qkv: Linear::concat(&qkv)?,
            out: Linear::load(&s.pp("linear_out"), d, d, dtype)?,
            heads,
        })
    }

    /// `x` `[w, t, d]` → `[w, t, d]`.
    fn forward(&self, x: &Tensor, bias: &WindowBias) -> Result<Tensor> {
        let (w, t, d) = x.dims3()?;
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let qkv = self.qkv.forward(&x.reshape((w * t, d))?)?; // [w·t, 3d]
        let ctx = match bias {
            WindowBias::Terms(terms) => kernels::attention::self_attention(&qkv, w, self.heads, scale as f32, terms)?,
            WindowBias::Dense(bias) => self.portable(&qkv, w, t, scale, bias)?,
        };
        Ok(self.out.forward(&ctx)?.reshape((w, t, d))?)
    }

    /// Through the backend's matmul and softmax: `qkv` `[w·t, 3d]` → `[w·t, d]`.
    fn portable(&self, qkv: &Tensor, w: usize, t: usize, scale: f64, bias: &Tensor) -> Result<Tensor> {
        let d = qkv.dim(1)? / 3;
        let split = |i: usize| -> Result<Tensor> {
            Ok(qkv.narrow(1, i * d, d)?.reshape((w, t, self.heads, d / self.heads))?.transpose(1, 2)?.contiguous()?)
        };
        let q = (split(0)? * scale)?;
        let (k, v) = (split(1)?, split(2)?);
        let scores = q.matmul(&k.t()?)?.broadcast_add(&bias.to_dtype(q.dtype())?)?; // [w, h, t, t]
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
        // Fully masked rows give NaN; the original zeroes masked weights.
        let probs = probs.eq(&probs)?.where_cond(&probs, &probs.zeros_like()?)?.to_dtype(qkv.dtype())?;
        Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((w * t, d))?)
    }
}

/// LN → pointwise GLU (extra biases) → causal depthwise conv → pointwise → swish → pointwise.
#[derive(Debug, Clone)]
struct ConvModule {
    norm: LayerNorm,
    glu: Linear,
    b1: Tensor,
    b2: Tensor,
    dw_w: Vec<f32>, // [k, d] (tap-major: each tap one contiguous multiply-add over the channels)
    dw_b: Vec<f32>,
    pw: Linear,
    ext: Linear,
    kernel: usize,
}

impl ConvModule {
    fn load(s: &Scope, c: &AudioConfig, dtype: DType, act: DType) -> Result<Self> {
        let d = c.hidden_size;
        let k = c.kernel_size;
        let g = s.pp("glu");
        let dw = s.pp("dw_sep_conv_1d").pp("dw_conv");
        Ok(ConvModule {
            norm: LayerNorm::load(&s.pp("layer_norm"), d, EPS, act)?,
            glu: Linear::load_pointwise(&g.pp("ext_pw_conv_1d"), d, 2 * d, 3, dtype)?,
            b1: g.get("b1", &[1, d, 1], act)?.flatten_all()?,
            b2: g.get("b2", &[1, d, 1], act)?.flatten_all()?,
            dw_w: dw.get("weight", &[d, 1, k], DType::F32)?.reshape((d, k))?.t()?.flatten_all()?.to_vec1()?,
            dw_b: dw.get("bias", &[d], DType::F32)?.to_vec1()?,
            pw: Linear::load_pointwise(&s.pp("dw_sep_conv_1d").pp("pw_conv"), d, d, 3, dtype)?,
            ext: Linear::load_pointwise(&s.pp("ext_pw_conv_1d"), d, d, 3, dtype)?,
            kernel: k,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.glu.forward(&self.norm.forward(x)?)?;
        let h = kernels::elementwise::gated_silu(&h, Some((&self.b1, &self.b2)))?;
        let h = self.causal_depthwise(&h)?;
        let h = kernels::elementwise::silu(&self.pw.forward(&h)?)?;
        self.ext.forward(&h)
    }

    /// out[t, c] = Σ_i w[c, i]·x[t − (k−1) + i, c] + b[c] on `[w, t, d]`, rows over the threads.
    fn causal_depthwise(&self, x: &Tensor) -> Result<Tensor> {
        let (nw, t, d) = x.dims3()?;
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let k = self.kernel;
        let mut out = vec![0f32; nw * t * d];
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            let (w, tt) = (row / t, row % t);
            o.copy_from_slice(&self.dw_b);
            for i in 0..k {
                let Some(src_t) = (tt + i).checked_sub(k - 1) else { continue };
                let src = &xs[(w * t + src_t) * d..(w * t + src_t + 1) * d];
                for ((o, &wi), &v) in o.iter_mut().zip(&self.dw_w[i * d..(i + 1) * d]).zip(src) {
                    *o += wi * v;
                }
            }
        });
        Ok(Tensor::from_vec(out, (nw, t, d), x.device())?.to_dtype(x.dtype())?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    ff_in: FeedForward,
    norm_att: LayerNorm,
    attn: Attention,
    conv: ConvModule,
    ff_out: FeedForward,
    norm: LayerNorm,
}

impl Block {
    fn load(s: &Scope, c: &AudioConfig, dtype: DType, act: DType) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Block {
            ff_in: FeedForward::load(&s.pp("feed_forward_in"), c, dtype, act)?,
            norm_att: LayerNorm::load(&s.pp("layer_norm_att"), d, EPS, act)?,
            attn: Attention::load(&s.pp("self_attn"), d, c.num_attention_heads, dtype)?,
            conv: ConvModule::load(&s.pp("conv"), c, dtype, act)?,
            ff_out: FeedForward::load(&s.pp("feed_forward_out"), c, dtype, act)?,
            norm: LayerNorm::load(&s.pp("layer_norm"), d, EPS, act)?,
        })
    }

    fn forward(&self, x: &Tensor, bias: &WindowBias) -> Result<Tensor> {
        let x = (x + (self.ff_in.forward(x)? * 0.5)?)?;
        let x = (&x + self.attn.forward(&self.norm_att.forward(&x)?, bias)?)?;
        let x = (&x + self.conv.forward(&x)?)?;
        let x = (&x + (self.ff_out.forward(&x)? * 0.5)?)?;
        self.norm.forward(&x)
    }
}

/// The whole audio encoder with both projectors.
#[derive(Debug, Clone)]
pub struct AudioEncoder {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    sub: Subsampling,
    bias_table: Vec<f32>, // [2·max_dist, heads]
    max_dist: usize,
    heads: usize,
    blocks: Vec<Block>,
    speech_projection: MlpProjector,
    vision_projection: MlpProjector,
    /// The activations' dtype ([`crate::decoder::layers::activation_dtype`]).
    act: DType,
    device: Device,
}

impl AudioEncoder {
    /// Whether the checkpoint has an audio encoder.
    pub fn present(w: &Weights) -> bool {
        w.contains(&format!("{PREFIX}.encoder.embed.out.weight"))
    }

    pub fn load(w: &Weights, c: &AudioConfig, out: usize, dtype: DType, device: &Device) -> Result<Self> {
        let act = crate::decoder::layers::activation_dtype(dtype, device);
        let s = w.root().pp(PREFIX);
        let e = s.pp("encoder");
        let d = c.hidden_size;
        let emb = e.pp("encoder_embedding");
        let mut blocks = Vec::with_capacity(c.num_blocks);
        for b in 0..c.num_blocks {
            blocks.push(Block::load(&e.pp("encoders").pp(b), c, dtype, act)?);
        }
        let proj = |name: &str| MlpProjector::load(&s.pp("audio_projection").pp(name), d, out, dtype);
        Ok(AudioEncoder {
            mean: emb.get("global_mean", &[N_MELS], DType::F32)?.to_vec1()?,
            invstd: emb.get("global_invstd", &[N_MELS], DType::F32)?.to_vec1()?,
            sub: Subsampling::load(&e.pp("embed"), c, dtype)?,
            bias_table: e
                .pp("relative_attention_bias_layer")
                .pp("bias_values")
                .get("weight", &[2 * c.bias_max_distance, c.num_attention_heads], DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            max_dist: c.bias_max_distance,
            heads: c.num_attention_heads,
            blocks,
            speech_projection: proj("speech")?,
            vision_projection: proj("vision")?,
            act,
            device: device.clone(),
        })
    }

    /// Encoder outputs for the audios of one request, encoded as one zero-padded batch as the
    /// reference does: features padded to the longest, keys past each audio's end masked (no
    /// mask at all for a single audio). Returns `[⌈T_i/8⌉, hidden]` per audio.
    /// `progress` is told (windows done, windows total).
    pub fn encode(&self, audios: &[LogMel], progress: Option<&dyn Fn(usize, usize)>) -> Result<Vec<Tensor>> {
        let mut job = self.start(audios, None);
        self.finish(audios, &mut job, progress)?;
        Ok(std::mem::take(&mut job.outs))
    }

    /// Runs `job` (started on these `audios`) to its end: the outputs of all audios one after
    /// the other. `progress` is told (windows done, windows total) after each window.
    pub fn finish(&self, audios: &[LogMel], job: &mut AudioJob, progress: Option<&dyn Fn(usize, usize)>) -> Result<Tensor> {
        let mut told = 0;
        loop {
            let out = self.advance(audios, job)?;
            let (done, total) = job.windows();
            if let Some(p) = progress.filter(|_| done > told) {
                told = done;
                p(done, total);
            }
            if let Some(t) = out {
                return Ok(t);
            }
        }
    }

    /// Starts encoding the audios of one request (see [`AudioEncoder::encode`]), their outputs
    /// projected by `project` when given; run it with [`AudioEncoder::advance`].
    pub fn start(&self, audios: &[LogMel], project: Option<Projector>) -> AudioJob {
        let t_max = audios.iter().map(|a| a.frames).max().unwrap_or(0);
        let tp = t_max.div_ceil(8);
        AudioJob {
            project,
            t_max,
            tp,
            windows_per: if tp > WINDOW { tp.div_ceil(WINDOW) } else { 1 },
            masked: audios.len() > 1,
            audios: audios.len(),
            blocks: self.blocks.len(),
            feats: Vec::new(),
            window: 0,
            sub: Vec::new(),
            inflight: None,
            pieces: Vec::new(),
            outs: Vec::new(),
        }
    }

    /// Runs the next piece of `job` (started on these `audios`): a subsampling chunk of the
    /// window in flight, one Conformer block over it, or its projection. After the last piece
    /// returns the outputs of all audios one after the other (projected when asked).
    pub fn advance(&self, audios: &[LogMel], job: &mut AudioJob) -> Result<Option<Tensor>> {
        let Some(a) = audios.get(job.outs.len()) else {
            return Err(crate::Error::Request("the audio job has no audio left".into()));
        };
        if job.feats.is_empty() {
            job.feats = self.normalised(a, job.t_max);
        }
        let win = job.tp.min(WINDOW);
        let k0 = job.window * win;
        let k1 = (k0 + win).min(job.tp);
        if let Some((h, bias, block)) = job.inflight.take() {
            if block < self.blocks.len() {
                let h = self.blocks[block].forward(&h, &bias)?;
                job.inflight = Some((h, bias, block + 1));
                return Ok(None);
            }
            // The window's rows that belong to the audio, projected when asked.
            let rows = a.num_tokens().saturating_sub(k0).min(win);
            if rows > 0 {
                let out = h.reshape(((), h.dim(2)?))?.narrow(0, 0, rows)?;
                job.pieces.push(match job.project {
                    Some(p) => self.project(&out, p)?,
                    None => out,
                });
            }
            return self.next_window(job);
        }
        let done: usize = job.sub.iter().map(|t| t.dims()[0]).sum();
        if k0 + done < k1 {
            let e = (k0 + done + SUB_CHUNK).min(k1);
            job.sub.push(self.sub.forward_range(&job.feats, job.t_max, k0 + done, e, &self.device, self.act)?);
            return Ok(None);
        }
        let mut x = Tensor::cat(&std::mem::take(&mut job.sub)[..], 0)?;
        if k1 - k0 < win {
            // The last window is zero-padded (after the input projection).
            let pad = Tensor::zeros((win - (k1 - k0), x.dim(1)?), x.dtype(), &self.device)?;
            x = Tensor::cat(&[&x, &pad], 0)?;
        }
        let mask: Vec<f32> = (0..win).map(|j| if k0 + j >= a.num_tokens() { f32::NEG_INFINITY } else { 0.0 }).collect();
        let bias = self.bias(win, job.masked.then_some(&mask[..]), 1)?;
        job.inflight = Some((x.unsqueeze(0)?, bias, 0));
        Ok(None)
    }

    /// After a window: on to the next, or the next audio, or (after the last) every output.
    fn next_window(&self, job: &mut AudioJob) -> Result<Option<Tensor>> {
        job.window += 1;
        if job.window < job.windows_per {
            return Ok(None);
        }
        job.outs.push(Tensor::cat(&std::mem::take(&mut job.pieces)[..], 0)?);
        job.window = 0;
        job.feats.clear();
        if job.outs.len() < job.audios {
            return Ok(None);
        }
        Ok(Some(Tensor::cat(&job.outs, 0)?))
    }

    /// `a`'s log-mel features normalised, zero-padded (padding normalised too) to `t_max` frames.
    fn normalised(&self, a: &LogMel, t_max: usize) -> Vec<f32> {
        let mut f = vec![0f32; t_max * N_MELS];
        f[..a.data.len()].copy_from_slice(&a.data);
        for row in f.chunks_exact_mut(N_MELS) {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - self.mean[j]) * self.invstd[j];
            }
        }
        f
    }

    /// The attention terms for windows of `t` frames, for the attention path this encoder takes.
    fn bias(&self, t: usize, mask: Option<&[f32]>, nw: usize) -> Result<WindowBias> {
        let kernel = kernels::attention::takes(&self.device, self.act);
        window_bias(&self.bias_table, self.max_dist, self.heads, t, mask, nw, kernel, &self.device)
    }

    /// Projects encoder output `[n, hidden]` into the decoder width.
    pub fn project(&self, x: &Tensor, which: Projector) -> Result<Tensor> {
        match which {
            Projector::Speech => self.speech_projection.forward(x),
            Projector::Vision => self.vision_projection.forward(x),
        }
    }
}


/// The audios of one request on their way through the encoder a piece at a time (see
/// [`AudioEncoder::advance`]), so a scheduler can encode them between decode steps. Each
/// window goes through the Conformer on its own (they are independent) and the pieces compute
/// exactly what [`AudioEncoder::encode`] computes: it runs a job to its end.
#[derive(Debug)]
pub struct AudioJob {
    project: Option<Projector>,
    /// Frames of the longest audio, before and after subsampling.
    t_max: usize,
    tp: usize,
    windows_per: usize,
    masked: bool,
    audios: usize,
    blocks: usize,
    /// The normalised features of the audio in flight (empty between audios).
    feats: Vec<f32>,
    /// The window in flight (of that audio), its subsampled chunks so far, and then its
    /// hidden state with its attention terms and the blocks it has been through.
    window: usize,
    sub: Vec<Tensor>,
    inflight: Option<(Tensor, WindowBias, usize)>,
    /// Outputs of the audio in flight's finished windows, and of the finished audios.
    pieces: Vec<Tensor>,
    outs: Vec<Tensor>,
}

impl AudioJob {
    /// What the next piece is: 0 a subsampling chunk, 1 a Conformer block, 2 a projection.
    pub fn next_piece(&self) -> usize {
        match &self.inflight {
            None => 0,
            Some((_, _, b)) if *b < self.blocks => 1,
            Some(_) => 2,
        }
    }

    /// (windows done, windows in all), over all audios.
    pub fn windows(&self) -> (usize, usize) {
        (self.outs.len() * self.windows_per + self.window, self.audios * self.windows_per)
    }
}

/// The T5 relative bias (`table[clamp(j − i, −md, md−1) + md, head]` for query i, key j;
/// `table` `[2·md, heads]`) with −∞ on the keys `mask` marks (`[nw, t]`), for windows of `t`
/// frames: as the attention kernel's terms when `kernel`, else as one dense tensor.
#[allow(clippy::too_many_arguments)]
fn window_bias(
    table: &[f32],
    max_dist: usize,
    heads: usize,
    t: usize,
    mask: Option<&[f32]>,
    nw: usize,
    kernel: bool,
    device: &Device,
) -> Result<WindowBias> {
    let (h, md) = (heads, max_dist as i64);
    let at = |head: usize, j_minus_i: i64| table[(j_minus_i.clamp(-md, md - 1) + md) as usize * h + head];
    if kernel {
        let relative = kernels::attention::relative(t, h, |head, i_minus_j| at(head, -(i_minus_j as i64)));
        return Ok(WindowBias::Terms(ScoreTerms { keys: mask.map(Into::into), relative: Some(relative) }));
    }
    let mut b = vec![0f32; h * t * t];
    for i in 0..t {
        for j in 0..t {
            for hh in 0..h {
                b[(hh * t + i) * t + j] = at(hh, j as i64 - i as i64);
            }
        }
    }
    let bias = Tensor::from_vec(b, (1, h, t, t), device)?;
    Ok(WindowBias::Dense(match mask {
        None => bias,
        Some(m) => bias.broadcast_add(&Tensor::from_vec(m.to_vec(), (nw, 1, 1, t), device)?)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_kernel_matches_the_portable_path() -> Result<()> {
        if !kernels::attention::available() {
            eprintln!("skipped: no attention kernel on this CPU");
            return Ok(());
        }
        // Two windows of 37 frames, 4 heads of 16; a bias table with a short max distance
        // (offsets clamp); masks: none, the last 5 keys of each window, every key of window 2.
        let (nw, t, d, heads, md) = (2, 37, 64, 4, 12);
        let dev = Device::Cpu;
        let lin = |o: usize, seed: u64| -> Result<Linear> {
            let w = crate::model::quant::test_values(o * d, seed).iter().map(|v| v * 0.3).collect::<Vec<_>>();
            let b = crate::model::quant::test_values(o, seed + 1);
            Ok(Linear { w: Tensor::from_vec(w, (o, d), &dev)?.to_dtype(DType::BF16)?, b: Tensor::from_vec(b, o, &dev)? })
        };
        let attn = Attention { qkv: lin(3 * d, 5)?, out: lin(d, 9)?, heads };
        let table: Vec<f32> = crate::model::quant::test_values(2 * md * heads, 17);
        let x = Tensor::from_vec(crate::model::quant::test_values(nw * t * d, 3), (nw, t, d), &dev)?;
        let partial: Vec<f32> = (0..nw * t).map(|i| if i % t >= t - 5 { f32::NEG_INFINITY } else { 0.0 }).collect();
        let all: Vec<f32> = (0..nw * t).map(|i| if i / t == 1 { f32::NEG_INFINITY } else { 0.0 }).collect();
        for mask in [None, Some(&partial[..]), Some(&all[..])] {
            let run = |kernel: bool| -> Result<Vec<f32>> {
                let b = window_bias(&table, md, heads, t, mask, nw, kernel, &dev)?;
                Ok(attn.forward(&x, &b)?.flatten_all()?.to_vec1()?)
            };
            let (k, p) = (run(true)?, run(false)?);
            for (i, (a, b)) in k.iter().zip(&p).enumerate() {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "mask {:?} [{i}]: kernel {a} vs portable {b}", mask.map(|m| m[t - 1]));
            }
        }
        Ok(())
    }
}
