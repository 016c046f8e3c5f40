//! The one linear type every decoder projection goes through: a base weight plus the two
//! unmerged LoRA adapters of the checkpoint (spec §3). The adapter is chosen per call, so one
//! loaded model serves text, vision and speech requests: `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, `s = α/r`.

use candle_core::{DType, Tensor};

use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::kernels;
use crate::weights::Scope;

/// Which LoRA adapter is active for a request (none for text-only requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Adapter {
    Vision,
    Speech,
}

impl Adapter {
    /// The checkpoint's name for the adapter (`lora_A.{name}.weight`).
    pub fn name(self) -> &'static str {
        match self {
            Adapter::Vision => "vision",
            Adapter::Speech => "speech",
        }
    }
}

/// One adapter's low-rank pair.
#[derive(Debug, Clone)]
struct LoraPair {
    a: Tensor, // [r, in]
    b: Tensor, // [out, r]
    scale: f64,
}

/// A bias-free linear with optional vision and speech adapters.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Tensor, // [out, in]
    vision: Option<LoraPair>,
    speech: Option<LoraPair>,
}

impl LoraLinear {
    /// Loads `{scope}.base_layer.weight` (or a plain `{scope}.weight`) and, for each configured
    /// adapter, `{scope}.lora_A.{a}.weight` / `lora_B.{a}.weight`.
    pub fn load(
        s: &Scope,
        in_dim: usize,
        out_dim: usize,
        loras: [(Adapter, Option<&LoraConfig>); 2],
        dtype: DType,
    ) -> Result<Self> {
        // The hub layout wraps the base weight (`base_layer`); a plain `weight` is accepted too.
        let base_name = if !s.contains("base_layer.weight") && s.contains("weight") {
            "weight"
        } else {
            "base_layer.weight"
        };
        let base = s.get(base_name, &[out_dim, in_dim], dtype)?;
        let mut out = LoraLinear {
            base,
            vision: None,
            speech: None,
        };
        for (adapter, cfg) in loras {
            let Some(cfg) = cfg else { continue };
            let n = adapter.name();
            let pair = LoraPair {
                a: s.get(&format!("lora_A.{n}.weight"), &[cfg.r, in_dim], dtype)?,
                b: s.get(&format!("lora_B.{n}.weight"), &[out_dim, cfg.r], dtype)?,
                scale: cfg.scale(),
            };
            match adapter {
                Adapter::Vision => out.vision = Some(pair),
                Adapter::Speech => out.speech = Some(pair),
            }
        }
        Ok(out)
    }

    /// Whether this layer holds `adapter`.
    pub fn has(&self, adapter: Adapter) -> bool {
        match adapter {
            Adapter::Vision => self.vision.is_some(),
            Adapter::Speech => self.speech.is_some(),
        }
    }

    /// `x` `[n, in]` → `[n, out]` with the base weight and, if given, the adapter.
    pub fn forward(&self, x: &Tensor, adapter: Option<Adapter>) -> Result<Tensor> {
        let y = kernels::linear(x, &self.base)?;
        let pair = match adapter {
            None => return Ok(y),
            Some(Adapter::Vision) => self.vision.as_ref(),
            Some(Adapter::Speech) => self.speech.as_ref(),
        };
        let pair = pair.ok_or_else(|| {
            Error::Request(format!(
                "this checkpoint has no {} LoRA adapter",
                adapter.map_or("", Adapter::name)
            ))
        })?;
        let low = kernels::linear(x, &pair.a)?; // [n, r]
        let delta = (kernels::linear(&low, &pair.b)? * pair.scale)?;
        Ok((y + delta)?)
    }
}
