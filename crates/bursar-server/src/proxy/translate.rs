//! OpenAI ↔ Anthropic translation, so a client keeps its SDK whatever provider a model
//! is routed to: `/v1/chat/completions` can reach Claude, and `/v1/messages` can reach
//! OpenAI's models (and any OpenAI-compatible provider).
//!
//! Four parts, each in both directions: the request ([`request`]), the whole answer
//! ([`answer`]), a provider's error ([`error_body`]), and a stream, event by event
//! ([`StreamTranslator`]).
//!
//! What cannot be said in the other dialect is refused before any money is held, with
//! 400 `unsupported_parameter` naming the field (`logprobs`, structured output,
//! `top_k`, Anthropic's extended thinking, server tools, documents, audio…). A few
//! OpenAI sampling knobs that Anthropic lacks (penalties, `seed`, `logit_bias`) and
//! fields about the provider account (`service_tier`, `store`, `metadata`) are dropped.
//!
//! Usage is always read from the provider's own answer, before translation: what is
//! settled is what the provider bills, whatever the client is shown.

use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use super::wire::Dialect;
use crate::error::ApiError;

fn unsupported(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "unsupported_parameter", message)
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
}

/// The text of a content that must be text only (a string, or text parts).
fn plain_text(v: &Value, what: &str) -> Result<String, ApiError> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => {
                        if !out.is_empty() {
                            out.push('\n');
                        }
                        out.push_str(t);
                    }
                    (t, _) => {
                        return Err(unsupported(format!(
                            "{what} can only hold text when translated (found a `{}` part)",
                            t.unwrap_or("?")
                        )))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(invalid(format!(
            "{what} must be a string or an array of parts"
        ))),
    }
}

/// Translates a request body from the client's dialect to the provider's. The output
/// cap is left out (the caller sets the shaped one) and so is `stream_options`.
pub fn request(
    from: Dialect,
    to: Dialect,
    body: &Map<String, Value>,
) -> Result<Map<String, Value>, ApiError> {
    match (from, to) {
        (Dialect::OpenAi, Dialect::Anthropic) => openai_to_anthropic(body),
        (Dialect::Anthropic, Dialect::OpenAi) => anthropic_to_openai(body),
        _ => Ok(body.clone()),
    }
}

/// OpenAI fields Anthropic has no counterpart for, dropped without changing the answer's
/// shape.
const DROPPED_FOR_ANTHROPIC: &[&str] = &[
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "logit_bias",
    "service_tier",
    "store",
    "metadata",
    "n",
    "prompt_cache_key",
    "safety_identifier",
];

