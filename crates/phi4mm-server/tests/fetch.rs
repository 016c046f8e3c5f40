//! Media URLs against a loopback media server: refused by default (loopback is private),
//! fetched when its host is allowed, with redirects checked hop by hop (to a host off the
//! allow-list, or more than 3, is refused), the size cap, a 404, and local paths only under
//! the allowed directory with no `..` escape. Each fetched answer equals the inline one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::Duration;

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use phi4mm_server::fetch::MediaPolicy;
use phi4mm_server::{router, ServerConfig};
use serde_json::{json, Value};

mod common;
use common::{data_uri, engine, fixtures, post, state};

/// A media server on loopback: `/cat.png`, `/hop/N` (N redirects then the image), `/far`
/// (a redirect to another host name), `/big` (over the cap).
async fn media_server() -> String {
    let png = std::fs::read(fixtures().join("images/square_448x448.png")).unwrap();
    let p1 = png.clone();
    let app = axum::Router::new()
        .route("/cat.png", get(move || async move { ([("content-type", "image/png")], p1.clone()).into_response() }))
        .route(
            "/hop/{n}",
            get(|Path(n): Path<u32>| async move {
                if n == 0 {
                    Redirect::temporary("/cat.png")
                } else {
                    Redirect::temporary(&format!("/hop/{}", n - 1))
                }
            }),
        )
        .route("/far", get(|| async { Redirect::temporary("http://localhost.invalid/cat.png") }))
        .route("/big", get(|| async { vec![0u8; 300_000] }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

fn image_request(url: &str) -> Value {
    json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}], "max_tokens": 4, "temperature": 0, "ignore_eos": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_follow_the_forgery_rules() {
    let engine = engine();
    let base = media_server().await;
    let inline = post(&router(state(&engine, ServerConfig::default())), "/v1/chat/completions", image_request(&data_uri("images/square_448x448.png", "image/png"))).await.1;
    // Default policy: loopback is refused, after DNS too (`localhost`).
    let app = router(state(&engine, ServerConfig::default()));
    let (s, v) = post(&app, "/v1/chat/completions", image_request(&format!("{base}/cat.png"))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("loopback"), "{v}");
    let port = base.rsplit(':').next().unwrap();
    let (s, v) = post(&app, "/v1/chat/completions", image_request(&format!("http://localhost:{port}/cat.png"))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("resolves only to private"), "{v}");
    // Allowed host: fetched, the same answer as inline; 3 redirects fine, 4 refused; a redirect
    // to a host off the list refused; the size cap; a 404.
    let media = MediaPolicy { allowed_domains: vec!["127.0.0.1".into()], max_bytes: 200_000, timeout: Duration::from_secs(10), ..MediaPolicy::default() };
    let app = router(state(&engine, ServerConfig { media, ..ServerConfig::default() }));
    let (s, v) = post(&app, "/v1/chat/completions", image_request(&format!("{base}/cat.png"))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"], inline["choices"]);
    assert_eq!(post(&app, "/v1/chat/completions", image_request(&format!("{base}/hop/2"))).await.0, StatusCode::OK);
    for (path, says) in [("/hop/3", "redirects"), ("/far", "allowed-media-domains"), ("/big", "limit"), ("/nothing", "404")] {
        let (s, v) = post(&app, "/v1/chat/completions", image_request(&format!("{base}{path}"))).await;
        assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("messages[0].content[0]")), "{path}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(says), "{path}: {v}");
    }
    // With an allow-list, other hosts are not fetched at all.
    let (s, v) = post(&app, "/v1/chat/completions", image_request("http://example.com/cat.png")).await;
    assert!(s == StatusCode::BAD_REQUEST && v["error"]["message"].as_str().unwrap().contains("allowed-media-domains"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_paths_only_under_the_allowed_directory() {
    let engine = engine();
    let inline = post(&router(state(&engine, ServerConfig::default())), "/v1/chat/completions", image_request(&data_uri("images/square_448x448.png", "image/png"))).await.1;
    let root = fixtures().join("images");
    let media = MediaPolicy { local_root: Some(root.clone()), ..MediaPolicy::default() };
    let app = router(state(&engine, ServerConfig { media, ..ServerConfig::default() }));
    for url in ["square_448x448.png".to_string(), format!("file://{}", root.join("square_448x448.png").display())] {
        let (s, v) = post(&app, "/v1/chat/completions", image_request(&url)).await;
        assert_eq!(s, StatusCode::OK, "{url}: {v}");
        assert_eq!(v["choices"], inline["choices"], "{url}");
    }
    for url in ["../audio/speech_1s_16k.wav".to_string(), format!("file://{}/../tiny/config.json", root.display()), "/etc/passwd".into(), "missing.png".into()] {
        let (s, v) = post(&app, "/v1/chat/completions", image_request(&url)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{url}: {v}");
    }
}
