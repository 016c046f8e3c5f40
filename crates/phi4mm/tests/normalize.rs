//! `Normalize::WhisperEn` against OpenAI Whisper's `EnglishTextNormalizer` itself:
//! `reference/make_normalize.py` (openai-whisper 20250625) normalised the tricky inputs of
//! `fixtures/metrics/normalize.json` (contractions, titles, spelled numbers, ordinals, currencies,
//! decimals, fillers, brackets, diacritics, British spellings, whitespace, other scripts).

use std::path::PathBuf;

use phi4mm::eval::Normalize;
use serde_json::Value;

#[cfg(test)]
fn cases() -> Vec<(String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/metrics/normalize.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v.as_array().unwrap().iter().map(|c| (c["input"].as_str().unwrap().to_owned(), c["whisper_en"].as_str().unwrap().to_owned())).collect()
}

#[test]
fn whisper_english_normalizer_matches_whisper() {
    let cases = cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mismatches: Vec<String> = cases
        .iter()
        .filter_map(|(input, reference)| {
            let ours = Normalize::WhisperEn.apply(input);
            (&ours != reference).then(|| format!("input {input:?}\n  ours      {ours:?}\n  reference {reference:?}"))
        })
        .collect();
    assert!(mismatches.is_empty(), "{} of {} cases differ:\n{}", mismatches.len(), cases.len(), mismatches.join("\n"));
}

#[test]
fn none_leaves_text_alone() {
    for (input, _) in cases() {
        assert_eq!(Normalize::None.apply(&input), input);
    }
}
