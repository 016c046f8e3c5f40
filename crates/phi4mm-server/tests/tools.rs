//! Tools and structured output through the router on the tiny checkpoint. The random-weight
//! model never calls a tool on its own, so calls are forced with `tool_choice` (a grammar),
//! which is also what shows the grammar at work: every answer parses and validates against
//! the schema, streamed deltas reassemble into the same calls, and the prompt the tools
//! render equals the model card's (the library's template with the tool list on the system turn).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use axum::http::StatusCode;
use phi4mm::{GenerateRequest, Message, PromptInput};
use phi4mm_server::{router, ServerConfig};
use serde_json::{json, Value};

mod common;
use common::{call, engine, post, sse_data, state};

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": 0, "maximum": 23}}, "required": ["zone"], "additionalProperties": false}}}
    ])
}

fn valid_args(name: &str, args: &Value) -> bool {
    let o = args.as_object().unwrap();
    match name {
        "get_weather" => o.len() == 2 && o["city"].as_str().is_some_and(|c| c.chars().count() <= 12) && ["c", "f"].contains(&o["unit"].as_str().unwrap_or("")),
        "get_time" => o.len() == 1 && o["zone"].as_i64().is_some_and(|z| (0..=23).contains(&z)),
        _ => false,
    }
}

fn tool_request(choice: Value, seed: u64) -> Value {
    json!({"messages": [{"role": "user", "content": "What's the weather in Paris?"}], "tools": weather_tools(), "tool_choice": choice,
           "parallel_tool_calls": false, "temperature": 1.0, "seed": seed, "max_tokens": 120})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tool_calls_parse_validate_and_stream_as_deltas() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig::default()));
    for (choice, seed) in [(json!("required"), 1), (json!("required"), 2), (json!({"type": "function", "function": {"name": "get_time"}}), 3)] {
        let (s, v) = post(&app, "/v1/chat/completions", tool_request(choice.clone(), seed)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1);
        let f = &calls[0]["function"];
        let name = f["name"].as_str().unwrap();
        if choice.is_object() {
            assert_eq!(name, "get_time");
        }
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(calls[0]["type"], "function");
        let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).expect("the arguments are JSON");
        assert!(valid_args(name, &args), "{name}({args}) fits its schema");
        // Streamed: the same call, id/type/name once, arguments in fragments.
        let mut req = tool_request(choice, seed);
        req["stream"] = json!(true);
        let (s, body, _) = call(&app, "POST", "/v1/chat/completions", Some(req), None).await;
        assert_eq!(s, StatusCode::OK);
        let data = sse_data(&body);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let (mut sname, mut sargs, mut ids) = (String::new(), String::new(), 0);
        let mut finish = Vec::new();
        for d in &data[..data.len() - 1] {
            let ch: Value = serde_json::from_str(d).unwrap();
            let c0 = &ch["choices"][0];
            if let Some(f) = c0["finish_reason"].as_str() {
                finish.push(f.to_string());
            }
            for tc in c0["delta"]["tool_calls"].as_array().into_iter().flatten() {
                assert_eq!(tc["index"], 0);
                ids += usize::from(tc.get("id").is_some());
                sname.push_str(tc["function"]["name"].as_str().unwrap_or(""));
                sargs.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
            }
            assert!(c0["delta"]["content"].as_str().unwrap_or("").is_empty() || !c0["delta"]["content"].as_str().unwrap().contains("<|tool_call|>"));
        }
        assert_eq!((ids, sname.as_str(), sargs.as_str()), (1, name, f["arguments"].as_str().unwrap()));
        assert_eq!(finish, vec!["tool_calls".to_string()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_and_json_object_answers_parse_and_validate() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig::default()));
    let schema = json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
                        "required": ["name", "ok", "color"], "additionalProperties": false});
    for seed in 0..3 {
        let req = json!({"messages": [{"role": "user", "content": "Describe a fruit as JSON."}], "temperature": 1.0, "seed": seed, "max_tokens": 80,
                         "response_format": {"type": "json_schema", "json_schema": {"name": "fruit", "schema": schema, "strict": true}}});
        let (s, v) = post(&app, "/v1/chat/completions", req).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let out: Value = serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).expect("the answer is JSON");
        let o = out.as_object().unwrap();
        assert_eq!(o.len(), 3, "{out}");
        assert!(o["name"].as_str().is_some_and(|n| n.chars().count() <= 10) && o["ok"].is_boolean() && ["red", "green"].contains(&o["color"].as_str().unwrap_or("")), "{out}");
    }
    // json_object with llama.cpp's `schema` inside, on the legacy endpoint too.
    let small = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"], "additionalProperties": false});
    let (s, v) = post(&app, "/v1/completions", json!({"prompt": "JSON:", "max_tokens": 40, "temperature": 0.7, "seed": 5, "response_format": {"type": "json_object", "schema": small}})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let out: Value = serde_json::from_str(v["choices"][0]["text"].as_str().unwrap()).expect("JSON");
    assert!(out["n"].as_i64().is_some_and(|n| (0..=9).contains(&n)), "{out}");
    // A schema that cannot compile is a 400 naming response_format; an unknown type too.
    let (s, v) =
        post(&app, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}}))
            .await;
    assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("response_format")), "{v}");
    let (s, _) = post(&app, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_render_into_the_system_turn_and_results_render_back() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig::default()));
    let messages = json!([
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    ]);
    let (s, v) = post(&app, "/v1/chat/completions", json!({"messages": messages, "tools": weather_tools(), "temperature": 0, "max_tokens": 6, "ignore_eos": true})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The same conversation written as the model card writes it, through the library.
    let list = r#"[{"name": "get_weather", "description": "Weather for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"], "additionalProperties": false}}, {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": 0, "maximum": 23}}, "required": ["zone"], "additionalProperties": false}}]"#;
    let mut system = Message::new("system", "You are helpful.");
    system.tools = Some(list.to_string());
    let lib_msgs = vec![
        system,
        Message::new("user", "Weather in Paris?"),
        Message::new("assistant", r#"<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]<|/tool_call|>"#),
        Message::new("tool", r#"{"temp": 21}"#),
    ];
    let prompt = engine.tokenizer().apply_chat_template(&lib_msgs, true).unwrap();
    assert!(prompt.contains("<|system|>You are helpful.<|tool|>[{\"name\": \"get_weather\"") && prompt.contains("<|tool|>{\"temp\": 21}<|end|><|assistant|>"), "{prompt}");
    let mut r = GenerateRequest::new(PromptInput::Chat(lib_msgs));
    r.max_new_tokens = 6;
    r.ignore_eos = true;
    let want = engine.generate(&r, |_| true).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], json!(want.prompt_tokens.len()));
    assert_eq!(v["choices"][0]["message"]["content"], json!(want.text), "unparseable (random) output is plain content");
    // Tools with no system turn: one with empty content carries them; `none` renders nothing.
    let (_, with) = post(&app, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Hi"}], "tools": weather_tools(), "max_tokens": 1})).await;
    let (_, none) = post(&app, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Hi"}], "tools": weather_tools(), "tool_choice": "none", "max_tokens": 1})).await;
    let mut sys = Message::new("system", "");
    sys.tools = Some(list.to_string());
    let p = engine.tokenizer().apply_chat_template(&[sys, Message::new("user", "Hi")], true).unwrap();
    assert_eq!(with["usage"]["prompt_tokens"], json!(engine.tokenizer().encode(&p).unwrap().len()));
    let p = engine.tokenizer().apply_chat_template(&[Message::new("user", "Hi")], true).unwrap();
    assert_eq!(none["usage"]["prompt_tokens"], json!(engine.tokenizer().encode(&p).unwrap().len()));
    // Bad tool requests are 400s naming the field.
    for (body, param) in [
        (json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}), "tool_choice"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": "f"}), "tools"),
        (json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}), "tool_choice"),
    ] {
        let mut b = body;
        b["messages"] = json!([{"role": "user", "content": "x"}]);
        let (s, v) = post(&app, "/v1/chat/completions", b).await;
        assert_eq!((s, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{v}");
    }
}
