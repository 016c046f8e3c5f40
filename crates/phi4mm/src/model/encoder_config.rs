//! Sizes of the two media encoders. The official `config.json` describes the Conformer under
//! `audio_processor.config` (original key names) and the SigLIP tower not at all (SigLIP-so400m
//! is implied). Optional `vision_config` / `audio_config` objects with transformers-native key
//! names override those sizes — this is how small test checkpoints describe small towers.
//! Where both audio descriptions give a value they must agree.

use serde_json::Value;

use crate::model::config::ModelConfig;
use crate::error::{Error, Result};

/// The SigLIP (NaViT) vision tower, spec §4.2.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub crop_size: usize,
    pub layer_norm_eps: f64,
    /// Hidden state used for the image features (−2: output of the second-to-last layer).
    pub feature_layer: i64,
}

/// The Conformer speech encoder, spec §5.4.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_blocks: usize,
    pub num_attention_heads: usize,
    pub input_size: usize,
    pub nemo_conv_channels: usize,
    pub time_reduction: usize,
    pub kernel_size: usize,
    pub ext_pw_out_channel: usize,
    pub depthwise_separable_out_channel: usize,
    pub depthwise_multiplier: usize,
    pub bias_max_distance: usize,
    pub chunk_size: i64,
}

impl Default for VisionConfig {
    /// SigLIP-so400m-patch14-448.
    fn default() -> Self {
        VisionConfig {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            image_size: 448,
            patch_size: 14,
            crop_size: 448,
            layer_norm_eps: 1e-6,
            feature_layer: -2,
        }
    }
}

impl Default for AudioConfig {
    /// The official checkpoint's Conformer.
    fn default() -> Self {
        AudioConfig {
            hidden_size: 1024,
            intermediate_size: 1536,
            num_blocks: 24,
            num_attention_heads: 16,
            input_size: 80,
            nemo_conv_channels: 1024,
            time_reduction: 8,
            kernel_size: 3,
            ext_pw_out_channel: 1024,
            depthwise_separable_out_channel: 1024,
            depthwise_multiplier: 1,
            bias_max_distance: 500,
            chunk_size: -1,
        }
    }
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn as_usize(v: &Value, key: &str) -> Result<usize> {
    v.as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| Error::BadConfig(format!("`{key}` must be a non-negative integer, got {v}")))
}

fn as_i64(v: &Value, key: &str) -> Result<i64> {
    v.as_i64()
        .ok_or_else(|| Error::BadConfig(format!("`{key}` must be an integer, got {v}")))
}

impl VisionConfig {
    /// SigLIP-so400m, overridden by `vision_config` and `embd_layer.image_embd_layer.crop_size`.
    pub fn from_model_config(cfg: &ModelConfig) -> Result<Self> {
        let mut c = VisionConfig::default();
        if let Some(crop) = cfg.embd_layer.as_ref().and_then(|e| get(e, &["image_embd_layer", "crop_size"])) {
            c.crop_size = as_usize(crop, "embd_layer.image_embd_layer.crop_size")?;
        }
        if let Some(v) = &cfg.vision_config {
            let fields: [(&str, &mut usize); 7] = [
                ("hidden_size", &mut c.hidden_size),
                ("intermediate_size", &mut c.intermediate_size),
                ("num_hidden_layers", &mut c.num_hidden_layers),
                ("num_attention_heads", &mut c.num_attention_heads),
                ("image_size", &mut c.image_size),
                ("patch_size", &mut c.patch_size),
                ("crop_size", &mut c.crop_size),
            ];
            for (k, slot) in fields {
                if let Some(x) = v.get(k) {
                    *slot = as_usize(x, &format!("vision_config.{k}"))?;
                }
            }
            if let Some(x) = v.get("layer_norm_eps").and_then(Value::as_f64) {
                c.layer_norm_eps = x;
            }
            if let Some(x) = v.get("feature_layer") {
                c.feature_layer = as_i64(x, "vision_config.feature_layer")?;
            }
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::BadConfig(format!("vision: {m}")));
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || self.crop_size != self.image_size || self.crop_size % self.patch_size != 0 {
            return bad(format!(
                "crop_size {} must equal image_size {} and be a multiple of patch_size {}",
                self.crop_size, self.image_size, self.patch_size
            ));
        }
        let layers = self.num_hidden_layers as i64;
        if self.feature_layer >= layers || self.feature_layer < -layers {
            return bad(format!("feature_layer {} is outside {layers} layers", self.feature_layer));
        }
        Ok(())
    }
}

