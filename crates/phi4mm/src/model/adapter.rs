//! A trained adapter on disk, in PEFT's layout so that PEFT, vLLM and phi4mm all read it:
//! `adapter_config.json` (LoRA type, rank, alpha, target modules, base model, plus a `phi4mm`
//! block with the mode) and `adapter_model.safetensors` with PEFT's tensor names
//! (`base_model.model.model.layers.{i}.{proj}.lora_{A,B}.weight`, f32).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The file names PEFT reads.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's regex over module names for the four decoder projections.
const TARGET_MODULES: &str = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))";

/// What an adapter is, as its config records it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    /// `speech` or `vision`.
    pub mode: String,
    pub rank: usize,
    pub alpha: f64,
    /// The model the adapter was trained on (its hub id or directory).
    pub base_model: String,
}

/// `model.layers.0.self_attn.qkv_proj.lora_A.speech.weight` → PEFT's
/// `base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight`.
pub fn peft_name(name: &str, mode: &str) -> String {
    format!("base_model.model.{}", name.replace(&format!(".{mode}.weight"), ".weight"))
}

/// The inverse of [`peft_name`], or `None` for a name outside that pattern.
pub fn checkpoint_name(peft: &str, mode: &str) -> Option<String> {
    let rest = peft.strip_prefix("base_model.model.")?;
    let stem = rest.strip_suffix(".weight")?;
    (stem.ends_with(".lora_A") || stem.ends_with(".lora_B")).then(|| format!("{stem}.{mode}.weight"))
}

/// Writes `tensors` (checkpoint names) and the config into `dir` (created if missing).
pub fn save(dir: &Path, info: &AdapterInfo, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Request(format!("cannot create {}: {e}", dir.display())))?;
    let mut map = HashMap::new();
    for (name, t) in tensors {
        map.insert(peft_name(name, &info.mode), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
    }
    candle_core::safetensors::save(&map, dir.join(WEIGHTS_FILE))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": info.rank,
        "lora_alpha": info.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": TARGET_MODULES,
        "base_model_name_or_path": info.base_model,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "phi4mm": {"mode": info.mode},
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Request(e.to_string()))?;
    std::fs::write(dir.join(CONFIG_FILE), text).map_err(|e| Error::Request(format!("cannot write {}: {e}", dir.display())))
}

/// Reads an adapter written by [`save`] (or PEFT, for a Phi-4-multimodal LoRA): its info and
/// tensors under checkpoint names for `mode`.
pub fn load(dir: &Path, mode: &str) -> Result<(AdapterInfo, Vec<(String, Tensor)>)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::Request(format!("cannot read {}: {e}", cfg_path.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Request(format!("{} is not JSON: {e}", cfg_path.display())))?;
    let rank = v.get("r").and_then(|r| r.as_u64()).ok_or_else(|| Error::Request(format!("{} has no integer \"r\"", cfg_path.display())))? as usize;
    let alpha = v.get("lora_alpha").and_then(|a| a.as_f64()).ok_or_else(|| Error::Request(format!("{} has no \"lora_alpha\"", cfg_path.display())))?;
    if v.get("use_rslora").and_then(|b| b.as_bool()) == Some(true) {
        return Err(Error::Request(format!("{}: rsLoRA adapters are not supported", cfg_path.display())));
    }
    if let Some(m) = v.pointer("/phi4mm/mode").and_then(|m| m.as_str()).filter(|m| *m != mode) {
        return Err(Error::Request(format!("{} is a {m} adapter, not a {mode} one", dir.display())));
    }
    let base_model = v.get("base_model_name_or_path").and_then(|b| b.as_str()).unwrap_or("").to_string();
    let wpath = dir.join(WEIGHTS_FILE);
    let raw = candle_core::safetensors::load(&wpath, &Device::Cpu).map_err(|e| Error::Request(format!("cannot read {}: {e}", wpath.display())))?;
    let mut tensors = Vec::with_capacity(raw.len());
    for (k, t) in raw {
        let name = checkpoint_name(&k, mode).ok_or_else(|| Error::Request(format!("{}: unexpected tensor `{k}` (not a LoRA A/B weight)", wpath.display())))?;
        tensors.push((name, t));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((AdapterInfo { mode: mode.to_string(), rank, alpha, base_model }, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_peft() {
        let n = "model.layers.3.mlp.down_proj.lora_B.speech.weight";
        let p = peft_name(n, "speech");
        assert_eq!(p, "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight");
        assert_eq!(checkpoint_name(&p, "speech").as_deref(), Some(n));
        assert_eq!(checkpoint_name("base_model.model.model.norm.weight", "speech"), None);
    }
}
