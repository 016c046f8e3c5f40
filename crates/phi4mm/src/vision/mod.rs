//! The image encoder (spec §4.2–4.4): the SigLIP (NaViT) tower over the global thumbnail and
//! the crops, 2×2 average pooling, the HD assembly with the learned separators (`sub_glb`
//! order), and the GELU projector into the decoder's width. Follows `Phi4MultimodalImageEmbedding`
//! of transformers and the original `vision_siglip_navit.py`; names follow the hub checkpoint
//! (`model.embed_tokens_extend.image_embed.*`).

pub mod image_io;
pub mod image_prep;

use candle_core::{DType, Device, Tensor};

use crate::model::encoder_config::VisionConfig;
use crate::error::{Error, Result};
use crate::vision::image_prep::{PreparedImage, CROP, GRID, PATCH};
use crate::kernels;
use crate::kernels::attention::ScoreTerms;
use crate::decoder::layers::{LayerNorm, Linear, Projector};
use crate::model::weights::{Scope, Weights};

/// Hub prefix of the image encoder.
pub const PREFIX: &str = "model.embed_tokens_extend.image_embed";

/// Rows of the assembled sequence projected per piece of an [`ImageJob`].
const PROJECT_ROWS: usize = 256;

/// One pre-LN SigLIP encoder layer (`q_proj`, `k_proj`, `v_proj` stacked into one product).
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    qkv: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl EncoderLayer {
    fn load(s: &Scope, c: &VisionConfig, dtype: DType, act: DType) -> Result<Self> {
        let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        let a = s.pp("self_attn");
        let qkv = [Linear::load(&a.pp("q_proj"), h, h, dtype)?, Linear::load(&a.pp("k_proj"), h, h, dtype)?, Linear::load(&a.pp("v_proj"), h, h, dtype)?];
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::load(&s.pp("layer_norm1"), h, eps, act)?,
            qkv: Linear::concat(&qkv)?,
            out_proj: Linear::load(&a.pp("out_proj"), h, h, dtype)?,
            layer_norm2: LayerNorm::load(&s.pp("layer_norm2"), h, eps, act)?,
            fc1: Linear::load(&s.pp("mlp").pp("fc1"), h, i, dtype)?,
            fc2: Linear::load(&s.pp("mlp").pp("fc2"), i, h, dtype)?,
            heads: c.num_attention_heads,
        })
    }

    /// The attention with its residual: `x` `[b, p, h]`; `terms.keys` `[b·p]` additive
    /// key mask (0 or −∞) or none.
    fn attention(&self, x: &Tensor, terms: &ScoreTerms) -> Result<Tensor> {
        let (b, p, h) = x.dims3()?;
        let d = h / self.heads;
        let scale = 1.0 / (d as f64).sqrt();
        let qkv = self.qkv.forward(&self.layer_norm1.forward(x)?.reshape((b * p, h))?)?; // [b·p, 3h]
        let attn = if kernels::attention::takes(x.device(), x.dtype()) {
            kernels::attention::self_attention(&qkv, b, self.heads, scale as f32, terms)?
        } else {
            self.attention_portable(&qkv, b, p, terms.keys.as_deref())?
        };
        Ok((x + self.out_proj.forward(&attn)?.reshape((b, p, h))?)?)
    }

    /// The MLP's first product and GELU: `x` `[b, p, h]` → `[b·p, intermediate]`.
    fn mlp_up(&self, x: &Tensor) -> Result<Tensor> {
        let (b, p, h) = x.dims3()?;
        let flat = self.layer_norm2.forward(x)?.reshape((b * p, h))?;
        kernels::elementwise::gelu_tanh(&self.fc1.forward(&flat)?) // tanh GELU
    }

    /// The MLP's second product with the residual.
    fn mlp_down(&self, x: &Tensor, mid: &Tensor) -> Result<Tensor> {
        let (b, p, h) = x.dims3()?;
        Ok((x + self.fc2.forward(mid)?.reshape((b, p, h))?)?)
    }

    /// The attention through the backend's matmul and softmax: `qkv` `[b·p, 3h]` → `[b·p, h]`.
    fn attention_portable(&self, qkv: &Tensor, b: usize, p: usize, mask: Option<&[f32]>) -> Result<Tensor> {
        let h = qkv.dim(1)? / 3;
        let d = h / self.heads;
        let split = |i: usize| -> Result<Tensor> {
            let t = qkv.narrow(1, i * h, h)?.reshape((b, p, self.heads, d))?.transpose(1, 2)?;
            // Scores, softmax and the weighted sum in f32: the score matrices are the large tensors.
            Ok(t.contiguous()?.to_dtype(DType::F32)?)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let q = (q * (1.0 / (d as f64).sqrt()))?;
        let mask = match mask {
            Some(m) => Some(Tensor::from_vec(m.to_vec(), (b, 1, 1, p), qkv.device())?),
            None => None,
        };
        // One crop and a few heads at a time: the whole score tensor would be
        // [b, heads, p, p] (470 MB per layer for 7 crops), allocated and streamed four times.
        let mut parts = Vec::with_capacity(b);
        for i in 0..b {
            let mut heads = Vec::new();
            for h0 in (0..self.heads).step_by(ATTN_HEADS) {
                let n = ATTN_HEADS.min(self.heads - h0);
                let piece = |t: &Tensor| t.narrow(0, i, 1)?.narrow(1, h0, n);
                let scores = piece(&q)?.matmul(&piece(&k)?.t()?)?; // [1, n, p, p]
                let scores = match &mask {
                    Some(m) => scores.broadcast_add(&m.narrow(0, i, 1)?)?,
                    None => scores,
                };
                let probs = kernels::elementwise::softmax_last_dim(&scores)?;
                heads.push(probs.matmul(&piece(&v)?)?); // [1, n, p, d]
            }
            parts.push(Tensor::cat(&heads, 1)?);
        }
        Ok(Tensor::cat(&parts, 0)?.to_dtype(qkv.dtype())?.transpose(1, 2)?.reshape((b * p, h))?)
    }
}