fn openai_to_anthropic(body: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let mut parallel_tools = true;
    let mut tool_choice: Option<Value> = None;
    for (k, v) in body {
        match k.as_str() {
            "model" | "stream" => {
                out.insert(k.clone(), v.clone());
            }
            "max_tokens" | "max_completion_tokens" | "stream_options" => {}
            "messages" => {
                for (i, m) in v.as_array().into_iter().flatten().enumerate() {
                    let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
                    let content = m.get("content").unwrap_or(&Value::Null);
                    let at = format!("messages[{i}]");
                    match role {
                        "system" | "developer" => system.push(plain_text(content, &at)?),
                        "user" => push_turn(&mut messages, "user", content_blocks(content, &at)?),
                        "assistant" => {
                            let mut blocks = content_blocks(content, &at)?;
                            for call in m
                                .get("tool_calls")
                                .and_then(Value::as_array)
                                .into_iter()
                                .flatten()
                            {
                                blocks.push(tool_use_of_call(call, &at)?);
                            }
                            push_turn(&mut messages, "assistant", blocks);
                        }
                        "tool" => {
                            let Some(id) = m.get("tool_call_id").and_then(Value::as_str) else {
                                return Err(invalid(format!(
                                    "{at}: a tool message needs `tool_call_id`"
                                )));
                            };
                            let text = plain_text(content, &at)?;
                            push_turn(
                                &mut messages,
                                "user",
                                vec![
                                    json!({"type": "tool_result", "tool_use_id": id, "content": text}),
                                ],
                            );
                        }
                        other => {
                            return Err(unsupported(format!(
                                "{at}: role `{other}` cannot be sent to an Anthropic model"
                            )))
                        }
                    }
                }
            }
            "temperature" => {
                if v.as_f64().is_some_and(|t| !(0.0..=1.0).contains(&t)) {
                    return Err(unsupported(
                        "`temperature` must be between 0 and 1 for an Anthropic model",
                    ));
                }
                out.insert(k.clone(), v.clone());
            }
            "top_p" => {
                out.insert(k.clone(), v.clone());
            }
            "stop" => match v {
                Value::Null => {}
                Value::String(s) => {
                    out.insert("stop_sequences".into(), json!([s]));
                }
                Value::Array(_) => {
                    out.insert("stop_sequences".into(), v.clone());
                }
                _ => return Err(invalid("`stop` must be a string or an array of strings")),
            },
            "user" => {
                out.insert("metadata".into(), json!({"user_id": v}));
            }
            "tools" => {
                let mut tools = Vec::new();
                for t in v.as_array().into_iter().flatten() {
                    let f = match (t.get("type").and_then(Value::as_str), t.get("function")) {
                        (Some("function"), Some(f)) => f,
                        _ => {
                            return Err(unsupported(
                                "only `function` tools can be sent to an Anthropic model",
                            ))
                        }
                    };
                    let mut tool = Map::new();
                    tool.insert("name".into(), f.get("name").cloned().unwrap_or(Value::Null));
                    if let Some(d) = f.get("description") {
                        tool.insert("description".into(), d.clone());
                    }
                    tool.insert(
                        "input_schema".into(),
                        f.get("parameters")
                            .cloned()
                            .unwrap_or_else(|| json!({"type": "object"})),
                    );
                    tools.push(Value::Object(tool));
                }
                out.insert("tools".into(), Value::Array(tools));
            }
            "tool_choice" => {
                tool_choice = match v {
                    Value::Null => None,
                    Value::String(s) => match s.as_str() {
                        "auto" => Some(json!({"type": "auto"})),
                        "required" => Some(json!({"type": "any"})),
                        "none" => Some(json!({"type": "none"})),
                        other => {
                            return Err(invalid(format!("`tool_choice` `{other}` is not known")))
                        }
                    },
                    Value::Object(o) => match o.get("function").and_then(|f| f.get("name")) {
                        Some(name) => Some(json!({"type": "tool", "name": name})),
                        None => return Err(unsupported("`tool_choice` must name a function")),
                    },
                    _ => return Err(invalid("`tool_choice` must be a string or an object")),
                };
            }
            "parallel_tool_calls" => parallel_tools = v.as_bool() != Some(false),
            "logprobs" | "top_logprobs" if v.is_null() || v == &Value::Bool(false) => {}
            "response_format" if v.get("type").and_then(Value::as_str) == Some("text") => {}
            k if DROPPED_FOR_ANTHROPIC.contains(&k) => {}
            other => {
                return Err(unsupported(format!(
                    "`{other}` cannot be sent to an Anthropic model"
                )))
            }
        }
    }
    if !parallel_tools {
        let mut choice = tool_choice.unwrap_or_else(|| json!({"type": "auto"}));
        if let Some(o) = choice.as_object_mut() {
            o.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
        tool_choice = Some(choice);
    }
    if let Some(c) = tool_choice {
        out.insert("tool_choice".into(), c);
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::String(system.join("\n\n")));
    }
    if messages.is_empty() {
        return Err(invalid(
            "an Anthropic model needs at least one user or assistant message",
        ));
    }
    out.insert("messages".into(), Value::Array(messages));
    Ok(out)
}

/// Appends content blocks as a turn, merged into the last turn when it has the same
/// role (Anthropic alternates user and assistant; tool results are user turns).
fn push_turn(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut() {
        if last.get("role").and_then(Value::as_str) == Some(role) {
            if let Some(Value::Array(c)) = last.get_mut("content") {
                c.extend(blocks);
                return;
            }
        }
    }
    messages.push(json!({"role": role, "content": blocks}));
}

/// An OpenAI content (string or parts) as Anthropic content blocks.
fn content_blocks(content: &Value, at: &str) -> Result<Vec<Value>, ApiError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let t = p.get("text").and_then(Value::as_str).unwrap_or_default();
                        if !t.is_empty() {
                            blocks.push(json!({"type": "text", "text": t}));
                        }
                    }
                    Some("refusal") => {
                        let t = p.get("refusal").and_then(Value::as_str).unwrap_or_default();
                        blocks.push(json!({"type": "text", "text": t}));
                    }
                    Some("image_url") => {
                        let url = p
                            .get("image_url")
                            .and_then(|i| i.get("url").or(Some(i)))
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        blocks.push(image_block(url, at)?);
                    }
                    other => {
                        return Err(unsupported(format!(
                            "{at}: a `{}` part cannot be sent to an Anthropic model",
                            other.unwrap_or("?")
                        )))
                    }
                }
            }
            Ok(blocks)
        }
        _ => Err(invalid(format!(
            "{at}: `content` must be a string or an array of parts"
        ))),
    }
}

/// An image URL (a `data:` URL or an http(s) one) as an Anthropic image block.
fn image_block(url: &str, at: &str) -> Result<Value, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((media, data)) = rest.split_once(";base64,") else {
            return Err(invalid(format!(
                "{at}: an image `data:` URL must be base64"
            )));
        };
        return Ok(
            json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}),
        );
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(invalid(format!(
        "{at}: an image needs a `data:` or http(s) URL"
    )))
}

