//! The small building blocks both media encoders use: a linear layer with bias (weights in the
//! checkpoint's `[out, in]` layout, bf16 weights through the CPU kernel), LayerNorm, and the
//! two-layer GELU projector that maps encoder features into the decoder's width.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::kernels;
use crate::model::weights::Scope;

/// The dtype the encoders compute in for weights stored in `dtype` on `device`: f32 for bf16
/// weights on a CPU without AVX-512 BF16 (the weights stay bf16 and are widened inside the f32
/// GEMM; f32 activations spare a rounding pass around every product, keep the element-wise ops
/// off candle's bf16 loops and take the encoder attention kernel: a 7-crop image encoded in
/// 38 s instead of 66 s on the Intel machine), else `dtype` (with `vdpbf16ps` the bf16 tile
/// multiplies bf16 activations at twice the f32 tile's rate).
pub fn activation_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() && dtype == DType::BF16 && !kernels::bf16_tile_available() {
        DType::F32
    } else {
        dtype
    }
}

/// `y = x·Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub w: Tensor, // [out, in]
    pub b: Tensor, // [out]
}

impl Linear {
    /// `{scope}.weight` `[out, in]` and `{scope}.bias` `[out]`.
    pub fn load(s: &Scope, in_dim: usize, out_dim: usize, dtype: DType) -> Result<Self> {
        Ok(Linear { w: s.get("weight", &[out_dim, in_dim], dtype)?, b: s.get("bias", &[out_dim], dtype)? })
    }

    /// A kernel-1 convolution (`[out, in, 1]` or `[out, in, 1, 1]`) used as a linear layer.
    pub fn load_pointwise(s: &Scope, in_dim: usize, out_dim: usize, dims: usize, dtype: DType) -> Result<Self> {
        let mut shape = vec![out_dim, in_dim];
        shape.resize(dims, 1);
        Ok(Linear {
            w: s.get("weight", &shape, dtype)?.reshape((out_dim, in_dim))?,
            b: s.get("bias", &[out_dim], dtype)?,
        })
    }

    /// Layers over the same input as one product: their outputs side by side (q, k, v).
    pub fn concat(parts: &[Linear]) -> Result<Self> {
        let (w, b): (Vec<&Tensor>, Vec<&Tensor>) = parts.iter().map(|l| (&l.w, &l.b)).unzip();
        Ok(Linear { w: Tensor::cat(&w, 0)?, b: Tensor::cat(&b, 0)? })
    }

    /// `[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::linear_bias(x, &self.w, &self.b)
    }
}

/// LayerNorm with weight and bias over the last axis.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(s: &Scope, dim: usize, eps: f64, dtype: DType) -> Result<Self> {
        Ok(LayerNorm { w: s.get("weight", &[dim], dtype)?, b: s.get("bias", &[dim], dtype)?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(x, &self.w, &self.b, self.eps as f32)?)
    }
}

/// `Linear(in → out) → GELU (exact erf) → Linear(out → out)`, stored as `{scope}.0` and
/// `{scope}.2` (a PyTorch Sequential whose `.1` is the GELU).
#[derive(Debug, Clone)]
pub struct Projector {
    up: Linear,
    down: Linear,
}

impl Projector {
    pub fn load(s: &Scope, in_dim: usize, out_dim: usize, dtype: DType) -> Result<Self> {
        Ok(Projector {
            up: Linear::load(&s.pp("0"), in_dim, out_dim, dtype)?,
            down: Linear::load(&s.pp("2"), out_dim, out_dim, dtype)?,
        })
    }

    /// `[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&self.up.forward(x)?.gelu_erf()?)
    }
}
