//! The metrics against jiwer 4.0.0 and sacreBLEU 2.6.0 themselves: `reference/make_metrics.py`
//! scored `fixtures/metrics/pairs.jsonl` (empty strings, whitespace runs and tabs, punctuation,
//! casing, CJK, Korean, numbers, HTML entities, sacreBLEU's zh ranges) into
//! `fixtures/metrics/expected.json`.

use std::path::PathBuf;

use phi4mm::eval::{cer, corpus_bleu, wer, BleuTokenize};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/metrics")
}

fn pairs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dir().join("pairs.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["reference"].as_str().unwrap().to_owned(), v["prediction"].as_str().unwrap().to_owned())
        })
        .collect()
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

fn close(what: &str, ours: f64, theirs: &Value) {
    let theirs = theirs.as_f64().unwrap_or_else(|| panic!("{what}: no expected value"));
    assert!((ours - theirs).abs() <= 1e-9 * theirs.abs().max(1.0), "{what}: ours {ours}, reference {theirs}");
}

fn check_set(name: &str, set: &[(&str, &str)], exp: &Value) {
    close(&format!("{name} wer"), wer(set.iter().copied()), &exp["wer"]);
    close(&format!("{name} cer"), cer(set.iter().copied()), &exp["cer"]);
    for tok in ["13a", "zh", "char", "intl", "none"] {
        let b = corpus_bleu(set.iter().copied(), BleuTokenize::parse(tok).unwrap());
        let e = &exp["bleu"][tok];
        close(&format!("{name} bleu {tok}"), b.score, &e["score"]);
        assert_eq!(b.sys_len as u64, e["sys_len"].as_u64().unwrap(), "{name} {tok} hypothesis length");
        assert_eq!(b.ref_len as u64, e["ref_len"].as_u64().unwrap(), "{name} {tok} reference length");
        assert_eq!(b.signature, e["signature"].as_str().unwrap(), "{name} {tok} signature");
    }
}

#[test]
fn corpus_metrics_match_jiwer_and_sacrebleu() {
    let pairs = pairs();
    let exp = expected();
    let subsets = exp["subsets"].as_object().unwrap();
    assert!(subsets.len() >= 5);
    for (name, sub) in subsets {
        let set: Vec<(&str, &str)> =
            sub["indices"].as_array().unwrap().iter().map(|i| &pairs[i.as_u64().unwrap() as usize]).map(|(r, p)| (r.as_str(), p.as_str())).collect();
        check_set(name, &set, sub);
    }
    let empty = &exp["empty_refs"];
    let set: Vec<(&str, &str)> = empty["pairs"].as_array().unwrap().iter().map(|p| (p[0].as_str().unwrap(), p[1].as_str().unwrap())).collect();
    check_set("empty_refs", &set, empty);
}

#[test]
fn per_pair_rates_match_jiwer() {
    let pairs = pairs();
    let exp = expected();
    let per = exp["per_pair"].as_array().unwrap();
    assert_eq!(per.len(), pairs.len());
    for (i, ((r, p), e)) in pairs.iter().zip(per).enumerate() {
        close(&format!("pair {i} wer"), wer([(r.as_str(), p.as_str())]), &e["wer"]);
        close(&format!("pair {i} cer"), cer([(r.as_str(), p.as_str())]), &e["cer"]);
    }
}
