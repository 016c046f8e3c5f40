//! Structured output: which grammar, if any, constrains a request's answer. `response_format`
//! `json_object` (any JSON object; llama.cpp's `schema` inside it is honoured) and
//! `json_schema` (the given schema, `strict` or not: the output is always held to it), and
//! `tool_choice` `required` / a named function (one `<|tool_call|>` block valid for the tools'
//! schemas). Each choice of a request gets its own mask, built by the library's grammar engine.

use std::sync::{Arc, OnceLock};

use phi4mm::text::grammar::Grammars;
use phi4mm::text::sampler::MaskHook;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::tools::{compact_json, Tools};
use crate::Ready;

/// A grammar for one request.
#[derive(Debug, Clone)]
pub enum Constraint {
    Schema(Value),
    Lark(String),
}

/// The request's constraint from `response_format` and the tools.
pub fn constraint(response_format: Option<&Value>, tools: Option<&Tools>) -> ApiResult<Option<Constraint>> {
    let from_tools = tools.and_then(Tools::grammar).map(Constraint::Lark);
    let from_format = match response_format {
        None | Some(Value::Null) => None,
        Some(f) => format_schema(f)?.map(Constraint::Schema),
    };
    match (from_tools, from_format) {
        (Some(_), Some(_)) => Err(ApiError::bad_param("response_format", "`response_format` cannot be combined with a forced `tool_choice`")),
        (t, f) => Ok(t.or(f)),
    }
}

/// The JSON schema a `response_format` asks for (`None` for `text`).
fn format_schema(f: &Value) -> ApiResult<Option<Value>> {
    let kind = f.get("type").and_then(Value::as_str).ok_or_else(|| ApiError::bad_param("response_format.type", "`response_format` needs a `type`: text, json_object or json_schema"))?;
    let schema = match kind {
        "text" => return Ok(None),
        "json_object" => f.get("schema").cloned().unwrap_or_else(|| json!({"type": "object"})),
        "json_schema" => {
            let js = f.get("json_schema").ok_or_else(|| ApiError::bad_param("response_format.json_schema", "`json_schema` is required when `type` is `json_schema`"))?;
            match js.get("schema") {
                Some(s) if s.is_object() || s.is_boolean() => s.clone(),
                Some(_) => return Err(ApiError::bad_param("response_format.json_schema.schema", "`schema` must be a JSON Schema object")),
                None => json!({}),
            }
        }
        other => return Err(ApiError::bad_param("response_format.type", format!("`response_format.type` is text, json_object or json_schema, got `{other}`"))),
    };
    let mut schema = match schema {
        Value::Bool(true) => json!({}),
        s => s,
    };
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(compact_json);
    }
    Ok(Some(schema))
}

/// The model's grammar engine, built on first use (the vocabulary trie takes a moment).
#[derive(Default)]
pub struct Engines(OnceLock<Result<Arc<Grammars>, String>>);

impl Engines {
    /// The engine if a request has built it.
    pub fn built(&self) -> Option<&Grammars> {
        self.0.get().and_then(|r| r.as_ref().ok()).map(|g| &**g)
    }

    pub fn get(&self, ready: &Ready) -> ApiResult<Arc<Grammars>> {
        let built = self.0.get_or_init(|| {
            let e = &ready.engine;
            let end: Vec<u32> = ["<|end|>", "<|endoftext|>"].iter().filter_map(|t| e.tokenizer().token_id(t)).collect();
            Grammars::new(e.tokenizer(), e.config().vocab_size, &end).map(Arc::new).map_err(|e| e.to_string())
        });
        built.clone().map_err(|e| ApiError::internal(format!("the grammar engine could not start: {e}")))
    }
}

/// A fresh mask for `c` (each choice needs its own; a grammar that does not compile is a 400).
pub fn mask(grammars: &Grammars, c: &Constraint) -> ApiResult<MaskHook> {
    let (r, param) = match c {
        Constraint::Schema(s) => (grammars.json_schema(s.clone()), "response_format"),
        Constraint::Lark(g) => (grammars.lark(g), "tools"),
    };
    r.map_err(|e| ApiError::bad_param(param, format!("the schema cannot be used for constrained output: {e}")))
}
