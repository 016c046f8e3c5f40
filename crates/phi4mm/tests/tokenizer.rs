//! The tokenizer and chat template against the reference's ids (transformers' tokenizer on the
//! same `tokenizer.json`, its jinja2 rendering of the model's chat template).

mod common;

use common::*;
use phi4mm::text::tokenizer::Tokenizer;
use phi4mm::Message;

fn tokenizer() -> Tokenizer {
    Tokenizer::load(&tiny().join("tokenizer.json"), &tiny().join("tokenizer_config.json")).unwrap()
}

#[test]
fn ids_match_reference_in_every_language() {
    let tok = tokenizer();
    let cases = read_json("tokenize.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 25, "expected 23 languages plus code and emoji");
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "{}", c["name"]);
        // Round trip (special tokens kept; their rstrip flag eats whitespace, so skip those).
        if !text.contains("<|") {
            assert_eq!(tok.decode(&want, false).unwrap(), text, "{}", c["name"]);
        }
    }
}

#[test]
fn chat_template_matches_reference() {
    let tok = tokenizer();
    let cases = read_json("chat.json");
    for c in cases.as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let prompt = tok.apply_chat_template(&msgs, agp).unwrap();
        assert_eq!(prompt, c["prompt"].as_str().unwrap(), "{}", c["name"]);
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(tok.encode(&prompt).unwrap(), want, "{}", c["name"]);
    }
}

#[test]
fn special_token_ids() {
    let tok = tokenizer();
    for (t, id) in [
        ("<|endoftext|>", 199_999),
        ("<|endoftext10|>", 200_010),
        ("<|endoftext11|>", 200_011),
        ("<|assistant|>", 200_019),
        ("<|end|>", 200_020),
        ("<|user|>", 200_021),
        ("<|system|>", 200_022),
        ("<|tool|>", 200_023),
        ("<|/tool|>", 200_024),
        ("<|tool_call|>", 200_025),
        ("<|/tool_call|>", 200_026),
        ("<|tool_response|>", 200_027),
        ("<|tag|>", 200_028),
    ] {
        assert_eq!(tok.token_id(t), Some(id), "{t}");
    }
}

#[test]
fn streaming_decoder_never_splits_a_character() {
    let tok = tokenizer();
    for text in ["héllo wörld", "日本語のテキスト", "👩‍👩‍👧‍👦 family 🇫🇷", "mixed ✓ text ∑"] {
        let ids = tok.encode(text).unwrap();
        let mut d = phi4mm::text::detok::StreamDecoder::new(&tok);
        let mut out = String::new();
        for &id in &ids {
            let piece = d.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{text}: broken piece {piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&d.finish().unwrap());
        assert_eq!(out, text);
    }
}
