//! Media named by URL: `data:` URIs always; `http(s)` fetched with the server-side request
//! forgery rules; local files only under `--allowed-local-media-path`.
//!
//! For http(s), every address a host name resolves to is checked (the connection goes only
//! to checked addresses, so a name cannot be re-resolved elsewhere), and so is every redirect
//! target: loopback, private, link-local, unique-local, shared, multicast and unspecified
//! addresses are refused unless the host is in `--allowed-media-domains` (which, when given,
//! is also the only set of hosts fetched). At most 3 redirects, 30 s in all, 64 MiB.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use phi4mm::MediaInput;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::error::{ApiError, ApiResult};

/// Where media may come from (from the command line).
#[derive(Debug, Clone)]
pub struct MediaPolicy {
    /// When not empty, the only hosts fetched; these may also be private addresses.
    pub allowed_domains: Vec<String>,
    /// Local files (and `file://` URLs) are read only under this directory.
    pub local_root: Option<PathBuf>,
    pub max_bytes: usize,
    pub timeout: Duration,
    pub max_redirects: usize,
}

impl Default for MediaPolicy {
    fn default() -> Self {
        MediaPolicy { allowed_domains: Vec::new(), local_root: None, max_bytes: 64 << 20, timeout: Duration::from_secs(30), max_redirects: 3 }
    }
}

impl MediaPolicy {
    fn allowed_host(&self, host: &str) -> bool {
        self.allowed_domains.iter().any(|d| d.eq_ignore_ascii_case(host))
    }

    /// Whether `host` may be fetched at all (the allow-list, when there is one).
    fn host_permitted(&self, host: &str) -> bool {
        self.allowed_domains.is_empty() || self.allowed_host(host)
    }
}

/// A media reference from a request, not yet read.
#[derive(Debug, Clone)]
pub enum MediaRef {
    Inline(Vec<u8>),
    Url(String),
}

/// The fetcher: an HTTP client whose resolver refuses forbidden addresses.
pub struct Fetcher {
    policy: Arc<MediaPolicy>,
    client: reqwest::Client,
}