/// An OpenAI tool call as an Anthropic `tool_use` block (its arguments must be a JSON
/// object, as Anthropic takes them parsed).
fn tool_use_of_call(call: &Value, at: &str) -> Result<Value, ApiError> {
    let f = call.get("function").unwrap_or(&Value::Null);
    let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
    let input: Value = if args.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(args)
            .map_err(|_| invalid(format!("{at}: tool call arguments must be a JSON object")))?
    };
    if !input.is_object() {
        return Err(invalid(format!(
            "{at}: tool call arguments must be a JSON object"
        )));
    }
    Ok(
        json!({"type": "tool_use", "id": call.get("id").cloned().unwrap_or(Value::Null),
              "name": f.get("name").cloned().unwrap_or(Value::Null), "input": input}),
    )
}

fn anthropic_to_openai(body: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    let mut messages: Vec<Value> = Vec::new();
    if let Some(system) = body.get("system") {
        let text = plain_text(system, "`system`")?;
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    for (k, v) in body {
        match k.as_str() {
            "model" | "stream" | "temperature" | "top_p" => {
                out.insert(k.clone(), v.clone());
            }
            "system" | "max_tokens" | "service_tier" => {}
            "messages" => {
                for (i, m) in v.as_array().into_iter().flatten().enumerate() {
                    let at = format!("messages[{i}]");
                    let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
                    let content = m.get("content").unwrap_or(&Value::Null);
                    match role {
                        "user" => user_turn_to_openai(content, &at, &mut messages)?,
                        "assistant" => messages.push(assistant_turn_to_openai(content, &at)?),
                        other => return Err(invalid(format!("{at}: role `{other}` is not known"))),
                    }
                }
            }
            "stop_sequences" => {
                out.insert("stop".into(), v.clone());
            }
            "metadata" => {
                if let Some(u) = v.get("user_id").filter(|u| !u.is_null()) {
                    out.insert("user".into(), u.clone());
                }
            }
            "tools" => {
                let mut tools = Vec::new();
                for t in v.as_array().into_iter().flatten() {
                    if t.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|ty| ty != "custom")
                    {
                        return Err(unsupported(format!(
                            "the server tool `{}` cannot be sent to an OpenAI model",
                            t.get("name").and_then(Value::as_str).unwrap_or("?")
                        )));
                    }
                    let mut f = Map::new();
                    f.insert("name".into(), t.get("name").cloned().unwrap_or(Value::Null));
                    if let Some(d) = t.get("description") {
                        f.insert("description".into(), d.clone());
                    }
                    f.insert(
                        "parameters".into(),
                        t.get("input_schema")
                            .cloned()
                            .unwrap_or_else(|| json!({"type": "object"})),
                    );
                    tools.push(json!({"type": "function", "function": f}));
                }
                out.insert("tools".into(), Value::Array(tools));
            }
            "tool_choice" => {
                let choice = match v.get("type").and_then(Value::as_str) {
                    Some("auto") => json!("auto"),
                    Some("any") => json!("required"),
                    Some("none") => json!("none"),
                    Some("tool") => json!({"type": "function",
                        "function": {"name": v.get("name").cloned().unwrap_or(Value::Null)}}),
                    _ => return Err(invalid("`tool_choice` needs a known `type`")),
                };
                out.insert("tool_choice".into(), choice);
                if v.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
                    out.insert("parallel_tool_calls".into(), Value::Bool(false));
                }
            }
            "thinking" if v.get("type").and_then(Value::as_str) == Some("disabled") => {}
            other => {
                return Err(unsupported(format!(
                    "`{other}` cannot be sent to an OpenAI model"
                )))
            }
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    Ok(out)
}

/// An Anthropic user turn: its tool results become `tool` messages (first, as OpenAI
/// wants them right after the assistant's calls), the rest one user message.
fn user_turn_to_openai(
    content: &Value,
    at: &str,
    messages: &mut Vec<Value>,
) -> Result<(), ApiError> {
    let blocks = match content {
        Value::String(s) => {
            messages.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Value::Array(b) => b,
        _ => {
            return Err(invalid(format!(
                "{at}: `content` must be a string or an array of blocks"
            )))
        }
    };
    let mut parts = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => parts.push(
                json!({"type": "text", "text": b.get("text").cloned().unwrap_or(Value::Null)}),
            ),
            Some("image") => {
                let src = b.get("source").unwrap_or(&Value::Null);
                let url = match src.get("type").and_then(Value::as_str) {
                    Some("base64") => format!(
                        "data:{};base64,{}",
                        src.get("media_type")
                            .and_then(Value::as_str)
                            .unwrap_or("image/png"),
                        src.get("data").and_then(Value::as_str).unwrap_or_default()
                    ),
                    Some("url") => src
                        .get("url")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    _ => {
                        return Err(unsupported(format!(
                            "{at}: this image source cannot be sent to an OpenAI model"
                        )))
                    }
                };
                parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            Some("tool_result") => {
                let text = plain_text(b.get("content").unwrap_or(&Value::Null), at)?;
                messages.push(json!({"role": "tool",
                    "tool_call_id": b.get("tool_use_id").cloned().unwrap_or(Value::Null), "content": text}));
            }
            other => {
                return Err(unsupported(format!(
                    "{at}: a `{}` block cannot be sent to an OpenAI model",
                    other.unwrap_or("?")
                )))
            }
        }
    }
    if !parts.is_empty() {
        messages.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn assistant_turn_to_openai(content: &Value, at: &str) -> Result<Value, ApiError> {
    let blocks = match content {
        Value::String(s) => return Ok(json!({"role": "assistant", "content": s})),
        Value::Array(b) => b,
        _ => {
            return Err(invalid(format!(
                "{at}: `content` must be a string or an array of blocks"
            )))
        }
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default()),
            Some("tool_use") => calls.push(json!({
                "id": b.get("id").cloned().unwrap_or(Value::Null), "type": "function",
                "function": {"name": b.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": b.get("input").map_or_else(|| "{}".to_string(), Value::to_string)}})),
            // Earlier thinking is the provider's own; another provider cannot read it.
            Some("thinking" | "redacted_thinking") => {}
            other => {
                return Err(unsupported(format!(
                    "{at}: a `{}` block cannot be sent to an OpenAI model",
                    other.unwrap_or("?")
                )))
            }
        }
    }
    let mut m = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    Ok(m)
}

fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

fn openai_finish(anthropic_stop: Option<&str>) -> &'static str {
    match anthropic_stop {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

fn anthropic_stop(openai_finish: Option<&str>) -> &'static str {
    match openai_finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

fn u64_of(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_u64).unwrap_or(0)
}

/// OpenAI's usage object from Anthropic's (cache reads and writes are prompt tokens).
fn openai_usage_of(u: &Value) -> Value {
    let read = u64_of(u.get("cache_read_input_tokens"));
    let prompt =
        u64_of(u.get("input_tokens")) + read + u64_of(u.get("cache_creation_input_tokens"));
    let completion = u64_of(u.get("output_tokens"));
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": read}})
}

/// Anthropic's usage object from OpenAI's (cached prompt tokens are reads).
fn anthropic_usage_of(u: &Value) -> Value {
    let cached = u64_of(
        u.get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens")),
    );
    let prompt = u64_of(u.get("prompt_tokens"));
    json!({"input_tokens": prompt.saturating_sub(cached), "cache_read_input_tokens": cached,
           "cache_creation_input_tokens": 0, "output_tokens": u64_of(u.get("completion_tokens"))})
}

/// Translates a whole (non-streamed) answer from the provider's dialect to the client's.
pub fn answer(from: Dialect, to: Dialect, v: &Value) -> Value {
    match (from, to) {
        (Dialect::Anthropic, Dialect::OpenAi) => {
            let mut text = String::new();
            let mut calls = Vec::new();
            for b in v
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default()),
                    Some("tool_use") => calls.push(json!({
                        "id": b.get("id").cloned().unwrap_or(Value::Null), "type": "function",
                        "function": {"name": b.get("name").cloned().unwrap_or(Value::Null),
                            "arguments": b.get("input").map_or_else(|| "{}".to_string(), Value::to_string)}})),
                    _ => {}
                }
            }
            let mut message = json!({"role": "assistant",
                "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) },
                "refusal": null});
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls);
            }
            let id = v.get("id").and_then(Value::as_str).unwrap_or_default();
            json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": now_s(),
                   "model": v.get("model").cloned().unwrap_or(Value::Null),
                   "choices": [{"index": 0, "message": message, "logprobs": null,
                       "finish_reason": openai_finish(v.get("stop_reason").and_then(Value::as_str))}],
                   "usage": v.get("usage").map_or(Value::Null, openai_usage_of)})
        }
        (Dialect::OpenAi, Dialect::Anthropic) => {
            let choice = v
                .get("choices")
                .and_then(|c| c.get(0))
                .unwrap_or(&Value::Null);
            let m = choice.get("message").unwrap_or(&Value::Null);
            let mut content = Vec::new();
            for key in ["content", "refusal"] {
                if let Some(t) = m.get(key).and_then(Value::as_str).filter(|t| !t.is_empty()) {
                    content.push(json!({"type": "text", "text": t}));
                }
            }
            for call in m
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let f = call.get("function").unwrap_or(&Value::Null);
                content.push(json!({"type": "tool_use", "id": call.get("id").cloned().unwrap_or(Value::Null),
                    "name": f.get("name").cloned().unwrap_or(Value::Null),
                    "input": tool_input(f.get("arguments").and_then(Value::as_str).unwrap_or("{}"))}));
            }
            let id = v.get("id").and_then(Value::as_str).unwrap_or_default();
            json!({"id": format!("msg_{id}"), "type": "message", "role": "assistant",
                   "model": v.get("model").cloned().unwrap_or(Value::Null), "content": content,
                   "stop_reason": anthropic_stop(choice.get("finish_reason").and_then(Value::as_str)),
                   "stop_sequence": null,
                   "usage": v.get("usage").map_or_else(|| anthropic_usage_of(&Value::Null), anthropic_usage_of)})
        }
        _ => v.clone(),
    }
}

