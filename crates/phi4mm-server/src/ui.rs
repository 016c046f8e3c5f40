//! The chat page at `/` and its files under `/ui/`, embedded in the binary from the crate's
//! `ui/` folder (no build step: plain HTML, CSS and ES modules, plus the pinned libraries in
//! `ui/vendor/`, listed with their versions, licences and checksums in `ui/vendor/README.md`).
//!
//! The page talks only to this server's own `/v1` API, like any other client. Every file is
//! sent with a Content-Security-Policy that allows nothing but this origin (and `data:` /
//! `blob:` for media the user attaches or records), so neither a CDN request nor an inline
//! script from a model's reply can run, even past the page's HTML sanitiser. The page needs no
//! API key; its requests do, and it asks the user for one when the server answers 401.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// What the page may load and run: this origin only.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; media-src 'self' data: blob:; font-src 'self'; connect-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

macro_rules! embed {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/", $path)) as &[u8])),*]
    };
}

/// Every file of the page, by its path under `ui/`.
pub static FILES: &[(&str, &[u8])] = embed![
    "index.html",
    "app.css",
    "js/main.js",
    "js/api.js",
    "js/store.js",
    "js/markdown.js",
    "js/media.js",
    "js/recorder.js",
    "js/pcm-worklet.js",
    "js/chat.js",
    "js/composer.js",
    "js/notice.js",
    "js/request.js",
    "js/transcribe.js",
    "js/settings.js",
    "vendor/README.md",
    "vendor/marked/marked.umd.js",
    "vendor/marked/LICENSE",
    "vendor/dompurify/purify.min.js",
    "vendor/dompurify/LICENSE",
    "vendor/highlight/highlight.min.js",
    "vendor/highlight/github.min.css",
    "vendor/highlight/github-dark.min.css",
    "vendor/highlight/LICENSE",
    "vendor/katex/katex.min.js",
    "vendor/katex/katex.min.css",
    "vendor/katex/LICENSE",
    "vendor/katex/fonts/KaTeX_AMS-Regular.woff2",
    "vendor/katex/fonts/KaTeX_Caligraphic-Bold.woff2",
    "vendor/katex/fonts/KaTeX_Caligraphic-Regular.woff2",
    "vendor/katex/fonts/KaTeX_Fraktur-Bold.woff2",
    "vendor/katex/fonts/KaTeX_Fraktur-Regular.woff2",
    "vendor/katex/fonts/KaTeX_Main-Bold.woff2",
    "vendor/katex/fonts/KaTeX_Main-BoldItalic.woff2",
    "vendor/katex/fonts/KaTeX_Main-Italic.woff2",
    "vendor/katex/fonts/KaTeX_Main-Regular.woff2",
    "vendor/katex/fonts/KaTeX_Math-BoldItalic.woff2",
    "vendor/katex/fonts/KaTeX_Math-Italic.woff2",
    "vendor/katex/fonts/KaTeX_SansSerif-Bold.woff2",
    "vendor/katex/fonts/KaTeX_SansSerif-Italic.woff2",
    "vendor/katex/fonts/KaTeX_SansSerif-Regular.woff2",
    "vendor/katex/fonts/KaTeX_Script-Regular.woff2",
    "vendor/katex/fonts/KaTeX_Size1-Regular.woff2",
    "vendor/katex/fonts/KaTeX_Size2-Regular.woff2",
    "vendor/katex/fonts/KaTeX_Size3-Regular.woff2",
    "vendor/katex/fonts/KaTeX_Size4-Regular.woff2",
    "vendor/katex/fonts/KaTeX_Typewriter-Regular.woff2",
];

/// `GET /` and `GET /ui/{path}` (no API key: the page is static; its API calls carry the key).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(|| async { file("index.html") })).route("/ui/{*path}", get(|Path(p): Path<String>| async move { file(&p) }))
}

fn file(path: &str) -> Response {
    let Some((_, body)) = FILES.iter().find(|(p, _)| *p == path) else {
        return crate::error::ApiError::new(StatusCode::NOT_FOUND, "not_found_error", format!("no page file `{path}`")).into_response();
    };
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(path)));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "woff2" => "font/woff2",
        "md" => "text/markdown; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file under `ui/` is embedded (a new file cannot be forgotten in [`FILES`]).
    #[test]
    fn every_ui_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
        let mut stack = vec![root.clone()];
        let mut found = Vec::new();
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&root) {
                    found.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        assert!(found.len() > 10, "ui/ was read");
        for f in &found {
            assert!(FILES.iter().any(|(p, _)| p == f), "ui/{f} is not in ui::FILES");
        }
        assert_eq!(found.len(), FILES.len(), "ui::FILES lists a file that is not in ui/");
    }

    /// Every vendored file has the SHA-256 that `ui/vendor/README.md` gives for it.
    #[test]
    fn vendored_files_match_their_recorded_checksums() {
        use sha2::Digest;
        let readme = FILES.iter().find(|(p, _)| *p == "vendor/README.md").map(|(_, b)| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
        let vendored: Vec<_> = FILES.iter().filter(|(p, _)| p.starts_with("vendor/") && *p != "vendor/README.md").collect();
        assert!(vendored.len() > 20);
        for (path, body) in vendored {
            let name = format!("| `{}` |", &path["vendor/".len()..]);
            let row = readme.lines().find(|l| l.starts_with(&name)).unwrap_or_else(|| panic!("ui/vendor/README.md has no row for {path}"));
            let hash: String = sha2::Sha256::digest(body).iter().map(|b| format!("{b:02x}")).collect();
            assert!(row.ends_with(&format!("`{hash}` |")), "{path} has changed (SHA-256 {hash}); its row in ui/vendor/README.md says otherwise");
        }
    }

    #[test]
    fn pages_carry_the_content_security_policy() {
        for (path, _) in FILES {
            let r = file(path);
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
            if !path.ends_with("LICENSE") {
                assert_ne!(r.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8", "{path} has a known type");
            }
        }
        assert_eq!(file("../Cargo.toml").status(), StatusCode::NOT_FOUND);
        assert_eq!(file("js/nope.js").status(), StatusCode::NOT_FOUND);
    }
}
