//! The `phi4mm` binary end to end on the tiny checkpoint: prompts built from flags equal the
//! reference's, greedy output equals the reference's, and failures exit non-zero with a message.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn phi4mm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phi4mm"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn expected(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected").join(name)).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Greedy tokens of a reference case, read from its safetensors file.
fn greedy_of(case: &str) -> Vec<u64> {
    let path = fixtures().join("expected").join(format!("{case}.safetensors"));
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("greedy").unwrap();
    t.data().chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn run_json_matches_reference_prompt_and_greedy_tokens() {
    let cases = expected("cases.json");
    let case = cases.as_array().unwrap().iter().find(|c| c["name"] == "text_base").unwrap();
    let msgs = case["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["role"], "system");
    let tiny = fixtures().join("tiny");
    let out = phi4mm(&[
        "run", "--model", tiny.to_str().unwrap(), "--dtype", "f32", "--json",
        "--max-new-tokens", "16", "--ignore-eos",
        "--system", msgs[0]["content"].as_str().unwrap(),
        msgs[1]["content"].as_str().unwrap(),
    ]);
    let v = json(&out);
    assert_eq!(v["mode"], "text");
    let chat = expected("chat.json");
    let want_prompt = chat.as_array().unwrap().iter().find(|c| c["name"] == "system_user").unwrap();
    assert_eq!(ids(&v["prompt_tokens"]), ids(&want_prompt["ids"]));
    assert_eq!(ids(&v["tokens"]), greedy_of("text_base"));
    assert_eq!(v["finish_reason"], "length");
    let lp = v["logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), 16);
    assert_eq!(lp[0]["top"].as_array().unwrap().len(), 5);
    assert!(v["timings"]["decode_tok_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn tools_flag_renders_like_the_reference() {
    let chat = expected("chat.json");
    let case = chat.as_array().unwrap().iter().find(|c| c["name"] == "system_tools").unwrap();
    let msgs = case["messages"].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools.json");
    std::fs::write(&tools, msgs[0]["tools"].as_str().unwrap()).unwrap();
    let tiny = fixtures().join("tiny");
    let out = phi4mm(&[
        "run", "--model", tiny.to_str().unwrap(), "--dtype", "f32", "--json", "--max-new-tokens", "1",
        "--system", msgs[0]["content"].as_str().unwrap(),
        "--tools", tools.to_str().unwrap(),
        msgs[1]["content"].as_str().unwrap(),
    ]);
    assert_eq!(ids(&json(&out)["prompt_tokens"]), ids(&case["ids"]));
}

#[test]
fn raw_prompt_skips_the_template() {
    let tiny = fixtures().join("tiny");
    let out = phi4mm(&["run", "--model", tiny.to_str().unwrap(), "--json", "--raw", "--max-new-tokens", "2", "Hello"]);
    let v = json(&out);
    assert_eq!(ids(&v["prompt_tokens"]), vec![13225]);
}

#[test]
fn streaming_text_run_and_bench() {
    let tiny = fixtures().join("tiny");
    let out = phi4mm(&["run", "--model", tiny.to_str().unwrap(), "--max-new-tokens", "8", "Hi"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.stdout.is_empty());

    let out = phi4mm(&[
        "bench", "--model", tiny.to_str().unwrap(), "--prompt-tokens", "64", "--gen-tokens", "8", "--json",
        "--threads", "2",
    ]);
    let v = json(&out);
    assert_eq!(v["prompt_tokens"], 64);
    assert_eq!(v["gen_tokens"], 8);
    assert_eq!(v["threads"], 2);
    assert!(v["prefill_tok_s"].as_f64().unwrap() > 0.0 && v["decode_tok_s"].as_f64().unwrap() > 0.0);
}

fn chat(input: &str) -> (String, String) {
    let tiny = fixtures().join("tiny");
    let mut child = Command::new(env!("CARGO_BIN_EXE_phi4mm"))
        .args(["chat", "--model", tiny.to_str().unwrap(), "--max-new-tokens", "6"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn chat_keeps_history_and_handles_commands() {
    let (one, _) = chat("Hello\n/exit\n");
    assert!(one.len() > 1);
    // After /reset the same message gets the same (greedy) reply; with history it does not.
    let (reset, err) = chat("Hello\n/image /nonexistent.png\n/reset\nHello\n/exit\n");
    assert_eq!(reset, format!("{one}{one}"));
    assert!(err.contains("/nonexistent.png") && err.contains("conversation cleared"), "{err}");
    let (kept, _) = chat("Hello\nHello\n/exit\n");
    assert!(kept.starts_with(&one));
    assert_ne!(kept, format!("{one}{one}"), "the second turn should see the first");
}

#[test]
fn missing_hub_model_says_how_to_download() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_phi4mm"))
        .args(["run", "--model", "microsoft/Phi-4-multimodal-instruct", "hi"])
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hf download microsoft/Phi-4-multimodal-instruct"), "{err}");
}

#[test]
fn hub_id_resolves_in_the_cache() {
    // models--org--name/snapshots/<rev>/ with refs/main, files symlinked as the hub does.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--microsoft--Phi-4-multimodal-instruct");
    let snap = repo.join("snapshots").join("abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
    for entry in std::fs::read_dir(fixtures().join("tiny")).unwrap() {
        let p = entry.unwrap().path().canonicalize().unwrap();
        std::os::unix::fs::symlink(&p, snap.join(p.file_name().unwrap())).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_phi4mm"))
        .args(["run", "--json", "--max-new-tokens", "1", "hi"])
        .env("HF_HOME", cache.path().parent().unwrap().join("unused"))
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 1);
}

#[test]
fn bad_inputs_fail_with_a_message() {
    let tiny = fixtures().join("tiny");
    let t = tiny.to_str().unwrap();
    for (args, needle) in [
        (vec!["run", "--model", t, "--image", "/nonexistent/cat.jpg", "hi"], "/nonexistent/cat.jpg"),
        (vec!["run", "--model", t, "--dtype", "f64", "hi"], "--dtype"),
        (vec!["run", "--model", t, "--max-new-tokens", "200000", "hi"], "context"),
        (vec!["run", "--model", "/nonexistent/model", "hi"], "/nonexistent/model"),
    ] {
        let out = phi4mm(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