/// OpenAI's tool arguments (a JSON text) as Anthropic's `input` (an object). Arguments
/// that are not an object (a cut answer) are kept whole under `arguments`.
fn tool_input(args: &str) -> Value {
    match serde_json::from_str::<Value>(args) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({"arguments": args}),
    }
}

/// A provider's error answer in the client's dialect (the message is kept).
pub fn error_body(from: Dialect, to: Dialect, status: StatusCode, raw: &[u8]) -> Bytes {
    if from == to {
        return Bytes::copy_from_slice(raw);
    }
    let parsed: Value = serde_json::from_slice(raw).unwrap_or(Value::Null);
    let message = parsed
        .get("error")
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map_or_else(|| String::from_utf8_lossy(raw).into_owned(), str::to_string);
    let v = match to {
        Dialect::OpenAi => json!({"error": {"message": message,
            "type": parsed.get("error").and_then(|e| e.get("type")).cloned().unwrap_or(json!("api_error")),
            "param": null, "code": null}}),
        Dialect::Anthropic => json!({"type": "error",
            "error": {"type": super::anthropic_type(status), "message": message}}),
    };
    Bytes::from(v.to_string())
}

fn sse_data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn sse_event(name: &str, v: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {v}\n\n"))
}

/// What a stream event's data is.
pub enum Data<'a> {
    Json(&'a Value),
    /// OpenAI's `[DONE]`.
    Done,
}