/// Heads whose attention scores are computed at once (4 × 1024² f32 = 16 MB per crop).
const ATTN_HEADS: usize = 4;

/// The whole image encoder.
#[derive(Debug, Clone)]
pub struct VisionEncoder {
    patch_w: Tensor, // [hidden, 3·14·14]
    patch_b: Tensor,
    pos_table: Tensor, // [1024, hidden]
    layers: Vec<EncoderLayer>,
    glb_gn: Tensor, // [hidden]
    sub_gn: Tensor, // [hidden]
    img_projection: Projector,
    hidden: usize,
    /// The activations' dtype ([`crate::decoder::layers::activation_dtype`]).
    act: DType,
    device: Device,
}

impl VisionEncoder {
    /// Whether the checkpoint has an image encoder.
    pub fn present(w: &Weights) -> bool {
        w.contains(&format!("{PREFIX}.img_processor.embeddings.patch_embedding.weight"))
    }

    /// Loads the tower layers the features need (up to `feature_layer`), the separators and
    /// the projector into the decoder width `out`.
    pub fn load(w: &Weights, c: &VisionConfig, out: usize, dtype: DType, device: &Device) -> Result<Self> {
        let act = crate::decoder::layers::activation_dtype(dtype, device);
        let s = w.root().pp(PREFIX);
        let t = s.pp("img_processor");
        let h = c.hidden_size;
        let emb = t.pp("embeddings");
        let patch_w = emb
            .pp("patch_embedding")
            .get("weight", &[h, 3, c.patch_size, c.patch_size], dtype)?
            .reshape((h, 3 * c.patch_size * c.patch_size))?;
        let run = if c.feature_layer < 0 {
            (c.num_hidden_layers as i64 + 1 + c.feature_layer) as usize
        } else {
            c.feature_layer as usize
        };
        let mut layers = Vec::with_capacity(run);
        for l in 0..run {
            layers.push(EncoderLayer::load(&t.pp("encoder").pp("layers").pp(l), c, dtype, act)?);
        }
        let n_pos = (c.image_size / c.patch_size).pow(2);
        Ok(VisionEncoder {
            patch_w,
            patch_b: emb.pp("patch_embedding").get("bias", &[h], act)?,
            pos_table: emb.pp("position_embedding").get("weight", &[n_pos, h], act)?,
            layers,
            glb_gn: s.get("glb_GN", &[1, 1, h], act)?.flatten_all()?,
            sub_gn: s.get("sub_GN", &[1, 1, 1, h], act)?.flatten_all()?,
            img_projection: Projector::load(&s.pp("img_projection"), h, out, dtype)?,
            hidden: h,
            act,
            device: device.clone(),
        })
    }

