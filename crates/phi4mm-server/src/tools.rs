//! Tool calling in Phi-4's own format. OpenAI function definitions go into the system turn as
//! the model card's JSON dump (`<|tool|>[{"name", "description", "parameters"}]<|/tool|>`);
//! the model answers `<|tool_call|>[{"name": …, "arguments": {…}}]<|/tool_call|>`, which is
//! parsed back into OpenAI `tool_calls`. Assistant turns that carried tool calls are written back
//! in that form, and `role: tool` results render as the template's `<|tool|>…<|end|>` turn.
//! Output that does not parse as calls stays text: never an error.

use phi4mm::text::tokenizer::python_json;
use phi4mm::Message;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{ApiError, ApiResult};

pub const CALL_OPEN: &str = "<|tool_call|>";
pub const CALL_CLOSE: &str = "<|/tool_call|>";

/// One OpenAI tool definition (`{type: "function", function: {…}}`).
#[derive(Debug, Clone, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: Function,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
}

/// An assistant message's earlier call, as clients send it back.
#[derive(Debug, Clone, Deserialize)]
pub struct PastCall {
    pub function: PastFunction,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PastFunction {
    pub name: String,
    /// A JSON string (OpenAI's form); anything else is taken as it is.
    pub arguments: Value,
}

/// What `tool_choice` asks.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's tools, checked.
#[derive(Debug, Clone)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: Choice,
    /// More than one call per answer (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

impl Tools {
    /// The request's `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tools
    /// are given or the choice is `none` (then nothing is rendered or parsed).
    pub fn from_request(tools: Option<&Value>, choice: Option<&Value>, parallel: Option<bool>) -> ApiResult<Option<Tools>> {
        let list: Vec<Tool> = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => {
                serde_json::from_value(v.clone()).map_err(|e| ApiError::bad_param("tools", format!("`tools` must be a list of `{{\"type\": \"function\", \"function\": {{\"name\": …}}}}`: {e}")))?
            }
        };
        if let Some((i, t)) = list.iter().enumerate().find(|(_, t)| t.kind != "function") {
            return Err(ApiError::bad_param(format!("tools[{i}].type"), format!("only `function` tools are supported, got `{}`", t.kind)));
        }
        let choice = match choice {
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => return Err(ApiError::bad_param("tool_choice", format!("`tool_choice` is none, auto, required or a function, got `{other}`"))),
            },
            Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(name) => Choice::Named(name.to_string()),
                None => return Err(ApiError::bad_param("tool_choice", "a `tool_choice` object names a function: `{\"type\": \"function\", \"function\": {\"name\": …}}`")),
            },
        };
        if list.is_empty() {
            return match choice {
                Choice::None | Choice::Auto => Ok(None),
                _ => Err(ApiError::bad_param("tool_choice", "`tool_choice` needs `tools`")),
            };
        }
        if let Choice::Named(n) = &choice {
            if !list.iter().any(|t| &t.function.name == n) {
                return Err(ApiError::bad_param("tool_choice", format!("`tool_choice` names `{n}`, which is not in `tools`")));
            }
        }
        if choice == Choice::None {
            return Ok(None);
        }
        Ok(Some(Tools { tools: list, choice, parallel: parallel.unwrap_or(true) }))
    }

    /// The model card's tool list: `[{"name", "description", "parameters"}]`, dumped as Python's json.dumps.
    pub fn render(&self) -> String {
        let list: Vec<Value> = self
            .tools
            .iter()
            .map(|t| {
                let mut o = Map::new();
                o.insert("name".into(), json!(t.function.name));
                if let Some(d) = &t.function.description {
                    o.insert("description".into(), json!(d));
                }
                o.insert("parameters".into(), t.function.parameters.clone().unwrap_or_else(|| json!({})));
                Value::Object(o)
            })
            .collect();
        python_json(&Value::Array(list))
    }

    /// Puts the tool list on the first system message (one with empty content is added first
    /// when the conversation has none).
    pub fn attach(&self, messages: &mut Vec<Message>) {
        let rendered = self.render();
        match messages.iter_mut().find(|m| m.role == "system") {
            Some(m) => m.tools = Some(rendered),
            None => {
                let mut m = Message::new("system", "");
                m.tools = Some(rendered);
                messages.insert(0, m);
            }
        }
    }

    /// The Lark grammar that forces a call (`required` or a named function): one
    /// `<|tool_call|>` block whose JSON list holds calls valid for the tools' schemas.
    pub fn grammar(&self) -> Option<String> {
        let tools: Vec<&Tool> = match &self.choice {
            Choice::Required => self.tools.iter().collect(),
            Choice::Named(n) => self.tools.iter().filter(|t| &t.function.name == n).collect(),
            Choice::None | Choice::Auto => return None,
        };
        let calls: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": t.function.name},
                        "arguments": t.function.parameters.clone().unwrap_or_else(|| json!({"type": "object"})),
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut list = json!({"type": "array", "items": {"anyOf": calls}, "minItems": 1});
        if !self.parallel || matches!(self.choice, Choice::Named(_)) {
            list["maxItems"] = json!(1);
        }
        list["x-guidance"] = compact_json();
        Some(format!("start: {CALL_OPEN} %json {list} {CALL_CLOSE}\n"))
    }
}