/// Rewrites a provider's stream into the client's dialect, event by event.
pub enum StreamTranslator {
    AnthropicToOpenAi(ToOpenAi),
    OpenAiToAnthropic(ToAnthropic),
}

impl StreamTranslator {
    /// `None` when both speak the same dialect. `include_usage`: the OpenAI client asked
    /// for the usage chunk.
    pub fn new(from: Dialect, to: Dialect, include_usage: bool) -> Option<Self> {
        match (from, to) {
            (Dialect::Anthropic, Dialect::OpenAi) => {
                Some(StreamTranslator::AnthropicToOpenAi(ToOpenAi {
                    include_usage,
                    id: String::new(),
                    model: Value::Null,
                    created: now_s(),
                    usage: json!({}),
                    tools: Vec::new(),
                    finish: None,
                }))
            }
            (Dialect::OpenAi, Dialect::Anthropic) => {
                Some(StreamTranslator::OpenAiToAnthropic(ToAnthropic::default()))
            }
            _ => None,
        }
    }

    /// The client's events for one provider event.
    pub fn push(&mut self, data: Data<'_>) -> Vec<Bytes> {
        match self {
            StreamTranslator::AnthropicToOpenAi(t) => match data {
                Data::Json(v) => t.push(v),
                Data::Done => Vec::new(),
            },
            StreamTranslator::OpenAiToAnthropic(t) => t.push(data),
        }
    }
}

/// Anthropic events → OpenAI chunks.
pub struct ToOpenAi {
    include_usage: bool,
    id: String,
    model: Value,
    created: i64,
    /// Anthropic's usage so far (message_start, then message_delta).
    usage: Value,
    /// The content block index of each tool call, in call order.
    tools: Vec<u64>,
    finish: Option<&'static str>,
}