    /// Tower output at the feature layer for every crop of `img`: `[1 + crops, 1024, hidden]`.
    pub fn tower(&self, img: &PreparedImage) -> Result<Tensor> {
        let mut job = self.start(img);
        while job.towers.len() < job.crops {
            self.advance(img, &mut job)?;
        }
        Ok(Tensor::cat(&job.towers, 0)?)
    }

    /// Crop `n` of `img` after the patch embedding (`[1, 1024, hidden]`) and its key mask.
    fn embed_crop(&self, img: &PreparedImage, n: usize) -> Result<(Tensor, ScoreTerms)> {
        let p = GRID * GRID;
        let k = 3 * PATCH * PATCH;
        let pixels = &img.pixel_values()[n * 3 * CROP * CROP..(n + 1) * 3 * CROP * CROP];
        let masks = &img.crop_masks()[n * p..(n + 1) * p];
        // Unfold patches, channel-major inside a patch (the conv weight's layout).
        let mut patches = vec![0f32; p * k];
        for r in 0..GRID {
            for col in 0..GRID {
                let dst = &mut patches[(r * GRID + col) * k..][..k];
                for ch in 0..3 {
                    for ky in 0..PATCH {
                        let src = ch * CROP * CROP + (r * PATCH + ky) * CROP + col * PATCH;
                        dst[ch * PATCH * PATCH + ky * PATCH..][..PATCH].copy_from_slice(&pixels[src..src + PATCH]);
                    }
                }
            }
        }
        let patches = Tensor::from_vec(patches, (p, k), &self.device)?.to_dtype(self.act)?;
        let x = kernels::linear_bias(&patches, &self.patch_w, &self.patch_b)?;
        let (pos, any_pad) = position_ids(masks, 1);
        let pos = Tensor::from_vec(pos, p, &self.device)?;
        let x = (x + self.pos_table.index_select(&pos, 0)?)?.reshape((1, p, self.hidden))?;
        let keys = any_pad.then(|| masks.iter().map(|&v| if v == 1 { 0.0 } else { f32::NEG_INFINITY }).collect());
        Ok((x, ScoreTerms { keys, relative: None }))
    }

