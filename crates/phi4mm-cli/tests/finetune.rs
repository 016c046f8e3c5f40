//! `phi4mm finetune` and `phi4mm eval` end to end on the tiny checkpoint: training the speech
//! adapter on the committed clips drives the loss near zero and their WER to 0 (an honest
//! overfit: the checkpoint's own adapter gets them wrong), a resumed run ends where an
//! uninterrupted one does, `--score` reads predictions without a model, and bad input fails
//! with a message.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn phi4mm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phi4mm")).args(args).env("RAYON_NUM_THREADS", "2").output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("phi4mm-ft-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn last_log(dir: &std::path::Path) -> serde_json::Value {
    let log = std::fs::read_to_string(dir.join("log.jsonl")).unwrap();
    serde_json::from_str(log.lines().last().unwrap()).unwrap()
}

fn train(out: &std::path::Path, epochs: &str, extra: &[&str]) -> Output {
    let (tiny, data) = (fixtures().join("tiny"), fixtures().join("finetune/train.jsonl"));
    let mut args = vec!["finetune", "-m", tiny.to_str().unwrap(), "--mode", "speech", "--train", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(["--epochs", epochs, "--batch-size", "4", "--lr", "3e-2", "--warmup-steps", "2"]);
    args.extend(extra);
    phi4mm(&args)
}

fn eval_json(extra: &[&str]) -> serde_json::Value {
    let (tiny, data) = (fixtures().join("tiny"), fixtures().join("finetune/train.jsonl"));
    let mut args = vec!["eval", "-m", tiny.to_str().unwrap(), "--task", "asr", "--data", data.to_str().unwrap(), "--json", "--max-new-tokens", "40"];
    args.extend(extra);
    serde_json::from_str(&ok(&phi4mm(&args))).unwrap()
}

#[test]
fn training_the_speech_adapter_overfits_the_clips_to_zero_wer() {
    let out = scratch("overfit");
    ok(&train(&out, "100", &[]));
    let last = last_log(&out);
    assert_eq!(last["update"], 100);
    assert!(last["loss"].as_f64().unwrap() < 0.25, "final loss {}", last["loss"]);
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(out.join("log.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert!(first["loss"].as_f64().unwrap() > 10.0, "first loss {}", first["loss"]);
    let before = eval_json(&[]);
    assert!(before["wer"].as_f64().unwrap() > 0.5, "the checkpoint's adapter already gets the clips right: {before}");
    let preds = out.join("pred.jsonl");
    let after = eval_json(&["--adapter", &format!("speech={}", out.display()), "--out", preds.to_str().unwrap()]);
    assert_eq!((after["n"].as_u64(), after["wer"].as_f64(), after["cer"].as_f64()), (Some(4), Some(0.0), Some(0.0)), "{after}");
    // The written predictions score the same without a model.
    let rescored: serde_json::Value = serde_json::from_str(&ok(&phi4mm(&["eval", "--score", preds.to_str().unwrap(), "--task", "asr", "--json"]))).unwrap();
    assert_eq!(rescored, after);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["peft_type"].as_str(), cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some("LORA"), Some(12), Some(18.0)));
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let (whole, parts) = (scratch("whole"), scratch("parts"));
    ok(&train(&whole, "6", &[]));
    ok(&train(&parts, "6", &["--save-every", "3"]));
    let resumed = scratch("resumed");
    ok(&train(&resumed, "6", &["--resume", parts.join("checkpoint-3").to_str().unwrap()]));
    let log = std::fs::read_to_string(resumed.join("log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3, "the resumed run did updates 4..6 only: {log}");
    let read = |d: &PathBuf| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(read(&whole) == read(&resumed), "resumed adapter differs from the uninterrupted one");
    assert_eq!(last_log(&whole)["loss"], last_log(&resumed)["loss"]);
    for d in [whole, parts, resumed] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn score_reads_predictions_without_a_model() {
    let dir = scratch("score");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("p.jsonl");
    std::fs::write(&f, "{\"reference\": \"the cat sat\", \"prediction\": \"the cat sat down\"}\n{\"reference\": \"B\", \"prediction\": \"b\"}\n").unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&phi4mm(&["eval", "--score", f.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(v["n"], 2);
    assert_eq!(v["wer"].as_f64(), Some(2.0 / 4.0)); // one insertion, and B ≠ b (jiwer is case-sensitive)
    assert_eq!(v["accuracy"].as_f64(), Some(0.5));
    assert!(v["bleu_signature"].as_str().unwrap().starts_with("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"), "{v}");
    let asr: serde_json::Value = serde_json::from_str(&ok(&phi4mm(&["eval", "--score", f.to_str().unwrap(), "--task", "asr", "--json"]))).unwrap();
    assert!(asr.get("bleu").is_none() && asr.get("accuracy").is_none(), "{asr}");
    std::fs::write(&f, "{\"reference\": \"x\"}\n").unwrap();
    let bad = phi4mm(&["eval", "--score", f.to_str().unwrap()]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("line 1: needs a string \"prediction\""), "{}", String::from_utf8_lossy(&bad.stderr));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_training_input_is_named() {
    let dir = scratch("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("t.jsonl");
    std::fs::write(&f, "{\"image\": \"../../fixtures/none.png\", \"target\": \"x\"}\n").unwrap();
    let tiny = fixtures().join("tiny");
    let out = phi4mm(&["finetune", "-m", tiny.to_str().unwrap(), "--mode", "speech", "--train", f.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("line 1: \"image\" names"), "{}", String::from_utf8_lossy(&out.stderr));
    let img = fixtures().join("images/square_448x448.png");
    std::fs::write(&f, format!("{{\"image\": \"{}\", \"target\": \"x\"}}\n", img.display())).unwrap();
    let out = phi4mm(&["finetune", "-m", tiny.to_str().unwrap(), "--mode", "speech", "--train", f.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("a speech fine-tune needs audio"), "{err}");
    let out = phi4mm(&["run", "-m", tiny.to_str().unwrap(), "--adapter", "speech=/nonexistent", "hi"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("adapter_config.json"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).ok();
}
