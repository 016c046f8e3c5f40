//! `phi4mm run --image` end to end on the tiny checkpoint, and the errors bad image files get.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn run(args: &[&str]) -> Output {
    let tiny = fixtures().join("tiny");
    let mut all = vec!["run", "--model", tiny.to_str().unwrap(), "--max-new-tokens", "2"];
    all.extend_from_slice(args);
    Command::new(env!("CARGO_BIN_EXE_phi4mm")).args(&all).output().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn image_prompt_expands_placeholders_and_uses_vision_mode() {
    let img = fixtures().join("images").join("wide_500x300.png");
    let out = run(&["--json", "--image", img.to_str().unwrap(), "Describe it."]);
    let v = json(&out);
    assert_eq!(v["mode"], "vision");
    let ids: Vec<u64> = serde_json::from_value(v["prompt_tokens"].clone()).unwrap();
    assert_eq!(ids.iter().filter(|&&t| t == 200_010).count(), 721);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("721 image tokens"), "{err}");
}

#[test]
fn frames_directory_and_crop_cap() {
    let dir = tempfile::tempdir().unwrap();
    for (i, f) in ["square_448x448.png", "wide_500x300.png", "gray_640x480.png"].iter().enumerate() {
        std::fs::copy(fixtures().join("images").join(f), dir.path().join(format!("frame{i:02}.png"))).unwrap();
    }
    let out = run(&["--json", "--frames", dir.path().to_str().unwrap(), "--max-crops", "1", "What happens?"]);
    let v = json(&out);
    let ids: Vec<u64> = serde_json::from_value(v["prompt_tokens"].clone()).unwrap();
    // One crop per frame (448×448 → 545; the others are letterboxed inside one crop).
    let want: usize = [(448, 448), (500, 300), (640, 480)]
        .iter()
        .map(|&(w, h)| phi4mm::vision::image_prep::Layout::new(w, h, 1).unwrap().num_tokens)
        .sum();
    assert_eq!(want, 545 + 443 + 477);
    assert_eq!(ids.iter().filter(|&&t| t == 200_010).count(), want);
    let out = run(&["--frames", dir.path().to_str().unwrap(), "--max-crops", "65", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_crops"));
}

#[test]
fn tiny_images_work_and_thin_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.png");
    image::RgbImage::from_pixel(1, 1, image::Rgb([9, 9, 9])).save(&one).unwrap();
    // The reference upscales a 1×1 image to one 448×448 crop.
    let v = json(&run(&["--json", "--image", one.to_str().unwrap(), "hi"]));
    assert_eq!(v["mode"], "vision");
    let thin = dir.path().join("thin.png");
    image::RgbImage::from_pixel(5000, 5, image::Rgb([9, 9, 9])).save(&thin).unwrap();
    let out = run(&["--image", thin.to_str().unwrap(), "hi"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("under 10 px"));
}

#[test]
fn bad_image_files_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let png = std::fs::read(fixtures().join("images").join("wide_500x300.png")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.png", vec![], "empty"),
        ("garbage.png", b"this is not an image at all".to_vec(), "unsupported"),
        ("truncated.png", png[..png.len() / 3].to_vec(), "decode"),
        ("bomb.ppm", [b"P6\n30000 30000\n255\n".as_slice(), &[0u8; 32]].concat(), "limit"),
        ("audio.wav", [b"RIFF\x24\0\0\0WAVEfmt ".as_slice(), &[0u8; 24]].concat(), "unsupported"),
    ];
    for (name, bytes, needle) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let out = run(&["--image", p.to_str().unwrap(), "hi"]);
        assert!(!out.status.success(), "{name} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
    }
}
