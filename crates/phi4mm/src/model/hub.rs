//! Finding a model on disk the way the Hugging Face ecosystem does: a local directory, or a hub
//! id (`microsoft/Phi-4-multimodal-instruct`) resolved in the local hub cache
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), layout
//! `models--{org}--{name}/snapshots/{revision}/`. Nothing is downloaded: when the model is absent
//! the error says which command downloads it.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The official model id.
pub const OFFICIAL_ID: &str = "microsoft/Phi-4-multimodal-instruct";

/// The hub cache directory from the environment, as `huggingface_hub` computes it.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = non_empty_env("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = non_empty_env("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    if let Some(p) = non_empty_env("XDG_CACHE_HOME") {
        return Some(PathBuf::from(p).join("huggingface").join("hub"));
    }
    non_empty_env("HOME").map(|h| PathBuf::from(h).join(".cache").join("huggingface").join("hub"))
}

/// Whether `HF_HUB_OFFLINE` asks for no network access.
pub fn offline() -> bool {
    matches!(
        non_empty_env("HF_HUB_OFFLINE").as_deref(),
        Some("1") | Some("true") | Some("TRUE") | Some("yes") | Some("ON") | Some("on")
    )
}

fn non_empty_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// Resolves `--model`: an existing directory as is, else a hub id looked up in the cache.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(Error::ModelNotFound(format!(
            "--model {spec} is a file; give the model directory (the one holding config.json)"
        )));
    }
    let (rev, id) = match spec.split_once('@') {
        Some((id, rev)) => (Some(rev), id),
        None => (None, spec),
    };
    let looks_like_id = id.split('/').count() == 2 && !id.starts_with('.') && !id.starts_with('/');
    if !looks_like_id {
        return Err(Error::ModelNotFound(format!(
            "model directory `{spec}` does not exist (give a local directory or a hub id such \
             as {OFFICIAL_ID})"
        )));
    }
    let cache = cache_dir().ok_or_else(|| {
        Error::ModelNotFound("cannot locate the Hugging Face cache: set HF_HUB_CACHE or HF_HOME".into())
    })?;
    match find_snapshot(&cache, id, rev) {
        Some(dir) => Ok(dir),
        None => Err(Error::ModelNotFound(not_found_message(&cache, id))),
    }
}

/// `models--org--name/snapshots/<rev>` for the given revision, else `refs/main`, else the most
/// recently modified snapshot that holds a `config.json`.
fn find_snapshot(cache: &Path, id: &str, rev: Option<&str>) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    let wanted = rev.unwrap_or("main");
    let by_ref = std::fs::read_to_string(repo.join("refs").join(wanted))
        .ok()
        .map(|s| snapshots.join(s.trim()));
    let direct = Some(snapshots.join(wanted));
    for cand in [by_ref, direct].into_iter().flatten() {
        if cand.join("config.json").is_file() {
            return Some(cand);
        }
    }
    if rev.is_some() {
        return None;
    }
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(&snapshots).ok()?.flatten() {
        let p = entry.path();
        if !p.join("config.json").is_file() {
            continue;
        }
        let t = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, p));
        }
    }
    best.map(|(_, p)| p)
}

fn not_found_message(cache: &Path, id: &str) -> String {
    let offline_note = if offline() {
        " (HF_HUB_OFFLINE is set, so nothing is fetched)"
    } else {
        " (phi4mm never downloads by itself)"
    };
    format!(
        "model `{id}` is not in the Hugging Face cache at {}{offline_note}.\n\
         Download it with:\n    hf download {id}\n\
         (or `huggingface-cli download {id}`; `pip install -U huggingface_hub` provides both),\n\
         or pass a local directory that holds config.json, tokenizer.json and the \
         *.safetensors files.",
        cache.display()
    )
}

/// The files of a model directory, checked for presence.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub generation_config: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: PathBuf,
    pub weights: Vec<PathBuf>,
}

impl ModelFiles {
    /// Lists the files of `dir`, failing with a message that names the first missing one.
    pub fn locate(dir: &Path) -> Result<Self> {
        let need = |name: &str, what: &'static str, hint: &'static str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::MissingFile { what, path: p, hint })
            }
        };
        let config = need("config.json", "model config", "is this a model directory?")?;
        let tokenizer = need(
            "tokenizer.json",
            "tokenizer",
            "the hub repository ships tokenizer.json next to config.json",
        )?;
        let tokenizer_config = need(
            "tokenizer_config.json",
            "tokenizer config (chat template)",
            "the hub repository ships tokenizer_config.json next to config.json",
        )?;
        let weights = weight_files(dir)?;
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            config,
            generation_config: dir.join("generation_config.json"),
            tokenizer,
            tokenizer_config,
            weights,
        })
    }
}

/// The shard list from `model.safetensors.index.json`, else the single `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let idx: Index = crate::model::config::read_json(&index)?;
        let mut files: Vec<String> = idx.weight_map.into_values().collect();
        files.sort();
        files.dedup();
        if files.is_empty() {
            return Err(Error::BadJson {
                path: index,
                message: "weight_map is empty".into(),
            });
        }
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            if f.contains("..") || f.starts_with('/') {
                return Err(Error::BadJson {
                    path: index.clone(),
                    message: format!("shard name `{f}` escapes the model directory"),
                });
            }
            let p = dir.join(&f);
            if !p.is_file() {
                return Err(Error::MissingFile {
                    what: "weight shard",
                    path: p,
                    hint: "listed in model.safetensors.index.json; the download is incomplete",
                });
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::MissingFile {
        what: "weights",
        path: index,
        hint: "neither model.safetensors.index.json nor model.safetensors is present",
    })
}