impl AudioConfig {
    /// The Conformer from `audio_processor.config` (hub names) and `audio_config` (native names).
    pub fn from_model_config(cfg: &ModelConfig) -> Result<Self> {
        let mut c = AudioConfig::default();
        let hub = cfg.audio_processor.as_ref().and_then(|a| a.get("config"));
        let native = cfg.audio_config.as_ref();
        // (native name, hub path)
        let keys: [(&str, &[&str]); 12] = [
            ("hidden_size", &["attention_dim"]),
            ("intermediate_size", &["linear_units"]),
            ("num_blocks", &["num_blocks"]),
            ("num_attention_heads", &["attention_heads"]),
            ("input_size", &["input_size"]),
            ("nemo_conv_channels", &["nemo_conv_settings", "conv_channels"]),
            ("time_reduction", &["time_reduction"]),
            ("kernel_size", &["kernel_size"]),
            ("ext_pw_out_channel", &["ext_pw_out_channel"]),
            ("depthwise_separable_out_channel", &["depthwise_seperable_out_channel"]),
            ("depthwise_multiplier", &["depthwise_multiplier"]),
            ("bias_max_distance", &["relative_attention_bias_args", "t5_bias_max_distance"]),
        ];
        for (name, hub_path) in keys {
            let from_hub = hub.and_then(|h| get(h, hub_path));
            let from_native = native.and_then(|n| n.get(name));
            let value = match (from_hub, from_native) {
                (Some(h), Some(n)) => {
                    let (h, n) = (as_usize(h, name)?, as_usize(n, name)?);
                    if h != n {
                        return Err(Error::BadConfig(format!(
                            "audio_config.{name} = {n} disagrees with audio_processor.config.{} = {h}",
                            hub_path.join(".")
                        )));
                    }
                    Some(n)
                }
                (Some(v), None) | (None, Some(v)) => Some(as_usize(v, name)?),
                (None, None) => None,
            };
            if let Some(v) = value {
                *c.field(name) = v;
            }
        }
        if let Some(x) = native.and_then(|n| n.get("chunk_size")).or(hub.and_then(|h| h.get("chunk_size"))) {
            c.chunk_size = as_i64(x, "chunk_size")?;
        }
        c.validate()?;
        Ok(c)
    }

    fn field(&mut self, name: &str) -> &mut usize {
        match name {
            "hidden_size" => &mut self.hidden_size,
            "intermediate_size" => &mut self.intermediate_size,
            "num_blocks" => &mut self.num_blocks,
            "num_attention_heads" => &mut self.num_attention_heads,
            "input_size" => &mut self.input_size,
            "nemo_conv_channels" => &mut self.nemo_conv_channels,
            "time_reduction" => &mut self.time_reduction,
            "kernel_size" => &mut self.kernel_size,
            "ext_pw_out_channel" => &mut self.ext_pw_out_channel,
            "depthwise_separable_out_channel" => &mut self.depthwise_separable_out_channel,
            "depthwise_multiplier" => &mut self.depthwise_multiplier,
            _ => &mut self.bias_max_distance,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::BadConfig(format!("audio: {m}")));
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.time_reduction != 8 {
            return bad(format!("time_reduction {} is not supported (8)", self.time_reduction));
        }
        if self.input_size != 80 {
            return bad(format!("input_size {} is not supported (80 mel bins)", self.input_size));
        }
        if self.chunk_size != -1 {
            return bad(format!("chunk_size {} (streaming) is not supported (-1)", self.chunk_size));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> Result<ModelConfig> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(path);
        ModelConfig::from_file(&p)
    }

    #[test]
    fn official_config_gives_so400m_and_the_official_conformer() -> Result<()> {
        let cfg = fixture("full/config.json")?;
        assert_eq!(VisionConfig::from_model_config(&cfg)?, VisionConfig::default());
        assert_eq!(AudioConfig::from_model_config(&cfg)?, AudioConfig::default());
        assert_eq!(cfg.head_dim(), 128);
        assert_eq!(cfg.rotary_dims(), 96);
        assert_eq!(cfg.vision_lora.as_ref().map(|l| l.scale()), Some(2.0));
        assert_eq!(cfg.speech_lora.as_ref().map(|l| l.scale()), Some(2.0));
        Ok(())
    }

    #[test]
    fn tiny_config_overrides_encoder_sizes() -> Result<()> {
        let cfg = fixture("tiny/config.json")?;
        let v = VisionConfig::from_model_config(&cfg)?;
        assert_eq!((v.hidden_size, v.num_hidden_layers, v.num_attention_heads), (32, 3, 2));
        let a = AudioConfig::from_model_config(&cfg)?;
        assert_eq!((a.hidden_size, a.num_blocks, a.nemo_conv_channels, a.bias_max_distance), (32, 2, 32, 500));
        Ok(())
    }

    #[test]
    fn disagreeing_audio_descriptions_are_rejected() -> Result<()> {
        let mut cfg = fixture("tiny/config.json")?;
        if let Some(a) = cfg.audio_config.as_mut() {
            a["hidden_size"] = 64.into();
        }
        let e = AudioConfig::from_model_config(&cfg).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("hidden_size") && e.contains("attention_dim"), "{e}");
        Ok(())
    }
}
