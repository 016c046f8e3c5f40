//! Criterion benches for each CPU kernel at the full model's shapes:
//! `cargo bench -p phi4mm --bench kernels` (add a filter, e.g. `-- decode`).
//!
//! * `decode/{format}/{out}x{in}`: one activation row times a weight (the per-token mat-vec),
//!   for bf16, Q8_0 and Q4_0 — throughput in weight bytes read per second;
//! * `prefill/{format}/128x{out}x{in}`: 128 rows (the tiled GEMM), in multiply-adds per second;
//! * `attention/{format}/{len}`: one decode step of attention over a KV cache of `len`
//!   positions (24 query heads, 8 KV heads, head_dim 128), dense f32 vs 8-bit.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use phi4mm::kernels::Matrix;
use phi4mm::kv_cache::{KvCache, KvFormat};
use phi4mm::quant::{QMatrix, QType};

fn weight(out: usize, k: usize, format: Option<QType>) -> Matrix {
    let w = Tensor::randn(0f32, 0.02, (out, k), &Device::Cpu).and_then(|t| t.to_dtype(DType::BF16));
    let w = match w {
        Ok(w) => w,
        Err(e) => panic!("weight: {e}"),
    };
    match format {
        None => Matrix::Dense(w),
        Some(q) => {
            let f: Vec<f32> = w.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).unwrap_or_default();
            match QMatrix::quantize(q, &f, out, k) {
                Ok(m) => Matrix::Quant(Arc::new(m)),
                Err(e) => panic!("quantise: {e}"),
            }
        }
    }
}

fn formats() -> [(Option<QType>, &'static str); 3] {
    [(None, "bf16"), (Some(QType::Q8_0), "q8_0"), (Some(QType::Q4_0), "q4_0")]
}

fn linear(c: &mut Criterion) {
    // The decoder's four projection shapes: qkv, o, gate_up, down.
    let shapes = [(5120, 3072), (3072, 3072), (16384, 3072), (3072, 8192)];
    for (format, name) in formats() {
        for &(out, k) in &shapes {
            let w = weight(out, k, format);
            let x = Tensor::randn(0f32, 1.0, (1, k), &Device::Cpu).and_then(|t| t.to_dtype(DType::BF16)).ok();
            let Some(x) = x else { return };
            let mut g = c.benchmark_group(format!("decode/{name}"));
            g.throughput(Throughput::Bytes(w.nbytes() as u64));
            g.bench_function(format!("{out}x{k}"), |b| b.iter(|| w.forward(&x).ok()));
            g.finish();
        }
        let (out, k) = (3072, 3072);
        let w = weight(out, k, format);
        let Some(x) = Tensor::randn(0f32, 1.0, (128, k), &Device::Cpu).and_then(|t| t.to_dtype(DType::BF16)).ok() else {
            return;
        };
        let mut g = c.benchmark_group(format!("prefill/{name}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements((128 * out * k) as u64));
        g.bench_function(format!("128x{out}x{k}"), |b| b.iter(|| w.forward(&x).ok()));
        g.finish();
    }
}

fn attention(c: &mut Criterion) {
    let (kvh, d, heads) = (8, 128, 24);
    for len in [4096usize, 32768] {
        for (format, name) in [(KvFormat::Dense, "f32"), (KvFormat::Q8, "q8")] {
            let Ok(mut cache) = KvCache::with_format(1, kvh, d, len, DType::F32, format, &Device::Cpu) else { return };
            let Ok(k) = Tensor::randn(0f32, 1.0, (kvh, len, d), &Device::Cpu) else { return };
            if cache.append(0, 0, &k, &k).is_err() {
                return;
            }
            cache.set_len(len);
            let q: Vec<f32> = (0..heads * d).map(|i| (i % 7) as f32 * 0.1).collect();
            let qt = Tensor::from_slice(&q, (kvh, heads / kvh, d), &Device::Cpu).ok();
            let mut g = c.benchmark_group(format!("attention/{name}"));
            g.sample_size(10);
            g.bench_function(format!("{len}"), |b| {
                b.iter(|| match format {
                    KvFormat::Q8 => cache.attend(0, &q, heads, len, 0.088).ok().map(|v| v.len()),
                    KvFormat::Dense => {
                        // The decoder's dense path: scores, softmax, weighted sum in f32.
                        let (keys, values) = cache.append(0, len - 1, &k.narrow(1, 0, 1).ok()?, &k.narrow(1, 0, 1).ok()?).ok()?;
                        let s = qt.as_ref()?.matmul(&keys.t().ok()?).ok()?;
                        let p = candle_nn::ops::softmax_last_dim(&s).ok()?;
                        p.matmul(&values).ok().map(|t| t.elem_count())
                    }
                })
            });
            g.finish();
        }
    }
}

criterion_group!(benches, linear, attention);
criterion_main!(benches);