    /// The assembled `sub_glb` sequence before the projector: `[tokens, hidden]`.
    pub fn assemble(&self, img: &PreparedImage, tower: &Tensor) -> Result<Tensor> {
        let h = self.hidden;
        let half = GRID / 2;
        // [n, 32, 32, h] → 2×2 average pool → [n, 16, 16, h]
        let n = tower.dim(0)?;
        let pooled = tower
            .reshape((n, half, 2, half, 2, h))?
            .to_dtype(DType::F32)?
            .sum(4)?
            .sum(2)?
            .affine(0.25, 0.0)?
            .to_dtype(self.act)?; // [n, 16, 16, h]
        let sub = self.sub_gn.reshape((1, 1, h))?;
        let with_rows = |grid: Tensor, rows: usize| -> Result<Tensor> {
            // [rows, cols, h] → [rows·(cols+1), h]
            let sep = sub.broadcast_as((rows, 1, h))?;
            Ok(Tensor::cat(&[&grid, &sep], 1)?.reshape(((), h))?)
        };
        let global = with_rows(pooled.get(0)?, half)?;
        let (gw, gh) = img.grid;
        let local = pooled
            .narrow(0, 1, gw * gh)?
            .reshape((gh, gw, half, half, h))?
            .transpose(1, 2)?
            .reshape((gh * half, gw * half, h))?;
        let (uh, uw) = valid_pooled(img);
        let local = with_rows(local.narrow(0, 0, uh)?.narrow(1, 0, uw)?.contiguous()?, uh)?;
        Ok(Tensor::cat(&[&local, &self.glb_gn.reshape((1, h))?, &global], 0)?)
    }

    /// The projected features of `img`: `[num_tokens, decoder hidden]`.
    pub fn encode(&self, img: &PreparedImage) -> Result<Tensor> {
        let mut job = self.start(img);
        loop {
            if let Some(f) = self.advance(img, &mut job)? {
                return Ok(f);
            }
        }
    }

    /// Starts encoding `img`; run it with [`VisionEncoder::advance`].
    pub fn start(&self, img: &PreparedImage) -> ImageJob {
        ImageJob { crops: 1 + img.crops(), towers: Vec::new(), inflight: None, seq: None, projected: Vec::new() }
    }

    /// Runs the next piece of `job` (started on this `img`): a crop's patch embedding, a third
    /// of a tower layer of that crop, the pooling and assembly, or the projection of the next
    /// rows.
    /// After the last piece returns the image's features `[num_tokens, decoder hidden]`.
    pub fn advance(&self, img: &PreparedImage, job: &mut ImageJob) -> Result<Option<Tensor>> {
        if job.towers.len() < job.crops {
            let Some(mut c) = job.inflight.take() else {
                let (x, terms) = self.embed_crop(img, job.towers.len())?;
                job.inflight = Some(Crop { x, terms, mid: None, piece: 0 });
                return Ok(None);
            };
            let layer = &self.layers[c.piece / 3];
            match (c.piece % 3, c.mid.take()) {
                (0, _) => c.x = layer.attention(&c.x, &c.terms)?,
                (1, _) => c.mid = Some(layer.mlp_up(&c.x)?),
                (_, Some(mid)) => c.x = layer.mlp_down(&c.x, &mid)?,
                (_, None) => return Err(Error::Media("the tower's MLP ran out of order".into())),
            }
            c.piece += 1;
            if c.piece < 3 * self.layers.len() {
                job.inflight = Some(c);
            } else {
                job.towers.push(c.x);
            }
            return Ok(None);
        }
        let Some(seq) = &job.seq else {
            job.seq = Some(self.assemble(img, &Tensor::cat(&job.towers, 0)?)?);
            job.towers.clear();
            job.crops = 0;
            return Ok(None);
        };
        let done: usize = job.projected.iter().map(|t| t.dims()[0]).sum();
        let n = PROJECT_ROWS.min(seq.dim(0)? - done);
        job.projected.push(self.img_projection.forward(&seq.narrow(0, done, n)?)?);
        if done + n < seq.dim(0)? {
            return Ok(None);
        }
        let out = Tensor::cat(&job.projected, 0)?;
        if out.dim(0)? != img.num_tokens {
            return Err(Error::Media(format!(
                "image features have {} rows but the prompt reserved {}",
                out.dim(0)?,
                img.num_tokens
            )));
        }
        Ok(Some(out))
    }
}

