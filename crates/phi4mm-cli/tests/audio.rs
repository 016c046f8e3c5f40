//! `phi4mm run --audio` and `phi4mm transcribe` end to end on the tiny checkpoint, and the
//! errors bad audio files get.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn phi4mm(args: &[&str]) -> Output {
    let tiny = fixtures().join("tiny");
    let mut all = vec![args[0], "--model", tiny.to_str().unwrap(), "--max-new-tokens", "2"];
    all.extend_from_slice(&args[1..]);
    Command::new(env!("CARGO_BIN_EXE_phi4mm")).args(&all).output().unwrap()
}

/// A PCM WAV file with the given format code, rate, channels, bits and raw data.
fn wav(format: u16, rate: u32, channels: u16, bits: u16, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&format.to_le_bytes());
    v.extend_from_slice(&channels.to_le_bytes());
    v.extend_from_slice(&rate.to_le_bytes());
    v.extend_from_slice(&(rate * channels as u32 * bits as u32 / 8).to_le_bytes());
    v.extend_from_slice(&(channels * bits / 8).to_le_bytes());
    v.extend_from_slice(&bits.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&(data.len() as u32).to_le_bytes());
    v.extend_from_slice(data);
    v
}

fn tone(rate: u32, seconds: f64) -> Vec<u8> {
    let n = (rate as f64 * seconds) as usize;
    (0..n)
        .flat_map(|i| (((i as f64 * 0.05).sin() * 8000.0) as i16).to_le_bytes())
        .collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn audio_prompt_uses_speech_mode_and_token_count() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "a.wav", &wav(1, 16_000, 1, 16, &tone(16_000, 10.0)));
    let v = json(&phi4mm(&["run", "--json", "--audio", &f, "Transcribe."]));
    assert_eq!(v["mode"], "speech");
    let ids: Vec<u64> = serde_json::from_value(v["prompt_tokens"].clone()).unwrap();
    assert_eq!(ids.iter().filter(|&&t| t == 200_011).count(), 125, "10 s at 16 kHz is 125 tokens");
    // Image + audio: the vision adapter.
    let img = fixtures().join("images").join("square_448x448.png");
    let v = json(&phi4mm(&["run", "--json", "--image", img.to_str().unwrap(), "--audio", &f, "Q"]));
    assert_eq!(v["mode"], "vision_speech");
}

#[test]
fn transcribe_uses_the_model_card_prompt() {
    let dir = tempfile::tempdir().unwrap();
    // 2 s of stereo: 2 × 96000 interleaved samples.
    let f = write(dir.path(), "a.wav", &wav(1, 48_000, 2, 16, &tone(48_000, 4.0)));
    let v = json(&phi4mm(&["transcribe", "--json", "--translate-to", "French", &f]));
    let c = &v["completion"];
    assert_eq!(c["mode"], "speech");
    assert!(v["transcript"].is_string());
    let ids: Vec<u64> = serde_json::from_value(c["prompt_tokens"].clone()).unwrap();
    // 2 s of 48 kHz stereo → 32000 samples at 16 kHz → 198 frames → 25 tokens.
    assert_eq!(ids.iter().filter(|&&t| t == 200_011).count(), 25);
}

#[test]
fn bad_audio_files_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = wav(1, 16_000, 1, 16, &tone(16_000, 1.0));
    let mut zero_rate = good.clone();
    zero_rate[24..28].copy_from_slice(&0u32.to_le_bytes());
    let mut absurd = wav(1, 16_000, 1, 16, &tone(16_000, 0.01));
    let n = absurd.len();
    absurd[n - 164..n - 160].copy_from_slice(&u32::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("empty.wav", vec![], &["empty"]),
        ("garbage.wav", b"RIFF\x10\0\0\0WAVEgarbage!garbage!".to_vec(), &["audio"]),
        ("truncated.wav", good[..30].to_vec(), &["audio"]),
        ("zero_length.wav", wav(1, 16_000, 1, 16, &[]), &["no audio", "zero length"]),
        ("codec.wav", wav(0x7777, 16_000, 1, 16, &tone(16_000, 1.0)), &["unsupported", "codec"]),
        ("zero_rate.wav", zero_rate, &["audio"]),
        ("absurd.wav", absurd, &["too short"]),
        ("short.wav", wav(1, 16_000, 1, 16, &tone(16_000, 0.02)), &["too short"]),
        ("text.mp3", b"ID3 this is not really an mp3 file".to_vec(), &["audio"]),
    ];
    for (name, bytes, needles) in cases {
        let f = write(dir.path(), name, &bytes);
        let out = phi4mm(&["run", "--audio", &f, "hi"]);
        assert!(!out.status.success(), "{name} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("");
        assert!(first.contains(name), "{name}: {first}");
        assert!(needles.iter().any(|n| first.contains(n)), "{name}: {first}");
    }
}
