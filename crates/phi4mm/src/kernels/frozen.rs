//! `x · Wᵀ` for a weight that is not trained, with a backward that returns only the input's
//! gradient. candle's own matmul backward also builds `xᵀ · grad` for the weight and keeps it
//! in the gradient store, frozen or not: for LoRA training that is a gradient the size of every
//! base weight (3.8B values at full size) computed and held for nothing.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::{run_op, Source};
use crate::error::Result;

/// `x` `[.., in]` times the frozen `w` `[out, in]` transposed → `[.., out]`; gradients flow to
/// `x` only. bf16 weights run on the engine's kernels, f32 ones on candle's GEMM.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        // Off the CPU: candle's matmul on a detached weight (its gradient is built but never
        // reaches a variable).
        return Ok(x.broadcast_matmul(&w.detach().t()?)?);
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, FrozenLinear)?)
}

struct FrozenLinear;

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out_dim, in_dim) = l2.shape().dims2()?;
        match s2 {
            CpuStorage::BF16(v) => {
                let w = &v[l2.start_offset()..l2.start_offset() + out_dim * in_dim];
                run_op(s1, l1, Source::Bf16(w), out_dim, in_dim, None)
            }
            _ => {
                let dims = l1.shape().dims();
                let n = l1.shape().elem_count() / in_dim.max(1);
                if dims.last() != Some(&in_dim) {
                    candle_core::bail!("frozen-linear: input {dims:?} but weight is [{out_dim}, {in_dim}]");
                }
                let x = Layout::contiguous_with_offset((n, in_dim), l1.start_offset());
                let y = s1.matmul(s2, (1, n, out_dim, in_dim), &x, &l2.transpose(0, 1)?)?;
                let mut out = dims.to_vec();
                if let Some(last) = out.last_mut() {
                    *last = out_dim;
                }
                Ok((y, Shape::from(out)))
            }
        }
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dt = x.dtype();
        let gx = if w.dtype() == DType::BF16 && dt == DType::F32 { grad.broadcast_matmul(&w.to_dtype(DType::F32)?)? } else { grad.to_dtype(w.dtype())?.broadcast_matmul(w)?.to_dtype(dt)? };
        Ok((Some(gx), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gradient_reaches_the_input_only() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::arange(0f32, 6.0, &dev)?.reshape((2, 3))?)?;
        let w = Tensor::new(&[[1f32, 2.0, 3.0], [0.5, -1.0, 2.0]], &dev)?;
        for wt in [w.clone(), w.to_dtype(DType::BF16)?] {
            let y = frozen_linear(x.as_tensor(), &wt)?;
            let reference = x.as_tensor().matmul(&w.t()?)?;
            assert_eq!(y.to_vec2::<f32>()?, reference.to_vec2::<f32>()?);
            let grads = (y.sqr()?.sum_all()?).backward()?;
            let gx = grads.get(x.as_tensor()).map(|g| g.to_vec2::<f32>()).transpose()?;
            let expect = (reference * 2.0)?.matmul(&w)?.to_vec2::<f32>()?;
            assert_eq!(gx, Some(expect));
            assert!(grads.get(&wt).is_none(), "the frozen weight got a gradient");
        }
        Ok(())
    }
}