/// An image on its way through the encoder a piece at a time (see
/// [`VisionEncoder::advance`]), so a scheduler can encode it between decode steps. Each crop
/// goes through the tower on its own and the pieces compute exactly what
/// [`VisionEncoder::encode`] computes: it runs a job to its end.
#[derive(Debug)]
pub struct ImageJob {
    /// Crops of the image (0 once the tower is done).
    crops: usize,
    /// Tower outputs of the crops done.
    towers: Vec<Tensor>,
    /// The crop in flight.
    inflight: Option<Crop>,
    /// The assembled sequence, once the tower is done.
    seq: Option<Tensor>,
    /// Its projected rows so far.
    projected: Vec<Tensor>,
}

/// A crop in the tower: its hidden state, its key mask, the MLP's inner activations between
/// its two products, and the pieces it has been through (three per layer: attention, the
/// MLP's first product, its second).
#[derive(Debug)]
struct Crop {
    x: Tensor,
    terms: ScoreTerms,
    mid: Option<Tensor>,
    piece: usize,
}

impl ImageJob {
    /// What the next piece is: 0 a crop's embedding, 1–3 a layer's attention, MLP up, MLP
    /// down, 4 the assembly or a projection.
    pub fn next_piece(&self) -> usize {
        match &self.inflight {
            Some(c) => 1 + c.piece % 3,
            None if self.towers.len() < self.crops => 0,
            None => 4,
        }
    }

    /// Crops through the tower so far, of the crops of the image.
    pub fn crops_done(&self, img: &PreparedImage) -> (usize, usize) {
        let total = 1 + img.crops();
        let done = if self.seq.is_some() { total } else { self.towers.len() };
        (done, total)
    }
}

/// NaViT position ids for `b` crops: a valid patch `(r, c)` of a crop with `nh × nw` valid
/// patches gets `⌊32r/nh⌋·32 + ⌊32c/nw⌋` (a stretched grid), padding gets 0. Also whether
/// any patch is padding.
fn position_ids(masks: &[u8], b: usize) -> (Vec<u32>, bool) {
    let p = GRID * GRID;
    let mut ids = vec![0u32; b * p];
    let mut any_pad = false;
    for n in 0..b {
        let m = &masks[n * p..(n + 1) * p];
        let nh = (0..GRID).filter(|&r| m[r * GRID] == 1).count().max(1);
        let nw = (0..GRID).filter(|&c| m[c] == 1).count().max(1);
        for r in 0..GRID {
            for c in 0..GRID {
                if m[r * GRID + c] == 1 {
                    ids[n * p + r * GRID + c] = ((GRID * r / nh) * GRID + GRID * c / nw) as u32;
                } else {
                    any_pad = true;
                }
            }
        }
    }
    (ids, any_pad)
}

/// Rows and columns of the pooled local grid that hold image (`Uh`, `Uw`, spec §4.3).
fn valid_pooled(img: &PreparedImage) -> (usize, usize) {
    let mw = GRID * img.grid.0;
    let mh = GRID * img.grid.1;
    let rows = (0..mh).step_by(2).filter(|&r| img.mask[r * mw] == 1).count();
    let cols = (0..mw).step_by(2).filter(|&c| img.mask[c] == 1).count();
    (rows, cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stretched_positions_for_a_partly_padded_crop() {
        // 22 valid rows, 32 valid columns (the second crop row of a 1280×720 image).
        let mut m = vec![1u8; GRID * GRID];
        for r in 22..GRID {
            for c in 0..GRID {
                m[r * GRID + c] = 0;
            }
        }
        let (ids, pad) = position_ids(&m, 1);
        assert!(pad);
        assert_eq!(ids[0], 0);
        assert_eq!(ids[21 * GRID + 5], ((32 * 21 / 22) * 32 + 5) as u32);
        assert_eq!(ids[22 * GRID], 0);
        let (full, pad) = position_ids(&[1u8; GRID * GRID], 1);
        assert!(!pad);
        assert_eq!(full, (0..1024).collect::<Vec<u32>>());
    }
}
