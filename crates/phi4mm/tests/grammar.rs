//! The grammar masks on the real o200k vocabulary (the tiny checkpoint's tokenizer): a JSON
//! schema allows exactly the tokens that keep the output valid, the end of the turn only once
//! the value is whole, and nothing but the end after it; a Lark grammar names special tokens.
//! Also prints the mean time per mask (the figure the README quotes).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::sync::atomic::Ordering;

use phi4mm::text::grammar::Grammars;
use phi4mm::text::tokenizer::Tokenizer;

mod common;

const VOCAB: usize = 200064;

fn setup() -> (Tokenizer, Grammars, [u32; 2]) {
    let dir = common::tiny();
    let tok = Tokenizer::load(&dir.join("tokenizer.json"), &dir.join("tokenizer_config.json")).unwrap();
    let end = [tok.token_id("<|end|>").unwrap(), tok.token_id("<|endoftext|>").unwrap()];
    let g = Grammars::new(&tok, VOCAB, &end).unwrap();
    (tok, g, end)
}

/// The allowed set after `generated`.
fn allowed(hook: &phi4mm::text::sampler::MaskHook, generated: &[u32]) -> Vec<bool> {
    let mut a = vec![true; VOCAB];
    hook.0.lock().unwrap().allowed(generated, &mut a);
    a
}

#[test]
fn a_json_schema_allows_only_valid_continuations() {
    let (tok, g, end) = setup();
    let schema = serde_json::json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}});
    let hook = g.json_schema(schema).unwrap();
    let want = tok.encode("{\"ok\": true}").unwrap();
    let mut out = Vec::new();
    for &t in &want {
        let a = allowed(&hook, &out);
        assert!(a[t as usize], "token {t} ({:?}) is allowed after {:?}", tok.decode(&[t], false), tok.decode(&out, false));
        assert!(!a[end[0] as usize], "no end before the object is whole");
        assert!(!a[tok.encode("x").unwrap()[0] as usize], "an `x` is never valid here");
        out.push(t);
    }
    let a = allowed(&hook, &out);
    assert!(a[end[0] as usize] && a[end[1] as usize], "the end is allowed once the object is whole");
    assert_eq!(a.iter().filter(|&&x| x).count(), 2, "and nothing else");
    let st = g.stats();
    let (n, ns) = (st.masks.load(Ordering::Relaxed), st.nanos.load(Ordering::Relaxed));
    eprintln!("json schema masks: {n}, mean {:.1} µs per mask (200064-id vocabulary, incl. writing the bool mask)", ns as f64 / n as f64 / 1e3);
    // A schema that is not one is an error, not a panic.
    assert!(g.json_schema(serde_json::json!({"type": 7})).is_err());
}

#[test]
fn a_lark_grammar_names_special_tokens_and_mask_cost_is_reported() {
    let (tok, g, _) = setup();
    let open = tok.token_id("<|tool_call|>").unwrap();
    let hook = g.lark("start: <|tool_call|> %json {\"type\": \"array\", \"maxItems\": 1, \"items\": {\"type\": \"integer\"}} <|/tool_call|>\n").unwrap();
    let a = allowed(&hook, &[]);
    assert_eq!(a.iter().filter(|&&x| x).count(), 1, "only `<|tool_call|>` may start");
    assert!(a[open as usize]);
    // An invalid grammar is an error.
    assert!(g.lark("start: ( \n").is_err());
    let s = g.stats();
    let (n, ns) = (s.masks.load(Ordering::Relaxed), s.nanos.load(Ordering::Relaxed));
    assert!(n >= 1);
    eprintln!("grammar masks: {n}, mean {:.1} µs per mask (200064-id vocabulary)", ns as f64 / n as f64 / 1e3);
}