impl ToOpenAi {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        sse_data(
            &json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]}),
        )
    }

    fn merge_usage(&mut self, u: &Value) {
        if let (Some(into), Some(from)) = (self.usage.as_object_mut(), u.as_object()) {
            for (k, v) in from {
                if !v.is_null() {
                    into.insert(k.clone(), v.clone());
                }
            }
        }
    }

    fn push(&mut self, v: &Value) -> Vec<Bytes> {
        let block = u64_of(v.get("index"));
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let m = v.get("message").unwrap_or(&Value::Null);
                self.id = format!(
                    "chatcmpl-{}",
                    m.get("id").and_then(Value::as_str).unwrap_or_default()
                );
                self.model = m.get("model").cloned().unwrap_or(Value::Null);
                if let Some(u) = m.get("usage") {
                    self.merge_usage(u);
                }
                vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
            }
            Some("content_block_start") => {
                let b = v.get("content_block").unwrap_or(&Value::Null);
                match b.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let index = self.tools.len();
                        self.tools.push(block);
                        vec![self.chunk(
                            json!({"tool_calls": [{"index": index, "id": b.get("id"), "type": "function",
                                "function": {"name": b.get("name"), "arguments": ""}}]}),
                            None,
                        )]
                    }
                    Some("text") => match b
                        .get("text")
                        .and_then(Value::as_str)
                        .filter(|t| !t.is_empty())
                    {
                        Some(t) => vec![self.chunk(json!({"content": t}), None)],
                        None => Vec::new(),
                    },
                    _ => Vec::new(),
                }
            }
            Some("content_block_delta") => {
                let d = v.get("delta").unwrap_or(&Value::Null);
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => vec![self.chunk(json!({"content": d.get("text")}), None)],
                    Some("input_json_delta") => {
                        let Some(index) = self.tools.iter().position(|b| *b == block) else {
                            return Vec::new();
                        };
                        vec![self.chunk(
                            json!({"tool_calls": [{"index": index, "function": {"arguments": d.get("partial_json")}}]}),
                            None,
                        )]
                    }
                    _ => Vec::new(),
                }
            }
            Some("message_delta") => {
                if let Some(u) = v.get("usage") {
                    self.merge_usage(u);
                }
                let finish = openai_finish(
                    v.get("delta")
                        .and_then(|d| d.get("stop_reason"))
                        .and_then(Value::as_str),
                );
                self.finish = Some(finish);
                vec![self.chunk(json!({}), Some(finish))]
            }
            Some("message_stop") => {
                let mut out = Vec::new();
                if self.include_usage {
                    out.push(sse_data(
                        &json!({"id": self.id, "object": "chat.completion.chunk",
                        "created": self.created, "model": self.model, "choices": [],
                        "usage": openai_usage_of(&self.usage)}),
                    ));
                }
                out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                out
            }
            Some("error") => {
                let e = v.get("error").unwrap_or(&Value::Null);
                vec![sse_data(
                    &json!({"error": {"message": e.get("message"), "type": e.get("type"), "code": null}}),
                )]
            }
            _ => Vec::new(),
        }
    }
}

/// The content block an OpenAI stream is writing, as Anthropic sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    /// A tool call, by its OpenAI index.
    Tool(u64),
}

/// OpenAI chunks → Anthropic events.
#[derive(Default)]
pub struct ToAnthropic {
    started: bool,
    ended: bool,
    open: Option<Open>,
    /// The index of the next content block.
    next: u64,
    stop: Option<&'static str>,
    usage: Option<Value>,
}

