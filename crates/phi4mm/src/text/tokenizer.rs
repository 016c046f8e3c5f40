//! The model's tokenizer (`tokenizer.json`, via the `tokenizers` crate) and its chat template
//! (`chat_template` of `tokenizer_config.json`, rendered with `minijinja` the way transformers
//! renders it with jinja2: `trim_blocks` and `lstrip_blocks` on).

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// One chat message as the template sees it (spec §6.2).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// Tool definitions (a JSON string), only on a system message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<String>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            tools: None,
        }
    }
}

/// Tokenizer plus chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: minijinja::Environment<'static>,
    eos_token: String,
    bos_token: String,
}

#[derive(serde::Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<serde_json::Value>,
    #[serde(default)]
    eos_token: Option<serde_json::Value>,
    #[serde(default)]
    bos_token: Option<serde_json::Value>,
}

/// `"<|x|>"` or `{"content": "<|x|>", …}`.
fn token_text(v: &Option<serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and the template from `tokenizer_config.json`.
    pub fn load(tokenizer_json: &Path, tokenizer_config: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| {
            Error::Tokenizer(format!("cannot load {}: {e}", tokenizer_json.display()))
        })?;
        let cfg: TokenizerConfig = crate::model::config::read_json(tokenizer_config)?;
        let source = match &cfg.chat_template {
            Some(serde_json::Value::String(s)) => s.clone(),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()))
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::Template(format!(
                        "{} has a list of chat templates but none named `default`",
                        tokenizer_config.display()
                    ))
                })?,
            _ => {
                return Err(Error::Template(format!(
                    "{} has no chat_template",
                    tokenizer_config.display()
                )))
            }
        };
        let template = build_env(source)?;
        Ok(Tokenizer {
            inner,
            template,
            eos_token: token_text(&cfg.eos_token),
            bos_token: token_text(&cfg.bos_token),
        })
    }

    /// Token ids of `text`, special tokens parsed (as `tokenizer(text)` in transformers).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` drops tokens flagged special.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Number of ids the tokenizer knows (base vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The exact bytes token `id` stands for (a piece of a UTF-8 character for some
    /// byte-level tokens; OpenAI's logprob `bytes`), or none for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.inner.id_to_token(id)?;
        let mut out = Vec::with_capacity(piece.len());
        for c in piece.chars() {
            match byte_of(c) {
                Some(b) => out.push(b),
                // Not the byte-level alphabet: an added token's literal text.
                None => return Some(piece.into_bytes()),
            }
        }
        Some(out)
    }

    /// The underlying `tokenizers` tokenizer.
    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders the chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self
            .template
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            eos_token => &self.eos_token,
            bos_token => &self.bos_token,
        })
        .map_err(|e| Error::Template(e.to_string()))
    }
}

fn build_env(source: String) -> Result<minijinja::Environment<'static>> {
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::Template(e.to_string()))?;
    env.set_syntax(syntax);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template_owned("chat", source)
        .map_err(|e| Error::Template(e.to_string()))?;
    Ok(env)
}

/// Serialises JSON the way Python's `json.dumps` does by default (`", "` and `": "`
/// separators, non-ASCII escaped as `\uXXXX`), which is how the model card passes tools.
pub fn python_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_py(v, &mut out);
    out
}

fn write_py(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_py_str(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py(x, out);
            }
            out.push(']');
        }
        Value::Object(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_str(k, out);
                out.push_str(": ");
                write_py(x, out);
            }
            out.push('}');
        }
    }
}

fn write_py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The byte a character of the byte-level BPE alphabet stands for (GPT-2's `bytes_to_unicode`:
/// printable bytes are their own character, the other 68 are U+0100… in byte order).
/// Written out because the tokenizers crate keeps its table private.
fn byte_of(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let v = c as u32;
    if printable(v) {
        return u8::try_from(v).ok();
    }
    let n = v.checked_sub(256)?;
    (0u32..256).filter(|&b| !printable(b)).nth(n as usize).and_then(|b| u8::try_from(b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_matches_json_dumps() -> serde_json::Result<()> {
        let v: serde_json::Value = serde_json::from_str(r#"[{"name":"f","d":"é\n\"","n":[1,2.5,true,null]}]"#)?;
        assert_eq!(
            python_json(&v),
            r#"[{"name": "f", "d": "\u00e9\n\"", "n": [1, 2.5, true, null]}]"#
        );
        let emoji = serde_json::Value::String("😀".into());
        assert_eq!(python_json(&emoji), r#""\ud83d\ude00""#);
        Ok(())
    }
}
