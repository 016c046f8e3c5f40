//! The batched decode product: `B` activation rows (one per running sequence) times a weight,
//! each weight row read from memory once per step and multiplied by every activation row while
//! it is in L1. Every output element is the same dot-product kernel over the same bytes as
//! [`Matrix::matvec`] computes for that row alone, so a sequence's numbers do not depend on
//! which others share its step (batch invariance).

use half::bf16;

use super::{bf16dot, dot, dot_f32, qdot, rows_per_task, team, Matrix, VecScratch};
use crate::error::{Error, Result};
use crate::model::quant::QActs;
use qdot::XRow;
use candle_core::CpuStorage;

/// Working space for [`Matrix::matmat`], reused from step to step.
#[derive(Debug, Default)]
pub struct BatchScratch {
    /// `[out, B]`: each task owns whole weight rows.
    yt: Vec<f32>,
    vec: VecScratch,
}

impl Matrix {
    /// `x` `[b, in]` → `y` `[b, out]` (row `i` of `y` equals [`Matrix::matvec`] of row `i`).
    pub fn matmat(&self, x: &[f32], b: usize, y: &mut [f32], s: &mut BatchScratch) -> Result<()> {
        let (out, k) = self.dims()?;
        if x.len() != b * k || y.len() != b * out {
            return Err(Error::Request(format!(
                "batched mat-vec: input {} and output {} for {b} rows of a [{out}, {k}] weight",
                x.len(),
                y.len()
            )));
        }
        if b == 1 {
            return self.matvec(x, y, &mut s.vec);
        }
        s.yt.resize(out * b, 0.0);
        self.products(x, b, &mut s.yt, &mut s.vec)?;
        transpose(&s.yt, b, out, y);
        Ok(())
    }

    /// `yt[r·b + i]` = weight row `r` · activation row `i` of `x` `[b, in]`, each by the
    /// one-row dot kernel of the weight's format ([`Matrix::matvec`] is `b = 1`).
    pub(super) fn products(&self, x: &[f32], b: usize, yt: &mut [f32], s: &mut VecScratch) -> Result<()> {
        let (out, k) = self.dims()?;
        match self {
            Matrix::Quant(q) => {
                s.acts.resize_with(b, QActs::default);
                for (a, row) in s.acts.iter_mut().zip(x.chunks(k)) {
                    a.quantize(row, k, q.qtype());
                }
                let rows: Vec<XRow<'_>> = s.acts.iter().map(|a| XRow::of(a, 0, k)).collect();
                let kernel = qdot::select(q.qtype());
                fill_cols(yt, b, |r, i| {
                    let (wq, wd) = q.row(r);
                    // SAFETY: `select` returns only kernels this CPU supports.
                    unsafe { kernel(wq, wd, rows[i]) }
                });
            }
            Matrix::Dense(t) => {
                let (storage, layout) = t.storage_and_layout();
                let off = layout.start_offset();
                match &*storage {
                    candle_core::Storage::Cpu(CpuStorage::BF16(w)) => {
                        let w = &w[off..off + out * k];
                        #[cfg(target_arch = "x86_64")]
                        if bf16dot::available() {
                            s.xb.clear();
                            s.xb.extend(x.iter().map(|&v| bf16::from_f32(v)));
                            let xb = &s.xb;
                            // SAFETY: AVX-512 BF16 was detected; both slices hold k values.
                            fill_cols(yt, b, |r, i| unsafe { bf16dot::dot(&xb[i * k..(i + 1) * k], &w[r * k..(r + 1) * k]) });
                            return Ok(());
                        }
                        fill_cols(yt, b, |r, i| dot(&x[i * k..(i + 1) * k], &w[r * k..(r + 1) * k]));
                    }
                    candle_core::Storage::Cpu(CpuStorage::F32(w)) => {
                        let w = &w[off..off + out * k];
                        fill_cols(yt, b, |r, i| dot_f32(&x[i * k..(i + 1) * k], &w[r * k..(r + 1) * k]));
                    }
                    _ => return Err(Error::Request("mat-vec needs an f32 or bf16 weight on the CPU".into())),
                }
            }
        }
        Ok(())
    }
}

/// `yt[r·b + i] = f(r, i)`: weight rows split over the team as [`Matrix::matvec`] splits them.
fn fill_cols(yt: &mut [f32], b: usize, f: impl Fn(usize, usize) -> f32 + Sync) {
    let out = yt.len() / b.max(1);
    let per = rows_per_task(out);
    team::parallel_chunks(yt, per * b, |t, ys| {
        for (j, row) in ys.chunks_mut(b).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = f(t * per + j, i);
            }
        }
    });
}

/// `[out, b]` → `[b, out]`.
fn transpose(yt: &[f32], b: usize, out: usize, y: &mut [f32]) {
    for (j, col) in yt.chunks(b).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * out + j] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::{QMatrix, QType};
    use candle_core::{Device, Tensor};
    use std::sync::Arc;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// Every format: each row of the batched product is bit-identical to the row alone.
    #[test]
    fn each_batched_row_equals_its_matvec() -> Result<()> {
        let (out, k) = (300, 544); // one 512-value run and a tail block
        let w = values(out * k, 7);
        let mut mats = vec![
            Matrix::Dense(Tensor::from_vec(w.clone(), (out, k), &Device::Cpu)?),
            Matrix::Dense(Tensor::from_vec(w.clone(), (out, k), &Device::Cpu)?.to_dtype(candle_core::DType::BF16)?),
        ];
        for q in [QType::Q8_0, QType::Q6_0, QType::Q4_0] {
            mats.push(Matrix::Quant(Arc::new(QMatrix::quantize(q, &w, out, k)?)));
        }
        for m in &mats {
            for b in [1, 2, 3, 8] {
                // bf16-exact activations, as the decode step feeds them.
                let x: Vec<f32> = values(b * k, b as u32).iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
                let mut y = vec![0f32; b * out];
                team::with_team(|| m.matmat(&x, b, &mut y, &mut BatchScratch::default()))?;
                for i in 0..b {
                    let mut yi = vec![0f32; out];
                    m.matvec(&x[i * k..(i + 1) * k], &mut yi, &mut VecScratch::default())?;
                    assert!(yi.iter().zip(&y[i * out..(i + 1) * out]).all(|(a, c)| a.to_bits() == c.to_bits()), "{} b={b} row {i}", m.format());
                }
            }
        }
        Ok(())
    }
}
