//! Bad inputs get errors that name the problem: missing files, malformed configs, missing or
//! mis-shaped tensors, truncated shards, unreadable media, prompts that do not fit.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use phi4mm::{Engine, Error, GenerateRequest, LoadOptions, MediaInput, Message, PromptInput};

/// A copy of the tiny checkpoint in a temporary directory.
fn copy_tiny() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn load(dir: &Path) -> Result<Engine, Error> {
    Engine::load(dir, LoadOptions { dtype: DType::F32, device: Device::Cpu, progress: None, ..Default::default() })
}

fn load_err(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// The shard file that holds `tensor`, per the index.
fn shard_of(dir: &Path, tensor: &str) -> std::path::PathBuf {
    let idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    dir.join(idx["weight_map"][tensor].as_str().unwrap())
}

/// Rewrites the shard holding `tensor` with `f` applied to its tensor map.
fn edit_shard(dir: &Path, tensor: &str, f: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let shard = shard_of(dir, tensor);
    let mut map = candle_core::safetensors::load(&shard, &Device::Cpu).unwrap();
    f(&mut map);
    candle_core::safetensors::save(&map, &shard).unwrap();
}

#[test]
fn missing_model_directory() {
    let e = phi4mm::model::hub::resolve_model("/nonexistent/phi4mm-model").unwrap_err().to_string();
    assert!(e.contains("/nonexistent/phi4mm-model") && e.contains("does not exist"), "{e}");
}

#[test]
fn missing_tokenizer() {
    let d = copy_tiny();
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn missing_config_and_bad_config() {
    let d = copy_tiny();
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    assert!(load_err(d.path()).contains("config.json"));

    let d = copy_tiny();
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json"), "{e}");

    let d = copy_tiny();
    let p = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["model_type"] = "llama".into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model_type") && e.contains("llama"), "{e}");

    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["model_type"] = "phi4mm".into();
    cfg["rope_scaling"]["long_factor"] = serde_json::json!([1.0]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("long_factor"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let d = copy_tiny();
    let name = "model.layers.1.self_attn.o_proj.base_layer.weight";
    edit_shard(d.path(), name, |m| {
        m.remove(name);
    });
    let e = load_err(d.path());
    assert!(e.contains(name) && e.contains("missing"), "{e}");
}

#[test]
fn missing_lora_tensor_is_named() {
    let d = copy_tiny();
    let name = "model.layers.0.mlp.down_proj.lora_B.speech.weight";
    edit_shard(d.path(), name, |m| {
        m.remove(name);
    });
    let e = load_err(d.path());
    assert!(e.contains(name), "{e}");
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let d = copy_tiny();
    let name = "model.norm.weight";
    edit_shard(d.path(), name, |m| {
        m.insert(name.into(), Tensor::zeros(7, DType::BF16, &Device::Cpu).unwrap());
    });
    let e = load_err(d.path());
    assert!(e.contains(name) && e.contains("[7]"), "{e}");
}

#[test]
fn truncated_shard() {
    let d = copy_tiny();
    let shard = shard_of(d.path(), "model.embed_tokens.weight");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains(shard.file_name().unwrap().to_str().unwrap()), "{e}");

    std::fs::write(&shard, b"abc").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("not a safetensors file"), "{e}");
}

#[test]
fn missing_shard_listed_in_index() {
    let d = copy_tiny();
    let shard = shard_of(d.path(), "model.norm.weight");
    std::fs::remove_file(&shard).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("weight shard") && e.contains(shard.file_name().unwrap().to_str().unwrap()), "{e}");
}

#[test]
fn request_errors() {
    let engine = load_tiny(DType::F32);
    let chat = |text: &str| PromptInput::Chat(vec![Message::new("user", text)]);

    let mut req = GenerateRequest::new(chat("hi"));
    req.max_new_tokens = 131_072;
    let e = engine.generate(&req, |_| true).unwrap_err().to_string();
    assert!(e.contains("131072") && e.contains("context"), "{e}");

    let mut req = GenerateRequest::new(chat("<|image_1|>what is this?"));
    req.images = vec![MediaInput::Path("/nonexistent/cat.png".into())];
    let e = engine.generate(&req, |_| true).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/cat.png"), "{e}");

    let req = GenerateRequest::new(chat("<|image_1|>what is this?"));
    let e = engine.generate(&req, |_| true).unwrap_err().to_string();
    assert!(e.contains("marker"), "{e}");

    let mut req = GenerateRequest::new(chat("hi"));
    req.sampling.top_p = 0.0;
    assert!(engine.generate(&req, |_| true).unwrap_err().to_string().contains("top_p"));
}

#[test]
fn text_only_load_skips_media_and_says_so() {
    let opts = LoadOptions { dtype: DType::F32, text_only: true, ..Default::default() };
    let engine = Engine::load(&tiny(), opts).unwrap();
    assert!(engine.vision().is_none() && engine.audio().is_none());
    assert!(!engine.decoder().has_adapter(phi4mm::decoder::lora::Adapter::Vision));
    let full = load(&tiny()).unwrap();
    assert!(engine.decoder_bytes().1 == 0 && full.decoder_bytes().1 > 0, "no LoRA bytes when text-only");
    // Text still matches the full load exactly.
    let mut req = GenerateRequest::new(PromptInput::Raw("Hello".into()));
    req.max_new_tokens = 4;
    assert_eq!(engine.generate(&req, |_| true).unwrap().tokens, full.generate(&req, |_| true).unwrap().tokens);
    let mut req = GenerateRequest::new(PromptInput::Chat(vec![Message::new("user", "<|image_1|>What is this?")]));
    req.images = vec![MediaInput::Path(fixtures().join("images/gray_640x480.png"))];
    let e = engine.prepare(&req).err().unwrap().to_string();
    assert!(e.contains("text-only"), "{e}");
}
