//! `x · Wᵀ` for a weight that is not trained, with a backward that returns only the input's
//! gradient. candle's own matmul backward also builds `xᵀ · grad` for the weight and keeps it
//! in the gradient store, frozen or not: for LoRA training that is a gradient the size of every
//! base weight (3.8B values at full size) computed and held for nothing.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::{product, run_op, Input, Source};
use crate::error::Result;

/// Weight rows per transposed block of [`grad_input`] (a `[in, BLOCK_ROWS]` bf16 scratch: 16 MiB
/// at in = 8192).
const BLOCK_ROWS: usize = 1024;

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
        if w.dtype() == DType::BF16 && dt == DType::BF16 {
            return Ok((Some(grad_input(grad, w)?), None));
        }
        let gx = if w.dtype() == DType::BF16 && dt == DType::F32 { grad.broadcast_matmul(&w.to_dtype(DType::F32)?)? } else { grad.to_dtype(w.dtype())?.broadcast_matmul(w)?.to_dtype(dt)? };
        Ok((Some(gx), None))
    }
}

/// `grad` `[.., out]` · `w` `[out, in]` for a bf16 weight on the engine's `x·wᵀ` kernels: the
/// weight is taken `BLOCK_ROWS` rows at a time, transposed into `[in, rows]` and multiplied with
/// the matching columns of `grad`; the partial products are summed in f32. candle's bf16 matmul
/// (the `gemm` crate) was the bulk of a full-size training update; this runs at the prefill
/// kernels' speed for the price of reading the weight once more.
fn grad_input(grad: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let mut dims = grad.dims().to_vec();
    let n = grad.elem_count() / out_dim.max(1);
    let g: Vec<bf16> = grad.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?;
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let wv: &[bf16] = match &*storage {
        candle_core::Storage::Cpu(CpuStorage::BF16(v)) => &v[layout.start_offset()..layout.start_offset() + out_dim * in_dim],
        _ => candle_core::bail!("frozen-linear: the weight is not a bf16 CPU tensor"),
    };
    let mut acc = vec![0f32; n * in_dim];
    let mut wt = vec![bf16::ZERO; in_dim * BLOCK_ROWS.min(out_dim)];
    let mut gb = vec![bf16::ZERO; n * BLOCK_ROWS.min(out_dim)];
    for o0 in (0..out_dim).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(out_dim - o0);
        let (wt, gb) = (&mut wt[..in_dim * rows], &mut gb[..n * rows]);
        wt.par_chunks_mut(rows).enumerate().for_each(|(j, col)| {
            for (r, c) in col.iter_mut().enumerate() {
                *c = wv[(o0 + r) * in_dim + j];
            }
        });
        for i in 0..n {
            gb[i * rows..(i + 1) * rows].copy_from_slice(&g[i * out_dim + o0..i * out_dim + o0 + rows]);
        }
        let part = product(&Input::Bf16(gb), n, rows, Source::Bf16(wt), in_dim, None);
        acc.par_iter_mut().zip(part.par_iter()).for_each(|(a, p)| *a += p);
    }
    if let Some(last) = dims.last_mut() {
        *last = in_dim;
    }
    Tensor::from_vec(acc, dims, grad.device())?.to_dtype(DType::BF16)
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

    #[test]
    fn bf16_input_gradient_matches_the_plain_product_across_blocks() -> Result<()> {
        let dev = Device::Cpu;
        let (n, out, inn) = (7, BLOCK_ROWS + 37, 48);
        let w = Tensor::randn(0f32, 1.0, (out, inn), &dev)?.to_dtype(DType::BF16)?;
        let g = Tensor::randn(0f32, 1.0, (n, out), &dev)?.to_dtype(DType::BF16)?;
        let ours = grad_input(&g, &w)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let plain = g.to_dtype(DType::F32)?.matmul(&w.to_dtype(DType::F32)?)?.to_vec2::<f32>()?;
        for (a, b) in ours.iter().flatten().zip(plain.iter().flatten()) {
            assert!((a - b).abs() <= 0.02 * b.abs().max(1.0), "{a} vs {b}");
        }
        Ok(())
    }
}
