//! `phi4mm serve` as a process on the tiny checkpoint, on a loopback port: `/health` turns 200
//! once the model is loaded, a chat completion works over HTTP, a wrong key is 401. With
//! `PHI4MM_SDK_PYTHON` set to a Python that has the `openai` package (`.ci/run` installs one
//! into a venv), the SDK conformance suite `tests-sdk/openai_conformance.py` runs against it;
//! with `PHI4MM_UI_PYTHON` set to a Python that has `playwright` (and Debian's Chromium at
//! `PHI4MM_UI_CHROMIUM` or /usr/bin/chromium), the web UI's browser tests `tests-ui/test_ui.py`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failure is the report

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Kills the server when the test ends, however it ends.
struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(key: &str) -> Server {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
    let child = Command::new(env!("CARGO_BIN_EXE_phi4mm"))
        .args(["serve", "--model", root().join("fixtures/tiny").to_str().unwrap_or("?"), "--dtype", "f32", "--port", &port.to_string(), "--api-key", key])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("phi4mm serve starts");
    let server = Server(child, port);
    let t = Instant::now();
    loop {
        if let Some((status, _)) = http(port, "GET", "/health", "", None) {
            if status == 200 {
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the server came up");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// One HTTP/1.1 request; (status, body), or none when nothing answers.
fn http(port: u16, method: &str, path: &str, body: &str, key: Option<&str>) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let auth = key.map(|k| format!("authorization: Bearer {k}\r\n")).unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

#[test]
fn serve_answers_over_http() {
    let server = start("k1");
    let body = r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":3,"temperature":0,"ignore_eos":true}"#;
    let (status, text) = http(server.1, "POST", "/v1/chat/completions", body, Some("k1")).expect("an answer");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"completion_tokens\":3"), "{text}");
    let (status, text) = http(server.1, "POST", "/v1/chat/completions", body, Some("wrong")).expect("an answer");
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("authentication_error"), "{text}");
}

#[test]
fn the_openai_sdk_conformance_suite_passes() {
    let Ok(python) = std::env::var("PHI4MM_SDK_PYTHON") else {
        eprintln!("PHI4MM_SDK_PYTHON is not set: the openai SDK suite is not run (.ci/run sets it)");
        return;
    };
    let server = start("sdk-key");
    let out = Command::new(python)
        .arg(root().join("tests-sdk/openai_conformance.py"))
        .args([&format!("http://127.0.0.1:{}/v1", server.1), "sdk-key", root().join("fixtures").to_str().unwrap_or("?")])
        .output()
        .expect("python runs");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the openai SDK suite failed:\n{log}");
    assert!(log.contains("all passed"), "{log}");
    eprintln!("{log}");
}

#[test]
fn the_web_ui_passes_its_browser_tests() {
    let Ok(python) = std::env::var("PHI4MM_UI_PYTHON") else {
        eprintln!("PHI4MM_UI_PYTHON is not set: the browser tests of the web UI are not run (.ci/run sets it)");
        return;
    };
    let chromium = std::env::var("PHI4MM_UI_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let shots = std::env::var("PHI4MM_UI_SCREENSHOTS").map_or_else(|_| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"), PathBuf::from);
    let server = start("ui-key");
    let out = Command::new(python)
        .arg(root().join("tests-ui/test_ui.py"))
        .args([&format!("http://127.0.0.1:{}", server.1), "ui-key", root().join("fixtures").to_str().unwrap_or("?"), shots.to_str().unwrap_or("?"), &chromium])
        .output()
        .expect("python runs");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the web UI's browser tests failed:\n{log}");
    assert!(log.contains("all passed"), "{log}");
    eprintln!("{log}screenshots in {}", shots.display());
}

#[test]
fn serve_with_a_missing_model_exits_with_the_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_phi4mm")).args(["serve", "--model", "/nonexistent/model", "--port", "0"]).output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model") && err.contains("does not exist"), "{err}");
}
