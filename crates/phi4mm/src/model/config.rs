//! Typed, validated views of the checkpoint's JSON files: `config.json` (the hub's `phi4mm`
//! shape, spec §1.2) and `generation_config.json` (§1.3).
//!
//! The serde structs mirror the files; [`ModelConfig::validate`] turns them into a form the rest
//! of the crate can trust (head sizes divide, factor lists have the right length, …).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// `config.json` of `microsoft/Phi-4-multimodal-instruct` (model_type `phi4mm`).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_partial")]
    pub partial_rotary_factor: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub vision_lora: Option<LoraConfig>,
    #[serde(default)]
    pub speech_lora: Option<LoraConfig>,
    /// Encoder descriptions; typed by the vision and audio modules.
    #[serde(default)]
    pub embd_layer: Option<serde_json::Value>,
    #[serde(default)]
    pub audio_processor: Option<serde_json::Value>,
    #[serde(default)]
    pub vision_config: Option<serde_json::Value>,
    #[serde(default)]
    pub audio_config: Option<serde_json::Value>,
}

/// `rope_scaling` of the hub config (LongRoPE).
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(rename = "type", alias = "rope_type")]
    pub kind: String,
    #[serde(default)]
    pub short_factor: Vec<f64>,
    #[serde(default)]
    pub long_factor: Vec<f64>,
}

/// One LoRA block (`vision_lora` / `speech_lora`), spec §1.2 and §3.
#[derive(Debug, Clone, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub dp: f64,
    #[serde(default)]
    pub layer: Option<String>,
}

impl LoraConfig {
    /// The adapter's output scale, `lora_alpha / r` (2.0 for both official adapters).
    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }
}

fn default_act() -> String {
    "silu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}
fn default_partial() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: ModelConfig = read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Per-head width (128 for the real model).
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rotated dims per head, `int(head_dim · partial_rotary_factor)` (96 for the real model).
    pub fn rotary_dims(&self) -> usize {
        (self.head_dim() as f64 * self.partial_rotary_factor) as usize
    }

    /// The context length at which LongRoPE switches from short to long factors (4096).
    pub fn original_max_positions(&self) -> usize {
        self.original_max_position_embeddings
            .unwrap_or(self.max_position_embeddings)
    }

    /// Checks everything the decoder relies on; options we do not implement fail here.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::BadConfig(m));
        if self.model_type != "phi4mm" {
            return bad(format!(
                "model_type is `{}`, expected `phi4mm` (the official hub layout of \
                 microsoft/Phi-4-multimodal-instruct)",
                self.model_type
            ));
        }
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_key_value_heads == 0
        {
            return bad("hidden_size and head counts must be positive".into());
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads {} is not divisible by num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!("hidden_act `{}` is not supported (silu)", self.hidden_act));
        }
        if self.attention_bias || self.mlp_bias {
            return bad("attention_bias / mlp_bias are not supported".into());
        }
        let rot = self.rotary_dims();
        if rot == 0 || rot % 2 != 0 || rot > self.head_dim() {
            return bad(format!(
                "partial_rotary_factor {} gives {rot} rotary dims of head_dim {}; need an even \
                 number between 2 and head_dim",
                self.partial_rotary_factor,
                self.head_dim()
            ));
        }
        if let Some(rs) = &self.rope_scaling {
            if rs.kind != "longrope" {
                return bad(format!("rope_scaling type `{}` is not supported (longrope)", rs.kind));
            }
            for (name, f) in [("short_factor", &rs.short_factor), ("long_factor", &rs.long_factor)]
            {
                if f.len() != rot / 2 {
                    return bad(format!(
                        "rope_scaling.{name} has {} entries, expected rotary_dims/2 = {}",
                        f.len(),
                        rot / 2
                    ));
                }
            }
            if self.original_max_position_embeddings.is_none() {
                return bad("longrope needs original_max_position_embeddings".into());
            }
        }
        for (name, lora) in [("vision_lora", &self.vision_lora), ("speech_lora", &self.speech_lora)]
        {
            if let Some(l) = lora {
                if l.r == 0 {
                    return bad(format!("{name}.r must be positive"));
                }
            }
        }
        Ok(())
    }
}

/// `generation_config.json`: the ids that end a generation.
#[derive(Debug, Clone, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl Default for GenerationConfig {
    /// The hub file's values (spec §1.3).
    fn default() -> Self {
        GenerationConfig {
            bos_token_id: Some(199_999),
            eos_token_id: vec![200_020, 199_999],
            pad_token_id: Some(199_999),
        }
    }
}

impl GenerationConfig {
    /// Reads the file, or the hub defaults when it does not exist.
    pub fn from_file_or_default(path: &Path) -> Result<Self> {
        if path.exists() {
            let cfg: GenerationConfig = read_json(path)?;
            if cfg.eos_token_id.is_empty() {
                return Ok(GenerationConfig {
                    eos_token_id: GenerationConfig::default().eos_token_id,
                    ..cfg
                });
            }
            Ok(cfg)
        } else {
            Ok(GenerationConfig::default())
        }
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        None(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) => v,
        OneOrMany::None(()) => vec![],
    })
}

/// Reads a JSON file into `T`, naming the file in every error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadJson {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
