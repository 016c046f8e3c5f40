//! Quantised weight formats on the tiny checkpoint: drift from the f32 reference (max logit
//! difference, greedy agreement) for every decoder case and LoRA mode, a quantised file that
//! loads by mmap and gives exactly the load-time result, and clear errors for bad files.
//!
//! `cargo test --release --test quant -- --nocapture` prints the drift table.

mod common;

use candle_core::{DType, Device};
use common::*;
use phi4mm::engine::Prepared;
use phi4mm::decoder::kv_cache::KvFormat;
use phi4mm::model::quant::QType;
use phi4mm::{Engine, GenerateRequest, LoadOptions, Mode, PromptInput};

fn load(dir: &std::path::Path, quant: Option<QType>) -> phi4mm::Result<Engine> {
    load_kv(dir, quant, KvFormat::Dense)
}

fn load_kv(dir: &std::path::Path, quant: Option<QType>, kv_cache: KvFormat) -> phi4mm::Result<Engine> {
    Engine::load(dir, LoadOptions { dtype: DType::F32, device: Device::Cpu, quant, kv_cache, ..Default::default() })
}

/// Pearson correlation.
fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().map(|&v| v as f64).sum::<f64>() / n, b.iter().map(|&v| v as f64).sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

/// (max |Δ| of the full last-prompt-position logits, their spread (max − min), their
/// correlation with the reference's, greedy tokens equal before the first difference, greedy
/// length).
fn drift(engine: &Engine, case: &serde_json::Value) -> (f32, f32, f64, usize, usize) {
    let exp = tensors(case["file"].as_str().unwrap());
    let input = ids(&exp["input_ids"]);
    let mode = match case["mode"].as_str().unwrap() {
        "text" => Mode::Text,
        "vision" => Mode::Vision,
        _ => Mode::Speech,
    };
    let dec = engine.decoder();
    let mut cache = dec.new_cache(input.len()).unwrap();
    let h = dec.forward(&dec.embed(&input).unwrap(), &mut cache, mode.adapter(), None).unwrap();
    let logits = dec.logits(&h).unwrap();
    let want = f32s(&exp["logits_last"]);
    let max_diff = logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let spread = want.iter().cloned().fold(f32::MIN, f32::max) - want.iter().cloned().fold(f32::MAX, f32::min);

    let greedy = ids(&exp["greedy"]);
    let mut req = GenerateRequest::new(PromptInput::Raw(String::new()));
    req.max_new_tokens = greedy.len();
    req.ignore_eos = true;
    let prepared = Prepared { ids: input, mode, images: Vec::new(), max_crops: 0, audios: Vec::new() };
    let c = engine.generate_prepared(&prepared, &req, |_| true).unwrap();
    let agree = c.tokens.iter().zip(&greedy).take_while(|(a, b)| a == b).count();
    (max_diff, spread, correlation(&logits, &want), agree, greedy.len())
}

#[test]
fn drift_from_f32_is_small_and_reported() {
    let cases = read_json("cases.json");
    let cases: Vec<&serde_json::Value> = cases
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] != "crossing")
        .collect();
    eprintln!("| format | case | max abs logit diff | logit spread | logit correlation | greedy agreement |");
    eprintln!("|---|---|---|---|---|---|");
    // Bounds: about twice the measured drift (see the README's table).
    for (qtype, kv, bound, min_corr) in [
        (None, KvFormat::Dense, 1e-5f32, 0.999_999),
        (None, KvFormat::Q8, 0.1, 0.98),
        (Some(QType::Q8_0), KvFormat::Dense, 0.1, 0.98),
        (Some(QType::Q6_0), KvFormat::Dense, 0.2, 0.95),
        (Some(QType::Q4_0), KvFormat::Dense, 0.6, 0.6),
        (Some(QType::Q4_0), KvFormat::Q8, 0.6, 0.6),
    ] {
        let engine = load_kv(&tiny(), qtype, kv).unwrap();
        let weights = qtype.map_or("f32", QType::name);
        assert_eq!(engine.format(), weights);
        let name = if kv == KvFormat::Q8 { format!("{weights} + 8-bit KV") } else { weights.to_string() };
        let mut total_agree = 0;
        let mut total = 0;
        for case in &cases {
            let (d, spread, corr, agree, n) = drift(&engine, case);
            let case = case["name"].as_str().unwrap();
            eprintln!("| {name} | {case} | {d:.5} | {spread:.3} | {corr:.6} | {agree}/{n} |");
            // Relative to the spread of the logits: a wrong kernel or layout is off by O(1)
            // and uncorrelated.
            assert!(d <= bound * spread, "{name} {case}: max logit diff {d} > {bound} × spread {spread}");
            assert!(corr >= min_corr, "{name} {case}: logit correlation {corr} < {min_corr}");
            total_agree += agree;
            total += n;
        }
        // The tiny model's weights are N(0, 1) with margins between its top two logits as
        // small as 0.05, so greedy agreement is reported, and only asserted for f32.
        eprintln!("| {name} | all | | | | {total_agree}/{total} |");
        if qtype.is_none() && kv == KvFormat::Dense {
            assert_eq!(total_agree, total, "f32 greedy tokens");
        }
    }
}

#[test]
fn quantised_file_loads_by_mmap_with_identical_results() {
    for qtype in [QType::Q8_0, QType::Q4_0] {
        let dir = std::env::temp_dir().join(format!("phi4mm-quant-test-{}-{}", qtype.name(), std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = phi4mm::model::quant_file::quantize_checkpoint(&tiny(), qtype, &dir, None).unwrap();
        assert!(s.quantized_tensors > 12, "{s:?}");
        let from_file = load(&dir, None).unwrap();
        let at_load = load(&tiny(), Some(qtype)).unwrap();
        assert_eq!(from_file.format(), qtype.name());
        let mut req = GenerateRequest::new(PromptInput::Raw("Hello there".into()));
        req.max_new_tokens = 6;
        req.ignore_eos = true;
        let mut a = Vec::new();
        let mut b = Vec::new();
        from_file.generate(&req, |s| { a.push(s.logits.to_vec()); true }).unwrap();
        at_load.generate(&req, |s| { b.push(s.logits.to_vec()); true }).unwrap();
        assert_eq!(a, b, "{qtype:?}: mapped file and load-time quantisation differ");

        // Asking for another format than the file's is an error naming both.
        let other = if qtype == QType::Q8_0 { QType::Q4_0 } else { QType::Q8_0 };
        let e = load(&dir, Some(other)).err().unwrap().to_string();
        assert!(e.contains(qtype.name()) && e.contains(other.name()), "{e}");
        // Quantising twice is refused.
        let e = phi4mm::model::quant_file::quantize_checkpoint(&dir, qtype, &dir.join("again"), None).unwrap_err().to_string();
        assert!(e.contains("already quantised"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn damaged_quantised_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("phi4mm-quant-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    phi4mm::model::quant_file::quantize_checkpoint(&tiny(), QType::Q4_0, &dir, None).unwrap();
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    // Drop the format of one matrix from the metadata (same length, so offsets stay valid).
    let key = "phi4mm.qtype.model.layers.0.mlp.down_proj.base_layer.weight";
    assert!(header.contains(key));
    let broken = header.replace(key, &"x".repeat(key.len()));
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(broken.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&file, &out).unwrap();
    let e = load(&dir, None).err().unwrap().to_string();
    assert!(e.contains("down_proj") && e.contains("quantisation format"), "{e}");
    // Truncated: a clear error, not a crash.
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&dir, None).err().unwrap().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
