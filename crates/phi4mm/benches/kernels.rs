//! Criterion benches for each CPU kernel at the full model's shapes:
//! `cargo bench -p phi4mm --bench kernels` (add a filter, e.g. `-- decode`).
//!
//! * `decode/{format}/{out}x{in}`: one activation row times a weight (the per-token mat-vec),
//!   for bf16, Q8_0 and Q4_0 — throughput in weight bytes read per second;
//! * `stream/{format}`: the decode mat-vec (`Matrix::matvec` in a spinning team, as a decode
//!   step runs it) over 256 MB of 16384×3072 weights — more than the L3 cache, so weights come
//!   from memory as in the model — in weight bytes per second;
//! * `prefill/{format}/128x{out}x{in}`: 128 rows (bf16: the `vdpbf16ps` tile, or the f32 tile
//!   without AVX-512 BF16; Q8_0/Q4_0: the int8 `vpdpbusd` GEMM, activation quantisation
//!   included), in multiply-adds per second;
//! * `attention/{format}/{len}`: one decode step of attention over a KV cache of `len`
//!   positions (24 query heads, 8 KV heads, head_dim 128): f32, bf16 and 8-bit caches;
//! * `attention/causal/{n}@{start}`: the prefill attention kernel for a chunk of `n` queries
//!   after `start` cached positions, same heads, in multiply-adds of the visible pairs per second;
//! * `encoder/…`: the SigLIP tower's work for a batch of 4 crops (4096 rows, f32 activations,
//!   bf16 weights): `fc1` (1152 → 4304, bias added as stored), `fc2` (4304 → 1152) and the
//!   self-attention kernel (16 heads of 72 over 1024 patches per crop), and the Conformer's
//!   feed-forward for one 30 s window (375 frames: `ff_up` 1024 → 3072, `ff_down` 1536 → 1024),
//!   in multiply-adds per second.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use phi4mm::kernels::{team, Matrix, VecScratch};
use phi4mm::decoder::kv_cache::{KvCache, KvFormat};
use phi4mm::model::quant::{QMatrix, QType};

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

fn stream(c: &mut Criterion) {
    let (out, k) = (16384, 3072);
    for (format, name) in formats() {
        let one = weight(out, k, format);
        let count = (256usize << 20).div_ceil(one.nbytes());
        let mut ws = vec![one];
        while ws.len() < count {
            ws.push(weight(out, k, format));
        }
        let x: Vec<f32> = (0..k).map(|i| half::bf16::from_f32((i % 13) as f32 * 0.1 - 0.6).to_f32()).collect();
        let mut y = vec![0f32; out];
        let mut s = VecScratch::default();
        let mut g = c.benchmark_group("stream");
        g.sample_size(10);
        g.throughput(Throughput::Bytes(ws.iter().map(Matrix::nbytes).sum::<usize>() as u64));
        g.bench_function(name, |b| {
            b.iter(|| team::with_team(|| ws.iter().map(|w| w.matvec(&x, &mut y, &mut s).is_ok()).count()))
        });
        g.finish();
    }
}

fn attention(c: &mut Criterion) {
    let (kvh, d, heads) = (8, 128, 24);
    for len in [4096usize, 32768] {
        for (format, dtype, name) in [(KvFormat::Dense, DType::F32, "f32"), (KvFormat::Dense, DType::BF16, "bf16"), (KvFormat::Q8, DType::F32, "q8")] {
            let Ok(mut cache) = KvCache::with_format(1, kvh, d, len, dtype, format, &Device::Cpu) else { return };
            let Ok(k) = Tensor::randn(0f32, 1.0, (kvh, len, d), &Device::Cpu) else { return };
            if cache.append(0, 0, &k, &k).is_err() {
                return;
            }
            cache.set_len(len);
            let q: Vec<f32> = (0..heads * d).map(|i| (i % 7) as f32 * 0.1).collect();
            let mut g = c.benchmark_group(format!("attention/{name}"));
            g.sample_size(10);
            g.bench_function(format!("{len}"), |b| b.iter(|| cache.attend(0, &q, heads, len, 0.088).ok().map(|v| v.len())));
            g.finish();
        }
    }
    // Prefill: a chunk of n queries after `start` cached positions, on the causal kernel.
    if phi4mm::kernels::attention::available() {
        let mut g = c.benchmark_group("attention/causal");
        g.sample_size(10);
        for (n, start) in [(512usize, 0usize), (512, 3584)] {
            let total = start + n;
            let (Ok(q), Ok(k)) = (Tensor::randn(0f32, 1.0, (heads, n, d), &Device::Cpu), Tensor::randn(0f32, 1.0, (kvh, total, d), &Device::Cpu)) else {
                return;
            };
            // Multiply-adds of the visible (query, key) pairs, q·k and p·v.
            let pairs = n * start + n * (n + 1) / 2;
            g.throughput(Throughput::Elements((heads * pairs * 2 * d) as u64));
            g.bench_function(format!("{n}@{start}"), |b| b.iter(|| phi4mm::kernels::attention::causal(&q, &k, &k, start, 0.088).ok()));
        }
        g.finish();
    }
}

fn encoder(c: &mut Criterion) {
    let mut g = c.benchmark_group("encoder");
    g.sample_size(10);
    // SigLIP's MLP at 4 crops; the Conformer's feed-forward at one 30 s window (375 frames).
    for (name, n, out, k) in [("fc1", 4096, 4304, 1152), ("fc2", 4096, 1152, 4304), ("ff_up", 375, 3072, 1024), ("ff_down", 375, 1024, 1536)] {
        let (Ok(w), Ok(b), Ok(x)) = (
            Tensor::randn(0f32, 0.02, (out, k), &Device::Cpu).and_then(|t| t.to_dtype(DType::BF16)),
            Tensor::randn(0f32, 0.02, out, &Device::Cpu),
            Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu),
        ) else {
            return;
        };
        g.throughput(Throughput::Elements((n * out * k) as u64));
        g.bench_function(format!("{name}/{n}x{out}x{k}"), |bch| bch.iter(|| phi4mm::kernels::linear_bias(&x, &w, &b).ok()));
    }
    if phi4mm::kernels::attention::available() {
        let (groups, heads, d, p) = (4, 16, 72, 1024);
        let Ok(qkv) = Tensor::randn(0f32, 1.0, (groups * p, 3 * heads * d), &Device::Cpu) else { return };
        g.throughput(Throughput::Elements((groups * heads * 2 * p * p * d) as u64));
        g.bench_function("attention/4x1024x16x72", |bch| {
            bch.iter(|| phi4mm::kernels::attention::self_attention(&qkv, groups, heads, 0.118, &Default::default()).ok())
        });
    }
    g.finish();
}

criterion_group!(benches, linear, stream, attention, encoder);
criterion_main!(benches);
