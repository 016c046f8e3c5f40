//! Fine-tuning parity with PyTorch + PEFT (`reference/make_finetune.py`, tiny checkpoint, f32):
//! the batch loss, every LoRA gradient, and the weights after three AdamW updates (warmup,
//! decay and clipping included), for the speech and the vision adapter.

mod common;

use candle_core::DType;
use common::{f32s, fixtures, load_tiny, read_json, tensors};
use phi4mm::decoder::lora::Adapter;
use phi4mm::eval::{Example, Task};
use phi4mm::train::{AdamWConfig, TrainOptions, Trainer};

/// `max |a − e| ≤ tol · max |e|` for one tensor; returns the ratio for the report.
fn rel_max(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len());
    let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    actual.iter().zip(expected).fold(0f32, |m, (a, e)| m.max((a - e).abs())) / scale
}

fn examples(case: &serde_json::Value) -> Vec<Example> {
    let list = |v: &serde_json::Value, dir: &str| -> Vec<std::path::PathBuf> { v.as_array().unwrap().iter().map(|f| fixtures().join(dir).join(f.as_str().unwrap())).collect() };
    case["examples"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, e)| Example {
            line: i + 1,
            audios: list(&e["audio"], "audio"),
            images: list(&e["image"], "images"),
            instruction: Some(e["instruction"].as_str().unwrap().to_string()),
            target: e["target"].as_str().unwrap().to_string(),
        })
        .collect()
}

fn check_mode(case: &serde_json::Value) {
    let mode = case["mode"].as_str().unwrap();
    let adapter = if mode == "speech" { Adapter::Speech } else { Adapter::Vision };
    let engine = load_tiny(DType::F32);
    let f = |k: &str| case[k].as_f64().unwrap();
    let betas = case["betas"].as_array().unwrap();
    let opts = TrainOptions {
        optim: AdamWConfig { lr: f("lr"), beta1: betas[0].as_f64().unwrap(), beta2: betas[1].as_f64().unwrap(), eps: f("eps"), weight_decay: f("weight_decay") },
        warmup_steps: case["warmup_steps"].as_u64().unwrap() as usize,
        max_grad_norm: f("max_grad_norm"),
        ..TrainOptions::recipe(adapter)
    };
    let mut trainer = Trainer::new(&engine, opts).unwrap();
    let items: Vec<_> = examples(case).iter().map(|ex| trainer.item(ex, &Task::Asr).unwrap()).collect();
    for (item, e) in items.iter().zip(case["examples"].as_array().unwrap()) {
        let want: Vec<u32> = e["target_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(item.targets, want, "{mode}: target ids");
        assert_eq!(item.embeds.dim(0).unwrap(), e["prompt_len"].as_u64().unwrap() as usize + want.len() - 1, "{mode}: input rows");
    }
    let expected = tensors(&format!("finetune/{}", case["file"].as_str().unwrap()));
    let (loss, grads, _) = trainer.loss_and_grads(&items).unwrap();
    assert!((loss - f("loss")).abs() <= 1e-5 * f("loss").abs(), "{mode}: loss {loss} vs reference {}", f("loss"));
    let names: Vec<String> = trainer.parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), expected.keys().filter(|k| k.starts_with("grad.")).count(), "{mode}: trained tensors");
    let mut worst = (0f32, String::new());
    for (name, g) in names.iter().zip(&grads) {
        let r = rel_max(g, &f32s(&expected[&format!("grad.{name}")]));
        if r > worst.0 {
            worst = (r, name.clone());
        }
    }
    assert!(worst.0 <= 1e-4, "{mode}: gradient of {} off by {:.2e} of its largest value", worst.1, worst.0);
    let updates = case["updates"].as_u64().unwrap() as usize;
    for (s, want) in case["steps"].as_array().unwrap().iter().enumerate() {
        let st = trainer.step(&items, updates).unwrap();
        let w = |k: &str| want[k].as_f64().unwrap();
        assert!((st.loss - w("loss")).abs() <= 1e-5 * w("loss").abs(), "{mode} step {s}: loss {} vs {}", st.loss, w("loss"));
        assert!((st.grad_norm - w("grad_norm")).abs() <= 1e-4 * w("grad_norm"), "{mode} step {s}: grad norm {} vs {}", st.grad_norm, w("grad_norm"));
        assert!((st.lr - w("lr")).abs() <= 1e-12, "{mode} step {s}: lr {} vs {}", st.lr, w("lr"));
    }
    let mut worst = (0f32, String::new());
    for (name, t) in trainer.parameters() {
        let r = rel_max(&f32s(&t), &f32s(&expected[&format!("after.{name}")]));
        if r > worst.0 {
            worst = (r, name);
        }
    }
    assert!(worst.0 <= 1e-4, "{mode}: {} after {updates} updates off by {:.2e} of its largest value", worst.1, worst.0);
    println!("{mode}: loss {loss:.6}, gradients and weights within 1e-4 (worst weight {:.2e})", worst.0);
}

#[test]
fn speech_lora_gradients_and_updates_match_pytorch_peft() {
    let cases = read_json("finetune/cases.json");
    check_mode(cases["cases"].as_array().unwrap().iter().find(|c| c["mode"] == "speech").unwrap());
}

#[test]
fn vision_lora_gradients_and_updates_match_pytorch_peft() {
    let cases = read_json("finetune/cases.json");
    check_mode(cases["cases"].as_array().unwrap().iter().find(|c| c["mode"] == "vision").unwrap());
}

#[test]
fn a_fresh_adapter_starts_as_no_adapter_and_moves_b_first() {
    // PEFT's initialisation: B = 0, so the pair adds nothing and dL/dA = 0 at step 0.
    let engine = load_tiny(DType::F32);
    let cases = read_json("finetune/cases.json");
    let case = cases["cases"].as_array().unwrap().iter().find(|c| c["mode"] == "speech").unwrap();
    let opts = TrainOptions { fresh: Some((4, 8.0)), seed: 7, ..TrainOptions::recipe(Adapter::Speech) };
    let trainer = Trainer::new(&engine, opts).unwrap();
    assert_eq!(trainer.rank_alpha(), (4, 8.0));
    let items: Vec<_> = examples(case).iter().map(|ex| trainer.item(ex, &Task::Asr).unwrap()).collect();
    let (_, grads, _) = trainer.loss_and_grads(&items).unwrap();
    for ((name, t), g) in trainer.parameters().iter().zip(&grads) {
        let (r, c) = t.dims2().unwrap();
        if name.contains("lora_A") {
            assert_eq!(r, 4);
            let bound = 1.0 / (c as f32).sqrt();
            assert!(f32s(t).iter().all(|x| x.abs() <= bound) && f32s(t).iter().any(|x| *x != 0.0), "{name}: A not uniform in ±1/√in");
            assert!(g.iter().all(|x| *x == 0.0), "{name}: A moved before B");
        } else {
            assert!(f32s(t).iter().all(|x| *x == 0.0), "{name}: B does not start at zero");
            assert!(g.iter().any(|x| *x != 0.0), "{name}: B got no gradient");
        }
    }
}