/// JSON written the way Python's json.dumps writes it, with no free whitespace (a model that
/// may add whitespace without end can run to `max_tokens` inside a constrained answer).
pub fn compact_json() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// An assistant turn's text with its earlier calls written back in the model's format.
pub fn with_past_calls(text: &str, calls: &[PastCall]) -> String {
    if calls.is_empty() {
        return text.to_string();
    }
    let list: Vec<Value> = calls
        .iter()
        .map(|c| {
            let args = match &c.function.arguments {
                Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
                v => v.clone(),
            };
            json!({"name": c.function.name, "arguments": args})
        })
        .collect();
    format!("{text}{CALL_OPEN}{}{CALL_CLOSE}", python_json(&Value::Array(list)))
}

/// A call parsed from the model's output.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as a JSON string.
    pub arguments: String,
}

/// The text before the first `<|tool_call|>` and every call in the answer's blocks; `None`
/// when there is no block or any block does not parse (the answer is then plain text).
pub fn parse_calls(text: &str) -> Option<(String, Vec<ParsedCall>)> {
    let start = text.find(CALL_OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[start..];
    while let Some(open) = rest.find(CALL_OPEN) {
        let body = &rest[open + CALL_OPEN.len()..];
        let (inner, after) = match body.find(CALL_CLOSE) {
            Some(close) => (&body[..close], &body[close + CALL_CLOSE.len()..]),
            None => (body, ""),
        };
        calls.extend(parse_block(inner.trim())?);
        rest = after;
    }
    if calls.is_empty() {
        return None;
    }
    Some((text[..start].to_string(), calls))
}

/// One block: a JSON list of calls or a single call.
fn parse_block(s: &str) -> Option<Vec<ParsedCall>> {
    let v: Value = serde_json::from_str(s).ok()?;
    let items = match v {
        Value::Array(a) => a,
        o @ Value::Object(_) => vec![o],
        _ => return None,
    };
    items.iter().map(parse_one).collect()
}

/// `{name, arguments|parameters}`, or OpenAI's own `{type, function: {name, arguments}}`.
fn parse_one(v: &Value) -> Option<ParsedCall> {
    let o = v.get("function").filter(|f| f.is_object()).unwrap_or(v);
    let name = o.get("name")?.as_str()?.to_string();
    let args = o.get("arguments").or_else(|| o.get("parameters")).cloned().unwrap_or_else(|| json!({}));
    let arguments = match args {
        Value::String(s) => s,
        v => v.to_string(),
    };
    Some(ParsedCall { name, arguments })
}

/// OpenAI's `tool_calls` entries for `calls`, with fresh ids.
pub fn openai_calls(calls: &[ParsedCall]) -> Vec<Value> {
    calls.iter().map(|c| json!({"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}})).collect()
}

pub fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_objects_and_openai_shapes() {
        let t = r#"Sure.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "t", "parameters": {}}]<|/tool_call|>"#;
        let (pre, calls) = parse_calls(t).unwrap();
        assert_eq!(pre, "Sure.");
        assert_eq!(calls, vec![ParsedCall { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() }, ParsedCall { name: "t".into(), arguments: "{}".into() },]);
        let o = r#"<|tool_call|>{"type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}<|/tool_call|>"#;
        assert_eq!(parse_calls(o).unwrap().1[0].arguments, r#"{"a": 1}"#);
        // No closing tag (cut by max_tokens after a whole list) still parses.
        assert_eq!(parse_calls(r#"<|tool_call|>[{"name": "f", "arguments": {}}]"#).unwrap().1.len(), 1);
    }

    #[test]
    fn unparseable_output_stays_text() {
        assert!(parse_calls("no calls here").is_none());
        assert!(parse_calls("<|tool_call|>[{\"name\": \"f\", \"argu").is_none());
        assert!(parse_calls("<|tool_call|>[{\"arguments\": {}}]<|/tool_call|>").is_none());
        assert!(parse_calls("<|tool_call|>[]<|/tool_call|>").is_none());
    }

    #[test]
    fn choices_are_checked() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        assert!(Tools::from_request(Some(&tools), Some(&json!("none")), None).unwrap().is_none());
        let t = Tools::from_request(Some(&tools), Some(&json!({"type": "function", "function": {"name": "f"}})), None).unwrap().unwrap();
        assert_eq!(t.choice, Choice::Named("f".into()));
        assert!(t.grammar().unwrap().contains("\"maxItems\":1"));
        assert!(Tools::from_request(Some(&tools), Some(&json!({"type": "function", "function": {"name": "g"}})), None).is_err());
        assert!(Tools::from_request(None, Some(&json!("required")), None).is_err());
        assert!(Tools::from_request(Some(&json!([{"type": "retrieval"}])), None, None).is_err());
        assert_eq!(Tools::from_request(Some(&tools), None, None).unwrap().unwrap().render(), r#"[{"name": "f", "parameters": {"type": "object"}}]"#);
    }

    #[test]
    fn past_calls_are_written_back() {
        let calls = vec![PastCall { function: PastFunction { name: "f".into(), arguments: json!("{\"a\": 1}") } }];
        assert_eq!(with_past_calls("", &calls), r#"<|tool_call|>[{"name": "f", "arguments": {"a": 1}}]<|/tool_call|>"#);
    }
}
