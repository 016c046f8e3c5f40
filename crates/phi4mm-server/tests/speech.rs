//! `/v1/audio/transcriptions` and `/v1/audio/translations` through the router on the tiny
//! checkpoint: a short file gives the library's answer for the model card's prompt; a 45 s
//! file is two window pieces whose texts and times appear in every format; the stream
//! reassembles into the whole text; bad forms are 400s naming the field.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use phi4mm::audio::audio_io::AudioLimits;
use phi4mm::audio::split::{split_audio, WINDOW_SECONDS};
use phi4mm::{Engine, GenerateRequest, MediaInput, Message, PromptInput, SamplingParams};
use phi4mm_server::{router, ServerConfig};
use serde_json::Value;
use tower::ServiceExt;

mod common;
use common::{engine, fixtures, sse_data, state};

const BOUNDARY: &str = "phi4mm-test-boundary";

/// A multipart form: text fields and an optional file.
fn form(fields: &[(&str, &str)], file: Option<&[u8]>) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in fields {
        b.extend(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").as_bytes());
    }
    if let Some(f) = file {
        b.extend(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes());
        b.extend_from_slice(f);
        b.extend(b"\r\n");
    }
    b.extend(format!("--{BOUNDARY}--\r\n").as_bytes());
    b
}

async fn send(app: &axum::Router, path: &str, body: Vec<u8>) -> (StatusCode, String, String) {
    let req = Request::builder().method("POST").uri(path).header("content-type", format!("multipart/form-data; boundary={BOUNDARY}")).body(Body::from(body)).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap_or("").to_string()).unwrap_or_default();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ct, String::from_utf8_lossy(&bytes).into_owned())
}

/// The library's greedy answer for one audio and an instruction.
fn library(engine: &Engine, audio: Vec<u8>, instruction: &str, max: usize) -> String {
    let mut r = GenerateRequest::new(PromptInput::Chat(vec![Message::new("user", format!("<|audio_1|>{instruction}"))]));
    r.audios = vec![MediaInput::Bytes(audio)];
    r.max_new_tokens = max;
    r.sampling = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
    engine.generate(&r, |_| true).unwrap().text.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_file_is_the_library_answer_in_json_text_and_stream() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig::default()));
    let wav = std::fs::read(fixtures().join("audio/speech_1s_16k.wav")).unwrap();
    let want = library(&engine, wav.clone(), "Transcribe the audio clip into text.", 8);
    let (s, _, body) = send(&app, "/v1/audio/transcriptions", form(&[("model", "whisper-1"), ("max_completion_tokens", "8")], Some(&wav))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "an unknown model: {body}");
    let (s, _, body) = send(&app, "/v1/audio/transcriptions", form(&[("max_completion_tokens", "8")], Some(&wav))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["text"], want);
    assert_eq!(v["usage"], serde_json::json!({"type": "duration", "seconds": 1}));
    let (s, ct, body) = send(&app, "/v1/audio/transcriptions", form(&[("max_completion_tokens", "8"), ("response_format", "text")], Some(&wav))).await;
    assert_eq!((s, ct.starts_with("text/plain"), body.trim_end()), (StatusCode::OK, true, want.as_str()));
    // The translation prompt, to French.
    let fr = library(&engine, wav.clone(), "Translate the audio to French.", 8);
    let (_, _, body) = send(&app, "/v1/audio/translations", form(&[("max_completion_tokens", "8"), ("to_language", "French")], Some(&wav))).await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["text"], fr);
    // Streamed: transcription.chunk deltas that add up to the text.
    let (s, _, body) = send(&app, "/v1/audio/transcriptions", form(&[("max_completion_tokens", "8"), ("stream", "true"), ("stream_include_usage", "true")], Some(&wav))).await;
    assert_eq!(s, StatusCode::OK);
    let data = sse_data(body.as_bytes());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "transcription.chunk"));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text.trim(), want);
    assert_eq!(chunks.last().unwrap()["choices"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_file_is_window_segments_in_every_format() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig::default()));
    let wav = std::fs::read(fixtures().join("audio/speech_45s_16k.wav")).unwrap();
    let (duration, pieces) = split_audio(wav.clone(), WINDOW_SECONDS, &AudioLimits::default()).unwrap();
    assert_eq!(pieces.len(), 2);
    let want: Vec<String> = pieces.iter().map(|p| library(&engine, p.bytes.clone(), "Transcribe the audio clip into text.", 6)).collect();
    let (s, _, body) = send(&app, "/v1/audio/transcriptions", form(&[("max_completion_tokens", "6"), ("response_format", "verbose_json"), ("language", "en")], Some(&wav))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["duration"].as_f64(), Some(duration));
    assert_eq!(v["language"], "en");
    let segs = v["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 2);
    assert_eq!((segs[0]["start"].as_f64(), segs[0]["end"].as_f64(), segs[1]["end"].as_f64()), (Some(0.0), Some(40.0), Some(duration)));
    for (s, w) in segs.iter().zip(&want) {
        assert_eq!(s["text"], w.as_str());
        assert!(s["avg_logprob"].as_f64().unwrap() <= 0.0);
    }
    let (_, ct, srt) = send(&app, "/v1/audio/transcriptions", form(&[("max_completion_tokens", "6"), ("response_format", "srt")], Some(&wav))).await;
    assert!(ct.starts_with("application/x-subrip"));
    let nonempty: Vec<&String> = want.iter().filter(|w| !w.is_empty()).collect();
    assert!(srt.starts_with("1\n00:00:00,000 --> 00:00:40,000\n") || want[0].is_empty(), "{srt}");
    assert!(nonempty.iter().all(|w| srt.contains(w.as_str())), "{srt}");
    let (_, ct, vtt) = send(&app, "/v1/audio/transcriptions", form(&[("max_completion_tokens", "6"), ("response_format", "vtt")], Some(&wav))).await;
    assert!(ct.starts_with("text/vtt") && vtt.starts_with("WEBVTT\n\n"), "{vtt}");
    assert!(vtt.contains("00:00:40.000 --> 00:00:45.000") || want[1].is_empty(), "{vtt}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_forms_are_400s_naming_the_field() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig::default()));
    let wav = std::fs::read(fixtures().join("audio/speech_1s_16k.wav")).unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (form(&[("model", "phi4mm")], None), "file"),
        (form(&[], Some(b"RIFF....WAVEjunk")), "file"),
        (form(&[], Some(&wav[..40])), "file"),
        (form(&[("response_format", "yaml")], Some(&wav)), "response_format"),
        (form(&[("response_format", "srt"), ("stream", "true")], Some(&wav)), "stream"),
        (form(&[("temperature", "hot")], Some(&wav)), "temperature"),
        (form(&[("temperature", "7")], Some(&wav)), "temperature"),
        (form(&[("model", "vision")], Some(&wav)), "model"),
    ];
    for (body, param) in cases {
        let (s, _, b) = send(&app, "/v1/audio/transcriptions", body).await;
        let v: Value = serde_json::from_str(&b).unwrap_or_default();
        assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{b}");
    }
    // Not multipart at all.
    let req = Request::builder().method("POST").uri("/v1/audio/transcriptions").header("content-type", "application/json").body(Body::from("{}")).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}