impl ToAnthropic {
    fn close(&mut self, out: &mut Vec<Bytes>) {
        if self.open.take().is_some() {
            out.push(sse_event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": self.next - 1}),
            ));
        }
    }

    fn open(&mut self, kind: Open, block: Value, out: &mut Vec<Bytes>) {
        self.close(out);
        out.push(sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": self.next, "content_block": block}),
        ));
        self.open = Some(kind);
        self.next += 1;
    }

    fn push(&mut self, data: Data<'_>) -> Vec<Bytes> {
        let mut out = Vec::new();
        let v = match data {
            Data::Done => {
                self.finish(&mut out);
                return out;
            }
            Data::Json(v) => v,
        };
        if let Some(e) = v.get("error") {
            out.push(sse_event("error", &json!({"type": "error", "error": {"type": "api_error", "message": e.get("message")}})));
            return out;
        }
        if !self.started {
            self.started = true;
            let id = v.get("id").and_then(Value::as_str).unwrap_or_default();
            out.push(sse_event(
                "message_start",
                &json!({"type": "message_start", "message": {
                "id": format!("msg_{id}"), "type": "message", "role": "assistant",
                "model": v.get("model"), "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            ));
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        for c in v
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let d = c.get("delta").unwrap_or(&Value::Null);
            if let Some(t) = d
                .get("content")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                if self.open != Some(Open::Text) {
                    self.open(Open::Text, json!({"type": "text", "text": ""}), &mut out);
                }
                out.push(sse_event(
                    "content_block_delta",
                    &json!({"type": "content_block_delta",
                    "index": self.next - 1, "delta": {"type": "text_delta", "text": t}}),
                ));
            }
            for call in d
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let index = u64_of(call.get("index"));
                let f = call.get("function").unwrap_or(&Value::Null);
                if self.open != Some(Open::Tool(index)) {
                    self.open(
                        Open::Tool(index),
                        json!({"type": "tool_use", "id": call.get("id"), "name": f.get("name"), "input": {}}),
                        &mut out,
                    );
                }
                if let Some(a) = f
                    .get("arguments")
                    .and_then(Value::as_str)
                    .filter(|a| !a.is_empty())
                {
                    out.push(sse_event("content_block_delta", &json!({"type": "content_block_delta",
                        "index": self.next - 1, "delta": {"type": "input_json_delta", "partial_json": a}})));
                }
            }
            if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
                self.stop = Some(anthropic_stop(Some(f)));
                self.close(&mut out);
            }
        }
        out
    }

    fn finish(&mut self, out: &mut Vec<Bytes>) {
        if self.ended || !self.started {
            return;
        }
        self.ended = true;
        self.close(out);
        let usage = anthropic_usage_of(self.usage.as_ref().unwrap_or(&Value::Null));
        out.push(sse_event(
            "message_delta",
            &json!({"type": "message_delta",
            "delta": {"stop_reason": self.stop.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": usage}),
        ));
        out.push(sse_event("message_stop", &json!({"type": "message_stop"})));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn data_of(events: &[Bytes]) -> Vec<Value> {
        events
            .iter()
            .filter_map(|e| super::super::wire::event_data(e))
            .filter(|d| d != "[DONE]")
            .map(|d| serde_json::from_str(&d).unwrap())
            .collect()
    }

    #[test]
    fn an_openai_request_becomes_an_anthropic_one() {
        let body = obj(json!({
            "model": "claude-3-5-haiku", "max_tokens": 50, "stream": true,
            "stream_options": {"include_usage": true}, "temperature": 0.5, "stop": "END",
            "user": "u-1", "seed": 7, "parallel_tool_calls": false,
            "tools": [{"type": "function", "function": {"name": "lookup", "description": "find",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
            "tool_choice": "required",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": [{"type": "text", "text": "and kind"}]},
                {"role": "user", "content": [{"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "found"},
                {"role": "user", "content": "thanks"}
            ]
        }));
        let a = request(Dialect::OpenAi, Dialect::Anthropic, &body).unwrap();
        assert_eq!(a["system"], "be brief\n\nand kind");
        assert_eq!(a["stop_sequences"], json!(["END"]));
        assert_eq!(a["metadata"], json!({"user_id": "u-1"}));
        assert_eq!(
            a["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            a["tools"][0]["input_schema"]["properties"]["q"]["type"],
            "string"
        );
        assert!(
            a.get("max_tokens").is_none()
                && a.get("seed").is_none()
                && a.get("stream_options").is_none()
        );
        let m = a["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(
            m[0]["content"][1]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
        );
        assert_eq!(
            m[1]["content"][0],
            json!({"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "x"}})
        );
        // The tool result and the next user message are one user turn.
        assert_eq!(m[2]["role"], "user");
        assert_eq!(m[2]["content"][0]["type"], "tool_result");
        assert_eq!(m[2]["content"][1]["text"], "thanks");
        // What the provider could not honour is refused, naming the field.
        for (field, value) in [
            ("logprobs", json!(true)),
            ("response_format", json!({"type": "json_object"})),
            ("temperature", json!(1.5)),
            ("audio", json!({})),
        ] {
            let mut b = body.clone();
            b.insert(field.into(), value);
            let e = request(Dialect::OpenAi, Dialect::Anthropic, &b).unwrap_err();
            assert_eq!(e.code, "unsupported_parameter");
            assert!(e.message.contains(&format!("`{field}`")), "{}", e.message);
        }
    }

    #[test]
    fn an_anthropic_request_becomes_an_openai_one() {
        let body = obj(json!({
            "model": "gpt-4o-mini", "max_tokens": 50, "system": [{"type": "text", "text": "be brief"}],
            "stop_sequences": ["END"], "metadata": {"user_id": "u-2"},
            "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "lookup", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "look"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "BBBB"}}]},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"},
                    {"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {"q": "y"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": "found"},
                    {"type": "text", "text": "thanks"}]}
            ]
        }));
        let o = request(Dialect::Anthropic, Dialect::OpenAi, &body).unwrap();
        assert_eq!(o["stop"], json!(["END"]));
        assert_eq!(o["user"], "u-2");
        assert_eq!(o["parallel_tool_calls"], false);
        assert_eq!(
            o["tool_choice"],
            json!({"type": "function", "function": {"name": "lookup"}})
        );
        assert_eq!(
            o["tools"][0]["function"]["parameters"],
            json!({"type": "object"})
        );
        let m = o["messages"].as_array().unwrap();
        let roles: Vec<&str> = m.iter().map(|x| x["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(
            m[1]["content"][1]["image_url"]["url"],
            "data:image/jpeg;base64,BBBB"
        );
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            "{\"q\":\"y\"}"
        );
        assert_eq!(m[3]["tool_call_id"], "tu_1");
        let mut b = body.clone();
        b.insert("top_k".into(), json!(5));
        let e = request(Dialect::Anthropic, Dialect::OpenAi, &b).unwrap_err();
        assert_eq!(
            (e.code, e.message.contains("`top_k`")),
            ("unsupported_parameter", true)
        );
    }

    #[test]
    fn whole_answers_are_translated_with_their_usage_and_stop_reason() {
        let a = json!({"id": "msg_1", "type": "message", "model": "claude-3-5-haiku-20241022",
            "content": [{"type": "text", "text": "hello"},
                        {"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {"q": 1}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 10, "cache_read_input_tokens": 4, "output_tokens": 3}});
        let o = answer(Dialect::Anthropic, Dialect::OpenAi, &a);
        assert_eq!(o["choices"][0]["message"]["content"], "hello");
        assert_eq!(o["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            o["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"q\":1}"
        );
        assert_eq!(
            o["usage"],
            json!({"prompt_tokens": 14, "completion_tokens": 3, "total_tokens": 17,
            "prompt_tokens_details": {"cached_tokens": 4}})
        );
        // And back: the same usage, the same stop.
        let back = answer(Dialect::OpenAi, Dialect::Anthropic, &o);
        assert_eq!(back["usage"]["input_tokens"], 10);
        assert_eq!(back["usage"]["cache_read_input_tokens"], 4);
        assert_eq!(back["usage"]["output_tokens"], 3);
        assert_eq!(back["stop_reason"], "tool_use");
        assert_eq!(back["content"][1]["input"], json!({"q": 1}));
        let cut = json!({"choices": [{"finish_reason": "length", "message": {"content": "x",
            "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{\"q\":"}}]}}]});
        let a2 = answer(Dialect::OpenAi, Dialect::Anthropic, &cut);
        assert_eq!(a2["stop_reason"], "max_tokens");
        assert_eq!(a2["content"][1]["input"], json!({"arguments": "{\"q\":"}));
    }

    #[test]
    fn provider_errors_are_put_in_the_clients_dialect() {
        let b = error_body(
            Dialect::OpenAi,
            Dialect::Anthropic,
            StatusCode::TOO_MANY_REQUESTS,
            br#"{"error":{"message":"slow down","type":"requests"}}"#,
        );
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
        );
        let b = error_body(
            Dialect::Anthropic,
            Dialect::OpenAi,
            StatusCode::BAD_REQUEST,
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#,
        );
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["message"], "bad");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn an_anthropic_stream_becomes_openai_chunks() {
        let events = [
            json!({"type": "message_start", "message": {"id": "m1", "model": "claude-x", "usage": {"input_tokens": 9, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "tu", "name": "f"}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "1}"}}),
            json!({"type": "ping"}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}}),
            json!({"type": "message_stop"}),
        ];
        let mut t = StreamTranslator::new(Dialect::Anthropic, Dialect::OpenAi, true).unwrap();
        let out: Vec<Bytes> = events.iter().flat_map(|e| t.push(Data::Json(e))).collect();
        assert_eq!(
            out.last().unwrap(),
            &Bytes::from_static(b"data: [DONE]\n\n")
        );
        let chunks = data_of(&out);
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "chatcmpl-m1"));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "hi");
        assert_eq!(
            chunks[2]["choices"][0]["delta"]["tool_calls"][0]["id"],
            "tu"
        );
        let args: String = chunks
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        assert_eq!(args, "{\"a\":1}");
        let finish: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, [&json!("tool_calls")]);
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(
            (
                usage["prompt_tokens"].as_u64(),
                usage["completion_tokens"].as_u64()
            ),
            (Some(9), Some(5))
        );
        // Without include_usage there is no usage chunk.
        let mut t = StreamTranslator::new(Dialect::Anthropic, Dialect::OpenAi, false).unwrap();
        let out: Vec<Bytes> = events.iter().flat_map(|e| t.push(Data::Json(e))).collect();
        assert!(data_of(&out).iter().all(|c| c.get("usage").is_none()));
    }

    #[test]
    fn an_openai_stream_becomes_anthropic_events() {
        let chunk = |delta: Value, finish: Value| json!({"id": "c1", "model": "gpt-x", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        let chunks = [
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            chunk(json!({"content": "he"}), Value::Null),
            chunk(json!({"content": "llo"}), Value::Null),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call", "function": {"name": "f", "arguments": ""}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
                Value::Null,
            ),
            chunk(json!({}), json!("tool_calls")),
            json!({"id": "c1", "model": "gpt-x", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 2}}}),
        ];
        let mut t = StreamTranslator::new(Dialect::OpenAi, Dialect::Anthropic, false).unwrap();
        let mut out: Vec<Bytes> = chunks.iter().flat_map(|c| t.push(Data::Json(c))).collect();
        out.extend(t.push(Data::Done));
        let names: Vec<String> = out
            .iter()
            .map(|e| {
                let s = std::str::from_utf8(e).unwrap();
                s.strip_prefix("event: ")
                    .unwrap()
                    .split('\n')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let evs = data_of(&out);
        assert_eq!(evs[5]["index"], 1);
        assert_eq!(evs[5]["content_block"]["name"], "f");
        assert_eq!(evs[8]["delta"]["stop_reason"], "tool_use");
        assert_eq!(evs[8]["usage"]["input_tokens"], 10);
        assert_eq!(evs[8]["usage"]["cache_read_input_tokens"], 2);
        assert_eq!(evs[8]["usage"]["output_tokens"], 4);
        // A second [DONE] adds nothing.
        assert!(t.push(Data::Done).is_empty());
    }
}
