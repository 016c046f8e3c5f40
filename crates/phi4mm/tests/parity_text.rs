//! Parity of the text decoder with the reference (transformers' Phi4MultimodalForCausalLM in
//! float32 with the mode's LoRA merged), on the tiny random-weight checkpoint in the hub layout.
//! Expected values come from `reference/make_tiny.py`.

mod common;

use candle_core::DType;
use common::*;
use phi4mm::engine::Prepared;
use phi4mm::Mode;

fn mode(name: &str) -> Mode {
    match name {
        "text" => Mode::Text,
        "vision" => Mode::Vision,
        "speech" => Mode::Speech,
        "vision_speech" => Mode::VisionSpeech,
        other => panic!("unknown mode {other}"),
    }
}

#[test]
fn decoder_matches_reference_in_every_lora_mode() {
    let engine = load_tiny(DType::F32);
    let cases = read_json("cases.json");
    let mut checked = 0;
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if name == "crossing" {
            continue;
        }
        let m = mode(case["mode"].as_str().unwrap());
        let exp = tensors(case["file"].as_str().unwrap());
        let input = ids(&exp["input_ids"]);

        // Named intermediates of one prefill.
        let dec = engine.decoder();
        let mut cache = dec.new_cache(input.len()).unwrap();
        let mut taps = Vec::new();
        let h = dec
            .forward(&dec.embed(&input).unwrap(), &mut cache, m.adapter(), Some(&mut taps))
            .unwrap();
        let hs = &exp["hidden_states"]; // [layers+1, L, hidden]
        let layers = hs.dim(0).unwrap() - 1;
        let tap = |n: &str| taps.iter().find(|(k, _)| k == n).map(|(_, t)| f32s(t)).unwrap();
        assert_close(&format!("{name}: embeddings"), &tap("embeddings"), &f32s(&hs.get(0).unwrap()), 1e-6, 0.0);
        // Hidden states carry f32 reordering noise (a different GEMM or attention summation
        // order) amplified by the random weights: up to 1.4e-4 here, on either attention path,
        // where a causal mask off by one key differs by 20.
        for i in 0..layers - 1 {
            let e = f32s(&hs.get(i + 1).unwrap());
            assert_close(&format!("{name}: layer {i}"), &tap(&format!("layer.{i}")), &e, 2e-4, 1e-4);
        }
        let last = f32s(&exp["last_layer_pre_norm"]);
        assert_close(&format!("{name}: last layer"), &tap(&format!("layer.{}", layers - 1)), &last, 1e-4, 1e-4);
        assert_close(&format!("{name}: final norm"), &tap("final_norm"), &f32s(&hs.get(layers).unwrap()), 1e-4, 1e-4);
        let logits = dec.logits(&h).unwrap();
        assert_close(&format!("{name}: logits"), &logits, &f32s(&exp["logits_last"]), 1e-4, 1e-4);

        check_greedy(&engine, name, &Prepared { ids: input.clone(), mode: m, images: Vec::new(), max_crops: 0, audios: Vec::new() }, &exp);
        checked += 1;
    }
    assert!(checked >= 4, "expected at least four decoder cases, checked {checked}");
}

#[test]
fn lora_modes_change_the_output() {
    // Guards the fixtures themselves: if the adapters did nothing, the mode tests would pass
    // with a decoder that ignores them.
    let base = f32s(&tensors("text_base.safetensors")["logits_last"]);
    for f in ["text_vision_lora.safetensors", "text_speech_lora.safetensors"] {
        let l = f32s(&tensors(f)["logits_last"]);
        let d = base.iter().zip(&l).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d > 0.1, "{f}: LoRA changes logits by only {d}");
    }
}

#[test]
fn generation_crossing_4096_reprefills_with_long_factors() {
    let engine = load_tiny(DType::F32);
    let exp = tensors("crossing.safetensors");
    let input = ids(&exp["input_ids"]);
    assert!(input.len() <= 4096 && input.len() + ids(&exp["greedy"]).len() > 4097);

    // The prompt itself runs with short factors.
    let dec = engine.decoder();
    let mut cache = dec.new_cache(input.len()).unwrap();
    let h = dec.forward(&dec.embed(&input).unwrap(), &mut cache, None, None).unwrap();
    assert!(!cache.is_long());
    assert_close("crossing: prompt logits", &dec.logits(&h).unwrap(), &f32s(&exp["logits_last"]), 2e-4, 1e-4);

    check_greedy(&engine, "crossing", &Prepared::text(input), &exp);
}

#[test]
fn bf16_stays_close_to_f32() {
    let engine = load_tiny(DType::BF16);
    let exp = tensors("text_base.safetensors");
    let input = ids(&exp["input_ids"]);
    let dec = engine.decoder();
    let mut cache = dec.new_cache(input.len()).unwrap();
    let h = dec.forward(&dec.embed(&input).unwrap(), &mut cache, None, None).unwrap();
    let logits = dec.logits(&h).unwrap();
    let expected = f32s(&exp["logits_last"]);
    let d = logits.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = expected.iter().map(|x| x.abs()).fold(0f32, f32::max);
    // bf16 keeps 8 mantissa bits: with these large random weights the logits move by a few
    // percent of their range, but the ranking at the top must hold.
    assert!(d < 0.1 * scale, "bf16 logits drift {d} (scale {scale})");
    assert_eq!(phi4mm::text::sampler::argmax(&logits), phi4mm::text::sampler::argmax(&expected));
}
