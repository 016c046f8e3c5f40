//! The one linear type every decoder projection goes through: a base weight plus the two
//! unmerged LoRA adapters of the checkpoint (spec §3). The adapter is chosen per call, so one
//! loaded model serves text, vision and speech requests: `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, `s = α/r`.
//!
//! With a quantised base weight the adapters are quantised too, always to Q8_0 (their two thin
//! products are a small part of the work, and Q8_0 keeps their error well below the base's).

use candle_core::{DType, Tensor};

use crate::model::config::LoraConfig;
use crate::error::{Error, Result};
use crate::kernels::batch::BatchScratch;
use crate::kernels::Matrix;
use crate::model::quant::{Act, QType};
use crate::model::weights::Scope;

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
pub(super) struct LoraPair {
    pub(super) a: Matrix, // [r, in]
    pub(super) b: Matrix, // [out, r]
    pub(super) scale: f64,
}

/// A bias-free linear with optional vision and speech adapters.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub(super) base: Matrix, // [out, in]
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
        quant: Option<QType>,
    ) -> Result<Self> {
        // The hub layout wraps the base weight (`base_layer`); a plain `weight` is accepted too.
        let base_name = if !s.contains("base_layer.weight") && s.contains("weight") {
            "weight"
        } else {
            "base_layer.weight"
        };
        let base = s.matrix(base_name, out_dim, in_dim, dtype, quant)?;
        let lora_quant = quant.map(|_| QType::Q8_0);
        let mut out = LoraLinear {
            base,
            vision: None,
            speech: None,
        };
        for (adapter, cfg) in loras {
            let Some(cfg) = cfg else { continue };
            let n = adapter.name();
            let pair = LoraPair {
                a: s.matrix(&format!("lora_A.{n}.weight"), cfg.r, in_dim, dtype, lora_quant)?,
                b: s.matrix(&format!("lora_B.{n}.weight"), out_dim, cfg.r, dtype, lora_quant)?,
                scale: cfg.scale(),
            };
            match adapter {
                Adapter::Vision => out.vision = Some(pair),
                Adapter::Speech => out.speech = Some(pair),
            }
        }
        Ok(out)
    }

    /// Bytes of the base weight and of each adapter.
    pub fn nbytes(&self) -> (usize, usize) {
        let lora = [&self.vision, &self.speech].iter().filter_map(|p| p.as_ref()).map(|p| p.a.nbytes() + p.b.nbytes()).sum();
        (self.base.nbytes(), lora)
    }

    /// The base weight's format (`bf16`, `q4_0`, …).
    pub fn format(&self) -> String {
        self.base.format()
    }

    /// Whether this layer holds `adapter`.
    pub fn has(&self, adapter: Adapter) -> bool {
        match adapter {
            Adapter::Vision => self.vision.is_some(),
            Adapter::Speech => self.speech.is_some(),
        }
    }

    /// Replaces (or adds) `adapter`'s pair by `a` `[r, in]`, `b` `[out, r]` with output scale
    /// `scale`, in this layer's format: Q8_0 when the base is quantised and the widths allow,
    /// else dense in `dtype`.
    pub(super) fn set_pair(&mut self, adapter: Adapter, a: &Tensor, b: &Tensor, scale: f64, dtype: DType) -> Result<()> {
        let (out_dim, in_dim) = self.base.dims()?;
        let (ar, ac) = a.dims2()?;
        let (br, bc) = b.dims2()?;
        if ac != in_dim || br != out_dim || ar != bc {
            return Err(Error::Request(format!("LoRA A {:?} and B {:?} do not fit a [{out_dim}, {in_dim}] projection", a.dims(), b.dims())));
        }
        let quant = matches!(self.base, Matrix::Quant(_));
        let convert = |t: &Tensor| -> Result<Matrix> {
            let (rows, cols) = t.dims2()?;
            if quant && cols % crate::model::quant::BLOCK == 0 {
                let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                return Ok(Matrix::Quant(std::sync::Arc::new(crate::model::quant::QMatrix::quantize(QType::Q8_0, &v, rows, cols)?)));
            }
            Ok(Matrix::Dense(t.to_dtype(dtype)?.contiguous()?))
        };
        let pair = Some(LoraPair { a: convert(a)?, b: convert(b)?, scale });
        match adapter {
            Adapter::Vision => self.vision = pair,
            Adapter::Speech => self.speech = pair,
        }
        Ok(())
    }

    /// Removes `adapter`'s pair (requests of that mode then fail to run).
    pub(super) fn drop_pair(&mut self, adapter: Adapter) {
        match adapter {
            Adapter::Vision => self.vision = None,
            Adapter::Speech => self.speech = None,
        }
    }

    pub(super) fn pair_opt(&self, adapter: Adapter) -> Option<&LoraPair> {
        match adapter {
            Adapter::Vision => self.vision.as_ref(),
            Adapter::Speech => self.speech.as_ref(),
        }
    }

    fn pair(&self, adapter: Adapter) -> Result<&LoraPair> {
        self.pair_opt(adapter).ok_or_else(|| Error::Request(format!("this checkpoint has no {} LoRA adapter", adapter.name())))
    }

    /// `x` `[n, in]` → `[n, out]` with the base weight and, if given, the adapter.
    pub fn forward(&self, x: &Tensor, adapter: Option<Adapter>) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        let Some(adapter) = adapter else { return Ok(y) };
        let pair = self.pair(adapter)?;
        let low = pair.a.forward(x)?; // [n, r]
        let delta = (pair.b.forward(&low)? * pair.scale)?;
        Ok((y + delta)?)
    }

    /// Whether [`LoraLinear::matmat`] runs every weight of this layer.
    pub fn has_matvec(&self) -> bool {
        self.base.has_matvec() && [&self.vision, &self.speech].iter().flat_map(|p| p.iter()).all(|p| p.a.has_matvec() && p.b.has_matvec())
    }

    /// [`LoraLinear::forward`] without tensors for the decode step's `b` rows, row `i` with
    /// `adapters[i]` and the same roundings to the activation dtype (`A`) as the tensor ops:
    /// the base weight read once for all rows, each adapter's pair once for the rows that use
    /// it (rows of other modes skip it). Row `i` is the same whatever the other rows are.
    pub fn matmat<A: Act>(&self, x: &[f32], adapters: &[Option<Adapter>], y: &mut [f32], s: &mut LoraBatch) -> Result<()> {
        let rd = A::round;
        let (b, (out, k)) = (adapters.len(), self.base.dims()?);
        self.base.matmat(x, b, y, &mut s.batch)?;
        y.iter_mut().for_each(|v| *v = rd(*v));
        for adapter in [Adapter::Vision, Adapter::Speech] {
            let rows: Vec<usize> = (0..b).filter(|&i| adapters[i] == Some(adapter)).collect();
            if rows.is_empty() {
                continue;
            }
            let pair = self.pair(adapter)?;
            let r = pair.a.dims()?.0;
            s.x.clear();
            rows.iter().for_each(|&i| s.x.extend_from_slice(&x[i * k..(i + 1) * k]));
            s.low.resize(rows.len() * r, 0.0);
            pair.a.matmat(&s.x, rows.len(), &mut s.low, &mut s.batch)?;
            s.low.iter_mut().for_each(|v| *v = rd(*v));
            s.delta.resize(rows.len() * out, 0.0);
            pair.b.matmat(&s.low, rows.len(), &mut s.delta, &mut s.batch)?;
            let scale = rd(pair.scale as f32);
            for (&i, d) in rows.iter().zip(s.delta.chunks(out)) {
                for (y, &d) in y[i * out..(i + 1) * out].iter_mut().zip(d) {
                    *y = rd(*y + rd(rd(d) * scale));
                }
            }
        }
        Ok(())
    }
}

/// Working space for [`LoraLinear::matmat`].
#[derive(Debug, Default)]
pub struct LoraBatch {
    x: Vec<f32>,
    low: Vec<f32>,
    delta: Vec<f32>,
    batch: BatchScratch,
}
