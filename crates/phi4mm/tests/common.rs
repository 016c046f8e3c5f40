//! Helpers shared by the parity tests: fixture paths, expected-value files, comparisons that
//! print the first values and the largest difference on failure.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use phi4mm::engine::Prepared;
use phi4mm::{Engine, GenerateRequest, LoadOptions, PromptInput};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn tiny() -> PathBuf {
    fixtures().join("tiny")
}

pub fn expected(name: &str) -> PathBuf {
    fixtures().join("expected").join(name)
}

pub fn load_tiny(dtype: DType) -> Engine {
    Engine::load(&tiny(), LoadOptions { dtype, device: Device::Cpu, progress: None, ..Default::default() })
        .unwrap_or_else(|e| panic!("loading the tiny checkpoint: {e}"))
}

pub fn read_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(expected(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn tensors(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(expected(file), &Device::Cpu).unwrap()
}

pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

pub fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// Asserts `|a − b| ≤ atol + rtol·|b|` everywhere; on failure prints where and how much.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], atol: f32, rtol: f32) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    let mut worst = (0usize, 0f32);
    let mut bad = 0usize;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let d = (a - e).abs();
        if !(d <= atol + rtol * e.abs()) {
            bad += 1;
        }
        if d > worst.1 || d.is_nan() {
            worst = (i, d);
        }
    }
    let n = actual.len().min(6);
    assert!(
        bad == 0,
        "{what}: {bad} of {} values differ; max |diff| {} at {}\n  actual   {:?}\n  expected {:?}",
        actual.len(),
        worst.1,
        worst.0,
        &actual[..n],
        &expected[..n]
    );
}

/// Greedy generation step by step from `prepared`: tokens exact, top-k ids exact, top-k
/// logits close to the reference's `greedy`, `step_top_ids`, `step_top_logits`.
pub fn check_greedy(engine: &Engine, case: &str, prepared: &Prepared, exp: &HashMap<String, Tensor>) {
    check_greedy_tol(engine, case, prepared, exp, 1e-4)
}

/// [`check_greedy`] with an absolute and relative logit tolerance.
pub fn check_greedy_tol(engine: &Engine, case: &str, prepared: &Prepared, exp: &HashMap<String, Tensor>, tol: f32) {
    let greedy = ids(&exp["greedy"]);
    let top_ids = ids(&exp["step_top_ids"]);
    let top_logits = f32s(&exp["step_top_logits"]);
    let k = top_ids.len() / greedy.len();
    let mut req = GenerateRequest::new(PromptInput::Raw(String::new()));
    req.max_new_tokens = greedy.len();
    req.ignore_eos = true;
    let mut step = 0;
    let c = engine
        .generate_prepared(prepared, &req, |s| {
            let mut order: Vec<u32> = (0..s.logits.len() as u32).collect();
            order.sort_by(|&a, &b| s.logits[b as usize].total_cmp(&s.logits[a as usize]));
            let got: Vec<f32> = order[..k].iter().map(|&i| s.logits[i as usize]).collect();
            assert_eq!(&order[..k], &top_ids[step * k..(step + 1) * k], "{case}: top ids at step {step}");
            assert_close(
                &format!("{case}: top logits at step {step}"),
                &got,
                &top_logits[step * k..(step + 1) * k],
                tol,
                tol,
            );
            step += 1;
            true
        })
        .unwrap();
    assert_eq!(c.tokens, greedy, "{case}: greedy tokens");
}

/// One reference decoder case with media (`cases.json` entry: messages with markers, `images`
/// from fixtures/images, `audios` from fixtures/audio, `mode`, `file`): expanded ids and mode
/// exact, last-position logits and every greedy step within `tol`, greedy tokens exact.
pub fn check_media_case(engine: &Engine, case: &serde_json::Value, dir: &std::path::Path, tol: f32) {
    use phi4mm::{MediaInput, Message};
    let name = case["name"].as_str().unwrap();
    let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
    let mut req = GenerateRequest::new(PromptInput::Chat(msgs));
    let files = |key: &str, sub: &str| -> Vec<MediaInput> {
        case[key]
            .as_array()
            .map(|v| v.iter().map(|f| MediaInput::Path(fixtures().join(sub).join(f.as_str().unwrap()))).collect())
            .unwrap_or_default()
    };
    req.images = files("images", "images");
    req.audios = files("audios", "audio");
    let prepared = engine.prepare(&req).unwrap();
    let exp = candle_core::safetensors::load(dir.join(case["file"].as_str().unwrap()), &Device::Cpu).unwrap();
    assert_eq!(prepared.ids, ids(&exp["input_ids"]), "{name}: expanded input ids");
    assert_eq!(prepared.mode.as_str(), case["mode"].as_str().unwrap(), "{name}: mode");
    let dec = engine.decoder();
    let emb = engine.embed_prompt(&prepared).unwrap();
    let mut cache = dec.new_cache(prepared.ids.len()).unwrap();
    let h = dec.forward(&emb, &mut cache, prepared.mode.adapter(), None).unwrap();
    assert_close(&format!("{name}: logits"), &dec.logits(&h).unwrap(), &f32s(&exp["logits_last"]), tol, tol);
    check_greedy_tol(engine, name, &prepared, &exp, tol);
}