impl Fetcher {
    pub fn new(policy: MediaPolicy) -> std::io::Result<Self> {
        let policy = Arc::new(policy);
        let p = policy.clone();
        let redirects = policy.max_redirects;
        let redirect = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > redirects {
                return attempt.error(format!("more than {redirects} redirects"));
            }
            match check_url(&p, attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e),
            }
        });
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(Guard(policy.clone())))
            .redirect(redirect)
            .timeout(policy.timeout)
            .user_agent(concat!("phi4mm/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Fetcher { policy, client })
    }

    /// The bytes of each reference (`at` names the request part in errors).
    pub async fn resolve(&self, refs: Vec<(MediaRef, String)>) -> ApiResult<Vec<MediaInput>> {
        let mut out = Vec::with_capacity(refs.len());
        for (r, at) in refs {
            out.push(match r {
                MediaRef::Inline(b) => MediaInput::Bytes(b),
                MediaRef::Url(u) => self.one(&u).await.map_err(|m| ApiError::bad_param(at, m).with_code("invalid_media"))?,
            });
        }
        Ok(out)
    }

    async fn one(&self, url: &str) -> Result<MediaInput, String> {
        if let Some(rest) = url.strip_prefix("data:") {
            return data_uri(rest).map(MediaInput::Bytes);
        }
        if let Some(path) = url.strip_prefix("file://") {
            return self.local(Path::new(path));
        }
        let Ok(parsed) = reqwest::Url::parse(url) else {
            return self.local(Path::new(url));
        };
        check_url(&self.policy, &parsed)?;
        self.http(parsed).await.map(MediaInput::Bytes)
    }

    /// A local file, only under the allowed directory (after resolving links and `..`).
    fn local(&self, path: &Path) -> Result<MediaInput, String> {
        let Some(root) = &self.policy.local_root else {
            return Err(format!("local media paths are not allowed on this server (start it with --allowed-local-media-path DIR): `{}`", path.display()));
        };
        let root = root.canonicalize().map_err(|e| format!("the allowed local media directory is unusable: {e}"))?;
        let full = if path.is_absolute() { path.to_path_buf() } else { root.join(path) };
        let real = full.canonicalize().map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
        if !real.starts_with(&root) {
            return Err(format!("`{}` is outside the allowed local media directory", path.display()));
        }
        let len = std::fs::metadata(&real).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?.len();
        if len > self.policy.max_bytes as u64 {
            return Err(format!("`{}` is {len} bytes, over the {}-byte media limit", path.display(), self.policy.max_bytes));
        }
        Ok(MediaInput::Path(real))
    }

    async fn http(&self, url: reqwest::Url) -> Result<Vec<u8>, String> {
        let shown = url.to_string();
        let resp = self.client.get(url).send().await.map_err(|e| format!("fetching {shown} failed: {}", chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("fetching {shown} gave HTTP {}", resp.status()));
        }
        let max = self.policy.max_bytes;
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(format!("{shown} is over the {max}-byte media limit"));
        }
        let mut body = Vec::new();
        let mut s = resp.bytes_stream();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| format!("reading {shown} failed: {}", chain(&e)))?;
            if body.len() + chunk.len() > max {
                return Err(format!("{shown} is over the {max}-byte media limit"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// An error with its causes (reqwest's top level says little).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// `data:<type>;base64,<data>` (after `data:`).
pub fn data_uri(rest: &str) -> Result<Vec<u8>, String> {
    let Some((meta, data)) = rest.split_once(',') else {
        return Err("malformed data: URI (no `,`)".into());
    };
    if !meta.ends_with(";base64") {
        return Err("data: URIs must be base64 (`data:<type>;base64,<data>`)".into());
    }
    base64_bytes(data)
}

pub fn base64_bytes(data: &str) -> Result<Vec<u8>, String> {
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(clean.as_bytes()).map_err(|e| format!("the media data is not valid base64: {e}"))
}

/// The scheme, the allow-list and (for an address written in the URL) the address rules.
fn check_url(p: &MediaPolicy, url: &reqwest::Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("`{}:` media URLs are not fetched (http, https, data)", url.scheme()));
    }
    let host = url.host_str().ok_or("the media URL has no host")?;
    if !p.host_permitted(host) {
        return Err(format!("the media host `{host}` is not in --allowed-media-domains"));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if forbidden(ip) && !p.allowed_host(host) {
            return Err(format!("the media URL's address {ip} is private, loopback or link-local; refused"));
        }
    }
    Ok(())
}

/// Addresses a media fetch must not reach.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback() || a.is_private() || a.is_link_local() || a.is_unspecified() || a.is_broadcast() || a.is_multicast()
                || a.is_documentation() || o[0] == 0 || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10, shared
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) || o[0] >= 240
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if let Some(v4) = a.to_ipv4_mapped() {
                return forbidden(IpAddr::V4(v4));
            }
            a.is_loopback() || a.is_unspecified() || a.is_multicast() || (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfe80 || (s[0] == 0x2001 && s[1] == 0xdb8) || (s[0] == 0x64 && s[1] == 0xff9)
        }
    }
}

/// The resolver: the system's answer with forbidden addresses removed (unless the host is
/// allowed); nothing left is an error that names the host.
struct Guard(Arc<MediaPolicy>);

impl Resolve for Guard {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = policy.allowed_host(&host);
            let ok: Vec<SocketAddr> = found.iter().copied().filter(|a| allowed || !forbidden(a.ip())).collect();
            if ok.is_empty() {
                let msg = format!("`{host}` resolves only to private, loopback or link-local addresses; refused");
                return Err(Box::new(std::io::Error::new(std::io::ErrorKind::PermissionDenied, msg)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(ok.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::forbidden;

    #[test]
    fn private_and_special_addresses_are_forbidden() {
        for a in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "100.64.0.1", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "224.0.0.1"] {
            assert!(forbidden(a.parse().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))), "{a}");
        }
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "93.184.216.34"] {
            assert!(!forbidden(a.parse().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))), "{a}");
        }
    }
}
