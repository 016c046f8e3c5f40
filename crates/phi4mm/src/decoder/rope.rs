//! Partial rotary embedding with LongRoPE (spec §2.3–2.5).
//!
//! Only the first `rotary_dims` of each head are rotated (rotate-half pairing `i`/`i+d/2`);
//! cos and sin carry the LongRoPE attention factor in short and long mode alike. The long
//! factors apply to a whole forward call when the total sequence length exceeds
//! `original_max_position_embeddings`. Tables are computed in f32 the way the reference does
//! (`1 / (ext · θ^(2i/d))`, `φ = p · inv_freq`) and cast to the activation dtype.

use candle_core::{DType, Device, Tensor};

use crate::model::config::ModelConfig;
use crate::error::Result;

/// Inverse frequencies for short and long contexts plus the attention factor.
#[derive(Debug, Clone)]
pub struct Rope {
    short_inv_freq: Vec<f32>,
    long_inv_freq: Option<Vec<f32>>,
    attention_factor: f32,
    threshold: usize,
    rotary_dims: usize,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let dims = cfg.rotary_dims();
        let inv = |ext: Option<&[f64]>| -> Vec<f32> {
            (0..dims / 2)
                .map(|i| {
                    // torch: arange(0, d, 2).float() / d, then base ** that in f32.
                    let expo = (2 * i) as f32 / dims as f32;
                    let pow = (cfg.rope_theta).powf(expo as f64) as f32;
                    let e = ext.map_or(1.0, |f| f[i] as f32);
                    1.0f32 / (e * pow)
                })
                .collect()
        };
        match &cfg.rope_scaling {
            Some(rs) => {
                let orig = cfg.original_max_positions();
                let scale = cfg.max_position_embeddings as f64 / orig as f64;
                let attention_factor = if scale <= 1.0 {
                    1.0
                } else {
                    (1.0 + scale.ln() / (orig as f64).ln()).sqrt()
                };
                Rope {
                    short_inv_freq: inv(Some(&rs.short_factor)),
                    long_inv_freq: Some(inv(Some(&rs.long_factor))),
                    attention_factor: attention_factor as f32,
                    threshold: orig,
                    rotary_dims: dims,
                }
            }
            None => Rope {
                short_inv_freq: inv(None),
                long_inv_freq: None,
                attention_factor: 1.0,
                threshold: usize::MAX,
                rotary_dims: dims,
            },
        }
    }

    /// Whether a forward call whose attention spans `total_len` tokens uses the long factors.
    pub fn is_long(&self, total_len: usize) -> bool {
        self.long_inv_freq.is_some() && total_len > self.threshold
    }

    /// The LongRoPE attention factor (√(1 + ln 32 / ln 4096) ≈ 1.19024 for the real model).
    pub fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    /// Rotated dims per head.
    pub fn rotary_dims(&self) -> usize {
        self.rotary_dims
    }

    /// cos and sin for positions `start..start+n`, each `[n, rotary_dims/2]`, already scaled
    /// by the attention factor, in `dtype`.
    pub fn cos_sin(
        &self,
        start: usize,
        n: usize,
        long: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.rotary_dims / 2;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in start..start + n {
            self.push_cos_sin(p, long, &mut cos, &mut sin);
        }
        let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Appends cos and sin of position `p` (`rotary_dims/2` values each, f32, scaled by the
    /// attention factor).
    pub fn push_cos_sin(&self, p: usize, long: bool, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        let inv = match (&self.long_inv_freq, long) {
            (Some(l), true) => l,
            _ => &self.short_inv_freq,
        };
        for &f in inv {
            let phi = p as f32 * f;
            cos.push(phi.cos() * self.attention_factor);
            sin.push(phi.sin() * self.attention_factor);
        }
    }
}

/// Applies the partial rotation to `x` `[heads, n, head_dim]`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, rotary_dims: usize) -> Result<Tensor> {
    let head_dim = x.dim(2)?;
    let rot = x.narrow(2, 0, rotary_dims)?.contiguous()?.unsqueeze(0)?;
    let rot = candle_nn::rotary_emb::rope(&rot, cos, sin)?.squeeze(0)?;
    if rotary_dims == head_dim {
        return Ok(rot);
    }
    let pass = x.narrow(2, rotary_dims, head_dim - rotary_dims)?;
    Ok(Tensor::cat(&[&rot, &pass], 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Result<ModelConfig> {
        let json = r#"{"model_type":"phi4mm","hidden_size":3072,"num_hidden_layers":1,
            "num_attention_heads":24,"num_key_value_heads":8,"intermediate_size":8192,
            "vocab_size":200064,"partial_rotary_factor":0.75,"max_position_embeddings":131072,
            "original_max_position_embeddings":4096,
            "rope_scaling":{"type":"longrope","short_factor":[1.0],"long_factor":[1.0]}}"#;
        let mut c: ModelConfig = serde_json::from_str(json).map_err(|e| crate::error::Error::Request(e.to_string()))?;
        if let Some(rs) = c.rope_scaling.as_mut() {
            rs.short_factor = vec![1.0; 48];
            rs.long_factor = (0..48).map(|i| 1.0 + i as f64).collect();
        }
        Ok(c)
    }

    #[test]
    fn attention_factor_matches_spec() -> crate::error::Result<()> {
        let r = Rope::new(&cfg()?);
        assert!((r.attention_factor() as f64 - 1.1902380714238083).abs() < 1e-6);
        assert_eq!(r.rotary_dims(), 96);
        Ok(())
    }

    #[test]
    fn long_switch_is_strictly_above_4096() -> crate::error::Result<()> {
        let r = Rope::new(&cfg()?);
        assert!(!r.is_long(4096));
        assert!(r.is_long(4097));
        Ok(())
    }

    #[test]
    fn rotation_pairs_i_with_i_plus_half() -> Result<()> {
        // One head of width 4 fully rotated: pairs (0,2) and (1,3).
        let dev = Device::Cpu;
        let x = Tensor::from_vec(vec![1f32, 2., 3., 4.], (1, 1, 4), &dev)?;
        let cos = Tensor::from_vec(vec![0.5f32, 1.0], (1, 2), &dev)?;
        let sin = Tensor::from_vec(vec![0.25f32, 0.0], (1, 2), &dev)?;
        let y: Vec<f32> = apply(&x, &cos, &sin, 4)?.flatten_all()?.to_vec1()?;
        assert_eq!(y, vec![1. * 0.5 - 3. * 0.25, 2., 3. * 0.5 + 1. * 0.25, 4.]);
        Ok(())
    }
}
