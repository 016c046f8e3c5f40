//! The tensor-free single-token decode step (`decoder/step.rs`) against the tensor path it
//! replaces (still used for prefill and when intermediates are recorded): same hidden states
//! and logits for every activation dtype, weight format, KV cache format and LoRA mode.
//!
//! `cargo test --release --test decode_step -- --nocapture` prints the differences.

mod common;

use candle_core::{DType, Device};
use common::*;
use phi4mm::decoder::kv_cache::KvFormat;
use phi4mm::model::quant::QType;
use phi4mm::{Engine, LoadOptions, Mode};

/// Greedy-decodes `steps` tokens after `prompt` twice — single tokens through the step path,
/// and the same tokens through the tensor path (forced by recording intermediates) — and
/// returns the largest logit difference relative to the logits' spread.
fn step_vs_tensor(engine: &Engine, prompt: &[u32], mode: Mode, steps: usize) -> phi4mm::Result<f32> {
    let dec = engine.decoder();
    let adapter = mode.adapter();
    let mut fast = dec.new_cache(prompt.len() + steps)?;
    let mut slow = dec.new_cache(prompt.len() + steps)?;
    let emb = dec.embed(prompt)?;
    let h_fast = dec.forward(&emb, &mut fast, adapter, None)?;
    let h_slow = dec.forward(&emb, &mut slow, adapter, None)?;
    let (mut lf, mut ls) = (dec.logits(&h_fast)?, dec.logits(&h_slow)?);
    let mut worst = 0f32;
    for _ in 0..steps {
        let spread = ls.iter().cloned().fold(f32::MIN, f32::max) - ls.iter().cloned().fold(f32::MAX, f32::min);
        let diff = lf.iter().zip(&ls).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        worst = worst.max(diff / spread);
        let next = ls.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0 as u32;
        let e = dec.embed(&[next])?;
        let hf = dec.forward(&e, &mut fast, adapter, None)?;
        let mut taps = Vec::new();
        let hs = dec.forward(&e, &mut slow, adapter, Some(&mut taps))?;
        assert!(!taps.is_empty(), "the tensor path records intermediates");
        lf = dec.logits(&hf)?;
        ls = dec.logits(&hs)?;
    }
    Ok(worst)
}

#[test]
fn step_path_matches_tensor_path() -> phi4mm::Result<()> {
    let cases = read_json("cases.json");
    let exp = tensors(cases[0]["file"].as_str().unwrap_or_default());
    let prompt = ids(&exp["input_ids"]);
    eprintln!("| dtype | weights | kv cache | mode | max logit diff / spread |");
    for (dtype, bound) in [(DType::F32, 1e-5f32), (DType::BF16, 5e-3)] {
        for quant in [None, Some(QType::Q8_0), Some(QType::Q4_0)] {
            for kv_cache in [KvFormat::Dense, KvFormat::Q8] {
                let opts = LoadOptions { dtype, device: Device::Cpu, quant, kv_cache, ..Default::default() };
                let engine = Engine::load(&tiny(), opts)?;
                for mode in [Mode::Text, Mode::Vision, Mode::Speech] {
                    let d = step_vs_tensor(&engine, &prompt, mode, 6)?;
                    eprintln!("| {dtype:?} | {} | {kv_cache:?} | {mode:?} | {d:.2e} |", engine.format());
                    assert!(d <= bound, "{dtype:?} {quant:?} {kv_cache:?} {mode:?}: {d} > {bound}");
                }
            }
        }
    }
    Ok(())
}
