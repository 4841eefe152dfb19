//! The wire formats of proxy mode: OpenAI chat completions and embeddings, Anthropic
//! messages, and server-sent events. Requests are checked here before any money is
//! held; answers are read here for the usage and the model the provider reports.

use std::borrow::Cow;
use std::ops::Range;

use axum::body::Bytes;
use axum::http::StatusCode;
use bursar_core::pricebook::TokenUsage;
use bursar_core::tokens::ChatMessage;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Prompt tokens counted for each image part: the most a high-detail image costs on
/// OpenAI's models (2048×768 tiles), so the hold stays a worst case.
pub const IMAGE_TOKENS: u64 = 1_105;
/// An upstream event larger than this is malformed: the stream is cut and settled.
pub const MAX_EVENT_BYTES: usize = 4 << 20;

/// The API dialect a client speaks, and the one a provider answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
}

/// What Bursar needs of a proxied request (chat or embeddings); the body itself is
/// forwarded as the client sent it, with `model`, the output cap and the stream options
/// rewritten.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    /// The text of the prompt, for counting (chat).
    pub messages: Vec<ChatMessage>,
    /// The inputs, for counting (embeddings).
    pub texts: Vec<String>,
    /// Tokens counted apart from the text (images).
    pub extra_prompt_tokens: u64,
    pub max_tokens: Option<u32>,
    /// The field the client capped output with (`max_tokens` or `max_completion_tokens`).
    pub max_tokens_field: &'static str,
    pub stream: bool,
    /// OpenAI: the client asked for the usage chunk itself.
    pub client_wants_usage: bool,
    pub end_user: Option<String>,
    /// Fields counted from values parsed out of the body's text (messages other than
    /// plain ones, Anthropic's `system`, the tools), sent upstream as parsed.
    pub counted: Vec<(&'static str, Value)>,
}

/// Where a request's top-level fields are read from: a parsed object, or a
/// [`RequestBody`] whose fields are parsed as they are asked for.
pub trait Fields {
    /// The field, if present. A field whose text serde_json cannot read as a value (a
    /// number past `f64`, a lone surrogate escape: JSON's grammar allows both) is an
    /// error, never absent: a cap or a prompt Bursar could not read must not go
    /// upstream unheld.
    fn field(&self, name: &str) -> Result<Option<Cow<'_, Value>>, ApiError>;

    /// The messages, when each is a plain text message of one of `roles` (`role`, a
    /// string `content`, perhaps `name`, nothing else) and there are 1 to
    /// [`crate::api::MAX_MESSAGES`] of them: what [`parse_chat`] would read of them,
    /// without a `Value` of each. `None` sends it to the general reading, which also
    /// words every error.
    fn plain_messages(&self, _roles: &[&str]) -> Option<Vec<ChatMessage>> {
        None
    }
}

impl Fields for Map<String, Value> {
    fn field(&self, name: &str) -> Result<Option<Cow<'_, Value>>, ApiError> {
        Ok(self.get(name).map(Cow::Borrowed))
    }
}

fn positive_u32(body: &(impl Fields + ?Sized), field: &str) -> Result<Option<u32>, ApiError> {
    match body.field(field)?.as_deref() {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(Some(u32::try_from(n).unwrap_or(u32::MAX))),
            _ => Err(invalid(format!("`{field}` must be a positive integer"))),
        },
    }
}

/// Appends the text of a message content (a string, or parts) and counts its images.
fn content_text(v: &Value, out: &mut String, images: &mut u64) -> Result<(), ApiError> {
    match v {
        Value::Null => Ok(()),
        Value::String(s) => {
            out.push_str(s);
            Ok(())
        }
        Value::Array(parts) => {
            for part in parts {
                let Some(obj) = part.as_object() else {
                    return Err(invalid("every content part must be an object"));
                };
                match obj.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let Some(t) = obj.get("text").and_then(Value::as_str) else {
                            return Err(invalid("a text part needs a `text` string"));
                        };
                        out.push_str(t);
                    }
                    Some("image_url" | "image" | "input_image") => *images += 1,
                    Some("tool_use") => {
                        out.push_str(&obj.get("input").map(Value::to_string).unwrap_or_default())
                    }
                    Some("tool_result") => {
                        if let Some(c) = obj.get("content") {
                            content_text(c, out, images)?;
                        }
                    }
                    // Other parts (audio, documents, thinking) are counted as their JSON.
                    Some(_) => out.push_str(&part.to_string()),
                    None => return Err(invalid("every content part needs a `type`")),
                }
            }
            Ok(())
        }
        _ => Err(invalid("`content` must be a string or an array of parts")),
    }
}

/// Keeps a field that was counted as it was parsed from the body's text, to go upstream
/// so: what the provider reads is then what was counted, even where the client's text
/// gives a name twice inside it (one reader takes the first, another the last).
fn keep_parsed(counted: &mut Vec<(&'static str, Value)>, name: &'static str, v: Cow<'_, Value>) {
    if let Cow::Owned(v) = v {
        counted.push((name, v));
    }
}

/// A string value, owned.
fn text_of(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

/// Checks a chat request in the client's dialect.
pub fn parse_chat(
    dialect: Dialect,
    body: &(impl Fields + ?Sized),
) -> Result<ChatRequest, ApiError> {
    let model = match body.field("model")?.as_deref() {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(invalid("`model` is required")),
    };
    let roles: &[&str] = match dialect {
        Dialect::OpenAi => &[
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
            "function",
        ],
        Dialect::Anthropic => &["user", "assistant"],
    };
    let plain = body.plain_messages(roles);
    let listed = match plain {
        Some(_) => None,
        None => body.field("messages")?,
    };
    let raw: &[Value] = match (&plain, listed.as_deref()) {
        (Some(_), _) => &[],
        (None, Some(Value::Array(raw))) => raw,
        (None, _) => return Err(invalid("`messages` must be an array")),
    };
    if plain.is_none() && raw.is_empty() {
        return Err(invalid("`messages` must not be empty"));
    }
    if raw.len() > crate::api::MAX_MESSAGES {
        return Err(invalid(format!(
            "at most {} messages",
            crate::api::MAX_MESSAGES
        )));
    }
    let mut messages = Vec::with_capacity(plain.as_ref().map_or(raw.len(), Vec::len) + 2);
    let mut images = 0;
    let mut counted = Vec::new();
    if dialect == Dialect::Anthropic {
        if let Some(system) = body.field("system")? {
            let mut text = String::new();
            content_text(&system, &mut text, &mut images)?;
            messages.push(ChatMessage {
                role: "system".into(),
                content: text,
                name: None,
            });
            keep_parsed(&mut counted, "system", system);
        }
    }
    messages.extend(plain.into_iter().flatten());
    for (i, m) in raw.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(invalid(format!("messages[{i}] must be an object")));
        };
        let role = match obj.get("role").and_then(Value::as_str) {
            Some(r) if roles.contains(&r) => r,
            _ => {
                return Err(invalid(format!(
                    "messages[{i}].role must be one of {}",
                    roles.join(", ")
                )))
            }
        };
        let mut text = String::new();
        content_text(
            obj.get("content").unwrap_or(&Value::Null),
            &mut text,
            &mut images,
        )
        .map_err(|e| invalid(format!("messages[{i}]: {}", e.message)))?;
        if let Some(calls) = obj.get("tool_calls") {
            text.push_str(&calls.to_string());
        }
        messages.push(ChatMessage {
            role: role.to_string(),
            content: text,
            name: obj.get("name").and_then(Value::as_str).map(str::to_string),
        });
    }
    let tools = match body.field("tools")? {
        Some(t) => Some(("tools", t)),
        None => body.field("functions")?.map(|f| ("functions", f)),
    };
    if let Some((name, tools)) = tools {
        messages.push(ChatMessage {
            role: "system".into(),
            content: tools.to_string(),
            name: None,
        });
        keep_parsed(&mut counted, name, tools);
    }
    if let Some(listed) = listed {
        keep_parsed(&mut counted, "messages", listed);
    }
    let (max_tokens, max_tokens_field) = match dialect {
        Dialect::OpenAi => {
            if let Some(n) = body.field("n")? {
                if n.as_u64() != Some(1) && !n.is_null() {
                    return Err(invalid(
                        "`n` other than 1 is not supported: ask for each choice in its own call",
                    ));
                }
            }
            match positive_u32(body, "max_completion_tokens")? {
                Some(n) => (Some(n), "max_completion_tokens"),
                None => (positive_u32(body, "max_tokens")?, "max_tokens"),
            }
        }
        Dialect::Anthropic => match positive_u32(body, "max_tokens")? {
            Some(n) => (Some(n), "max_tokens"),
            None => return Err(invalid("`max_tokens` is required")),
        },
    };
    let stream = match body.field("stream")?.as_deref() {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("`stream` must be a boolean")),
    };
    let client_wants_usage = body
        .field("stream_options")?
        .and_then(|o| o.get("include_usage").and_then(Value::as_bool))
        .unwrap_or(false);
    let end_user = match dialect {
        Dialect::OpenAi => text_of(body.field("user")?.as_deref()),
        Dialect::Anthropic => text_of(
            body.field("metadata")?
                .as_deref()
                .and_then(|m| m.get("user_id")),
        ),
    };
    Ok(ChatRequest {
        model,
        messages,
        texts: Vec::new(),
        extra_prompt_tokens: images * IMAGE_TOKENS,
        max_tokens,
        max_tokens_field,
        stream,
        client_wants_usage,
        end_user,
        counted,
    })
}

/// The inputs of an embeddings request, as texts (token arrays are counted as given).
fn embedding_inputs(body: &(impl Fields + ?Sized)) -> Result<(String, Vec<String>, u64), ApiError> {
    let model = match body.field("model")?.as_deref() {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(invalid("`model` is required")),
    };
    let mut texts = Vec::new();
    let mut given_tokens = 0u64;
    match body.field("input")?.as_deref() {
        Some(Value::String(s)) => texts.push(s.clone()),
        Some(Value::Array(items)) if !items.is_empty() => {
            for item in items {
                match item {
                    Value::String(s) => texts.push(s.clone()),
                    Value::Number(_) => given_tokens += 1,
                    Value::Array(toks) => given_tokens += toks.len() as u64,
                    _ => return Err(invalid("`input` items must be strings or token arrays")),
                }
            }
        }
        _ => return Err(invalid("`input` must be a string or a non-empty array")),
    }
    Ok((model, texts, given_tokens))
}

/// Checks an embeddings request; token arrays count as given, texts are counted later
/// with the routed model's tokenizer.
pub fn parse_embeddings(body: &(impl Fields + ?Sized)) -> Result<ChatRequest, ApiError> {
    let (model, texts, given_tokens) = embedding_inputs(body)?;
    Ok(ChatRequest {
        model,
        messages: Vec::new(),
        texts,
        extra_prompt_tokens: given_tokens,
        max_tokens: None,
        max_tokens_field: "max_tokens",
        stream: false,
        client_wants_usage: false,
        end_user: text_of(body.field("user")?.as_deref()),
        counted: Vec::new(),
    })
}

/// A request body as the client sent it: its bytes, and where each top-level field's
/// JSON text lies in them. Bursar reads the few fields it needs; every other field goes
/// upstream as the client wrote it, neither parsed into a `Value` nor written again.
///
/// A field named twice is refused: JSON leaves its meaning open, and a provider that
/// reads the other copy than Bursar would be held and billed for another request.
#[derive(Debug)]
pub struct RequestBody {
    raw: Bytes,
    fields: Vec<(String, Range<usize>)>,
    /// For a body of many fields, their indexes in name order (looked up by halving);
    /// a few fields are looked up one by one.
    by_name: Vec<usize>,
}

/// Up to this many top-level fields, names are compared one by one: fewer steps than
/// sorting for every real request, and bounded (a body of 100k fields must not cost
/// 10^10 comparisons).
const FEW_FIELDS: usize = 16;

impl RequestBody {
    /// Reads the top level of `raw` (the whole text is checked to be JSON).
    pub fn parse(raw: Bytes) -> Result<RequestBody, ApiError> {
        let top = match serde_json::from_slice::<TopLevel<'_>>(&raw) {
            Ok(top) => top,
            // Well-formed JSON, but no object.
            Err(_) if serde_json::from_slice::<IgnoredAny>(&raw).is_ok() => {
                return Err(invalid("the body must be a JSON object"));
            }
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("malformed JSON: {e}"),
                ))
            }
        };
        let base = raw.as_ptr() as usize;
        let few = top.0.len() <= FEW_FIELDS;
        let mut fields: Vec<(String, Range<usize>)> = Vec::with_capacity(top.0.len());
        for (name, value) in top.0 {
            if few && fields.iter().any(|(n, _)| *n == name) {
                return Err(twice(&name));
            }
            let text = value.get();
            let range = (text.as_ptr() as usize)
                .checked_sub(base)
                .map(|start| start..start + text.len())
                .filter(|r| raw.get(r.clone()) == Some(text.as_bytes()))
                .ok_or_else(|| invalid(format!("field `{name}` could not be read")))?;
            fields.push((name, range));
        }
        let mut by_name = Vec::new();
        if !few {
            by_name = (0..fields.len()).collect();
            by_name.sort_unstable_by(|a, b| fields[*a].0.cmp(&fields[*b].0));
            if let Some(w) = by_name
                .windows(2)
                .find(|w| fields[w[0]].0 == fields[w[1]].0)
            {
                return Err(twice(&fields[w[0]].0));
            }
        }
        Ok(RequestBody {
            raw,
            fields,
            by_name,
        })
    }

    /// The body's bytes, as received.
    pub fn bytes(&self) -> &Bytes {
        &self.raw
    }

    /// The JSON text of a top-level field.
    fn text(&self, name: &str) -> Option<&[u8]> {
        let (_, range) = if self.by_name.is_empty() {
            self.fields.iter().find(|(n, _)| n == name)?
        } else {
            let at = self
                .by_name
                .binary_search_by(|i| self.fields[*i].0.as_str().cmp(name))
                .ok()?;
            self.fields.get(*self.by_name.get(at)?)?
        };
        self.raw.get(range.clone())
    }

    /// The whole body as an object (for translating it to the other dialect).
    pub fn to_map(&self) -> Result<Map<String, Value>, ApiError> {
        self.fields
            .iter()
            .map(|(name, range)| {
                let text = self.raw.get(range.clone()).unwrap_or_default();
                Ok((name.clone(), parse_field(name, text)?))
            })
            .collect()
    }

    /// A top-level field parsed from its text.
    fn value(&self, name: &str) -> Result<Option<Value>, ApiError> {
        self.text(name).map(|t| parse_field(name, t)).transpose()
    }

    /// The body with the fields of `set` in place of its own (added when it has none):
    /// every other field is copied as the client wrote it, in the client's order.
    pub fn with_fields<'v>(
        &self,
        set: impl IntoIterator<Item = (&'v str, &'v Value)> + Clone,
    ) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(self.raw.len() + 64);
        out.push(b'{');
        let mut first = true;
        let mut comma = |out: &mut Vec<u8>| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
        };
        for (name, range) in &self.fields {
            if set.clone().into_iter().any(|(k, _)| k == name) {
                continue;
            }
            let Some(text) = self.raw.get(range.clone()) else {
                continue;
            };
            comma(&mut out);
            serde_json::to_writer(&mut out, name)?;
            out.push(b':');
            out.extend_from_slice(text);
        }
        for (k, v) in set {
            comma(&mut out);
            serde_json::to_writer(&mut out, k)?;
            out.push(b':');
            serde_json::to_writer(&mut out, v)?;
        }
        out.push(b'}');
        Ok(out)
    }
}

impl Fields for RequestBody {
    /// The field parsed from its text (each time it is asked for).
    fn field(&self, name: &str) -> Result<Option<Cow<'_, Value>>, ApiError> {
        Ok(self.value(name)?.map(Cow::Owned))
    }

    fn plain_messages(&self, roles: &[&str]) -> Option<Vec<ChatMessage>> {
        let plain: Vec<PlainMessage<'_>> = serde_json::from_slice(self.text("messages")?).ok()?;
        if plain.is_empty() || plain.len() > crate::api::MAX_MESSAGES {
            return None;
        }
        plain
            .into_iter()
            .map(|m| {
                roles.contains(&m.role.as_ref()).then(|| ChatMessage {
                    role: m.role.into_owned(),
                    content: m.content.into_owned(),
                    name: m.name.map(Cow::into_owned),
                })
            })
            .collect()
    }
}

/// A chat message of text only, its strings borrowed from the body where they have no
/// escapes. Anything else (parts, tool calls, a field twice) is no plain message.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainMessage<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow)]
    content: Cow<'a, str>,
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
}

/// A field's text as a value; what serde cannot read is 400 `invalid_json` naming it.
fn parse_field(name: &str, text: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(text).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("field `{name}` cannot be read: {e}"),
        )
    })
}

fn twice(name: &str) -> ApiError {
    invalid(format!("field `{name}` is given twice"))
}

/// A JSON object's fields, their values left as text.
struct TopLevel<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<TopLevel<'de>, A::Error> {
                let mut fields = Vec::with_capacity(a.size_hint().unwrap_or(8));
                while let Some((k, v)) = a.next_entry::<String, &'de RawValue>()? {
                    fields.push((k, v));
                }
                Ok(TopLevel(fields))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// What an answer (or the stream so far) says.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub usage: Option<TokenUsage>,
    /// The model the provider reports.
    pub model: Option<String>,
    /// Generated text, for counting when the usage is missing.
    pub text: String,
    /// The answer reached its end (`[DONE]`, `message_stop`, a finish reason).
    pub finished: bool,
}

fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_u64()
}

/// The usage fields of either dialect that Bursar reads, each as [`Value::as_u64`] reads
/// it: a number that is not a whole number from 0 to `u64::MAX`, or any other value, is
/// absent. Read from a parsed answer ([`UsageFields::of`]) or straight from its bytes
/// ([`read_answer_head`]); both give the same usage through [`UsageFields::usage`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    /// `prompt_tokens_details.cached_tokens`.
    cached_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

impl UsageFields {
    fn of(u: &Value) -> Self {
        Self {
            prompt_tokens: u64_at(u, &["prompt_tokens"]),
            completion_tokens: u64_at(u, &["completion_tokens"]),
            cached_tokens: u64_at(u, &["prompt_tokens_details", "cached_tokens"]),
            input_tokens: u64_at(u, &["input_tokens"]),
            output_tokens: u64_at(u, &["output_tokens"]),
            cache_read_input_tokens: u64_at(u, &["cache_read_input_tokens"]),
            cache_creation_input_tokens: u64_at(u, &["cache_creation_input_tokens"]),
        }
    }

    fn usage(&self, dialect: Dialect) -> Option<TokenUsage> {
        match dialect {
            Dialect::OpenAi => Some(TokenUsage {
                input_tokens: self.prompt_tokens?,
                cached_input_tokens: self.cached_tokens.unwrap_or(0),
                output_tokens: self.completion_tokens.unwrap_or(0),
            }),
            Dialect::Anthropic => {
                let (input, cached) = self.anthropic_input()?;
                Some(TokenUsage {
                    input_tokens: input,
                    cached_input_tokens: cached,
                    output_tokens: self.output_tokens.unwrap_or(0),
                })
            }
        }
    }

    /// Anthropic reports cache reads and writes apart from `input_tokens`; all are prompt.
    fn anthropic_input(&self) -> Option<(u64, u64)> {
        let plain = self.input_tokens?;
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let write = self.cache_creation_input_tokens.unwrap_or(0);
        Some((plain.saturating_add(read).saturating_add(write), read))
    }
}

fn openai_usage(u: &Value) -> Option<TokenUsage> {
    UsageFields::of(u).usage(Dialect::OpenAi)
}

fn anthropic_input(u: &Value) -> Option<(u64, u64)> {
    UsageFields::of(u).anthropic_input()
}

fn anthropic_usage(u: &Value) -> Option<TokenUsage> {
    UsageFields::of(u).usage(Dialect::Anthropic)
}

/// Reads a whole answer's usage and model without building the rest of it (its text is
/// needed only when the usage is missing, its shape only when it is translated): a JSON
/// object with a readable usage gives the same `Seen` as [`read_answer`], less the text.
/// `None` for anything else (a field given twice included), which [`read_answer`] then
/// reads whole.
pub fn read_answer_head(dialect: Dialect, raw: &[u8]) -> Option<Seen> {
    // An answer must be an object.
    if raw.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let head: head::Head = serde_json::from_slice::<head::Object<head::Head>>(raw)
        .ok()?
        .0?;
    let usage = head.usage?.usage(dialect)?;
    Some(Seen {
        usage: Some(usage),
        model: head.model,
        text: String::new(),
        finished: true,
    })
}

/// The reader of [`read_answer_head`]: `model` and `usage` read, every other value
/// checked as JSON and skipped, nothing built but the model's name.
mod head {
    use std::fmt;

    use serde::de::{
        DeserializeSeed, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };
    use serde::Deserialize;

    use super::UsageFields;

    /// The fields of an object read by name (the others skipped).
    pub(super) trait Fields: Default {
        const NAMES: &'static [&'static str];
        /// Reads the value of the field `NAMES[i]`.
        fn read<'de, A: MapAccess<'de>>(&mut self, i: usize, a: &mut A) -> Result<(), A::Error>;
    }

    /// An object's fields, or `None` when the value is not an object (as `Value::get`
    /// finds nothing in one). A key given twice is refused: a parsed `Value` keeps the
    /// last, and the whole answer is read then.
    pub(super) struct Object<T>(pub Option<T>);

    impl<'de, T: Fields> Deserialize<'de> for Object<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(ObjectVisitor(std::marker::PhantomData))
        }
    }

    struct ObjectVisitor<T>(std::marker::PhantomData<T>);

    impl<'de, T: Fields> Visitor<'de> for ObjectVisitor<T> {
        type Value = Object<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Object<T>, A::Error> {
            let mut out = T::default();
            let mut given = 0u64;
            while let Some(k) = a.next_key_seed(Key(T::NAMES))? {
                match k {
                    Some(i) => {
                        if given & (1 << i) != 0 {
                            return Err(A::Error::custom(format_args!(
                                "`{}` given twice",
                                T::NAMES[i]
                            )));
                        }
                        given |= 1 << i;
                        out.read(i, &mut a)?;
                    }
                    None => {
                        a.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(Object(Some(out)))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Object<T>, A::Error> {
            while a.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Object(None))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Object<T>, E> {
            Ok(Object(None))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Object<T>, E> {
            Ok(Object(None))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Object<T>, E> {
            Ok(Object(None))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Object<T>, E> {
            Ok(Object(None))
        }
        fn visit_unit<E>(self) -> Result<Object<T>, E> {
            Ok(Object(None))
        }
        fn visit_str<E>(self, _: &str) -> Result<Object<T>, E> {
            Ok(Object(None))
        }
    }

    /// A map key: the index of the name it matches, if any.
    struct Key(&'static [&'static str]);

    impl<'de> DeserializeSeed<'de> for Key {
        type Value = Option<usize>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl Visitor<'_> for Key {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a field name")
        }
        fn visit_str<E>(self, s: &str) -> Result<Option<usize>, E> {
            Ok(self.0.iter().position(|n| *n == s))
        }
    }

    /// A value as `Value::as_u64` or `Value::as_str` reads it; containers are skipped.
    enum Leaf {
        Count(u64),
        Text(String),
        Other,
    }

    impl Leaf {
        fn count(self) -> Option<u64> {
            match self {
                Leaf::Count(n) => Some(n),
                _ => None,
            }
        }
    }

    impl<'de> Deserialize<'de> for Leaf {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(LeafVisitor)
        }
    }

    struct LeafVisitor;

    impl<'de> Visitor<'de> for LeafVisitor {
        type Value = Leaf;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_u64<E>(self, n: u64) -> Result<Leaf, E> {
            Ok(Leaf::Count(n))
        }
        fn visit_i64<E>(self, n: i64) -> Result<Leaf, E> {
            Ok(u64::try_from(n).map_or(Leaf::Other, Leaf::Count))
        }
        // serde_json reads `-0` as a float, so it is no count, as in a `Value`.
        fn visit_f64<E>(self, _: f64) -> Result<Leaf, E> {
            Ok(Leaf::Other)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Leaf, E> {
            Ok(Leaf::Other)
        }
        fn visit_unit<E>(self) -> Result<Leaf, E> {
            Ok(Leaf::Other)
        }
        fn visit_str<E>(self, s: &str) -> Result<Leaf, E> {
            Ok(Leaf::Text(s.to_owned()))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Leaf, A::Error> {
            while a.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Leaf::Other)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Leaf, A::Error> {
            while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Leaf::Other)
        }
    }

    /// The top of an answer: `model` as `Value::as_str` reads it, and `usage`.
    #[derive(Default)]
    pub(super) struct Head {
        pub model: Option<String>,
        pub usage: Option<UsageFields>,
    }

    impl Fields for Head {
        const NAMES: &'static [&'static str] = &["model", "usage"];
        fn read<'de, A: MapAccess<'de>>(&mut self, i: usize, a: &mut A) -> Result<(), A::Error> {
            if i == 0 {
                self.model = match a.next_value::<Leaf>()? {
                    Leaf::Text(t) => Some(t),
                    _ => None,
                };
            } else {
                self.usage = a.next_value::<Object<UsageFields>>()?.0;
            }
            Ok(())
        }
    }

    impl Fields for UsageFields {
        const NAMES: &'static [&'static str] = &[
            "prompt_tokens",
            "completion_tokens",
            "prompt_tokens_details",
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        ];
        fn read<'de, A: MapAccess<'de>>(&mut self, i: usize, a: &mut A) -> Result<(), A::Error> {
            if i == 2 {
                self.cached_tokens = a.next_value::<Object<Details>>()?.0.and_then(|d| d.0);
                return Ok(());
            }
            let n = a.next_value::<Leaf>()?.count();
            match i {
                0 => self.prompt_tokens = n,
                1 => self.completion_tokens = n,
                3 => self.input_tokens = n,
                4 => self.output_tokens = n,
                5 => self.cache_read_input_tokens = n,
                _ => self.cache_creation_input_tokens = n,
            }
            Ok(())
        }
    }

    /// `prompt_tokens_details`: its `cached_tokens`.
    #[derive(Default)]
    struct Details(Option<u64>);

    impl Fields for Details {
        const NAMES: &'static [&'static str] = &["cached_tokens"];
        fn read<'de, A: MapAccess<'de>>(&mut self, _: usize, a: &mut A) -> Result<(), A::Error> {
            self.0 = a.next_value::<Leaf>()?.count();
            Ok(())
        }
    }
}

/// Reads a whole (non-streamed) answer.
pub fn read_answer(dialect: Dialect, v: &Value, seen: &mut Seen) {
    seen.model = v.get("model").and_then(Value::as_str).map(str::to_string);
    seen.finished = true;
    match dialect {
        Dialect::OpenAi => {
            for c in v
                .get("choices")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(m) = c.get("message") {
                    if let Some(t) = m.get("content").and_then(Value::as_str) {
                        seen.text.push_str(t);
                    }
                    if let Some(calls) = m.get("tool_calls") {
                        seen.text.push_str(&calls.to_string());
                    }
                }
            }
            seen.usage = v.get("usage").and_then(openai_usage);
        }
        Dialect::Anthropic => {
            for b in v
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(t) = b.get("text").and_then(Value::as_str) {
                    seen.text.push_str(t);
                } else if let Some(i) = b.get("input") {
                    seen.text.push_str(&i.to_string());
                }
            }
            seen.usage = v.get("usage").and_then(anthropic_usage);
        }
    }
}

/// Reads one streamed event's data; returns the new text it carries.
pub fn read_event<'a>(dialect: Dialect, v: &'a Value, seen: &mut Seen) -> Vec<&'a str> {
    let mut new_text = Vec::new();
    match dialect {
        Dialect::OpenAi => {
            if let Some(m) = v.get("model").and_then(Value::as_str) {
                seen.model.get_or_insert_with(|| m.to_string());
            }
            for c in v
                .get("choices")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(d) = c.get("delta") {
                    if let Some(t) = d.get("content").and_then(Value::as_str) {
                        new_text.push(t);
                    }
                    for call in d
                        .get("tool_calls")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(a) = call
                            .get("function")
                            .and_then(|f| f.get("arguments"))
                            .and_then(Value::as_str)
                        {
                            new_text.push(a);
                        }
                    }
                }
            }
            if let Some(u) = v.get("usage").and_then(openai_usage) {
                seen.usage = Some(u);
            }
        }
        Dialect::Anthropic => match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let msg = v.get("message");
                seen.model = msg
                    .and_then(|m| m.get("model"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                if let Some((input, cached)) =
                    msg.and_then(|m| m.get("usage")).and_then(anthropic_input)
                {
                    seen.usage = Some(TokenUsage {
                        input_tokens: input,
                        cached_input_tokens: cached,
                        output_tokens: 0,
                    });
                }
            }
            Some("content_block_delta") => {
                if let Some(d) = v.get("delta") {
                    if let Some(t) = d
                        .get("text")
                        .or_else(|| d.get("partial_json"))
                        .or_else(|| d.get("thinking"))
                        .and_then(Value::as_str)
                    {
                        new_text.push(t);
                    }
                }
            }
            Some("message_delta") => {
                if let Some(out) = v.get("usage").and_then(|u| u64_at(u, &["output_tokens"])) {
                    let mut u = seen.usage.unwrap_or_default();
                    u.output_tokens = out;
                    seen.usage = Some(u);
                }
            }
            Some("message_stop") => seen.finished = true,
            _ => {}
        },
    }
    for t in &new_text {
        seen.text.push_str(t);
    }
    new_text
}

/// An upstream event passed [`MAX_EVENT_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a server-sent event is larger than {MAX_EVENT_BYTES} bytes")]
pub struct EventTooLarge;

/// Splits a byte stream into server-sent events, each kept whole with its terminator
/// so it can be forwarded unchanged.
#[derive(Debug, Default)]
pub struct SseSplitter {
    buf: Vec<u8>,
}

fn find_boundary(b: &[u8]) -> Option<usize> {
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl SseSplitter {
    /// Adds bytes; returns the events they complete. Errs when one event grows past
    /// [`MAX_EVENT_BYTES`].
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Bytes>, EventTooLarge> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = find_boundary(&self.buf) {
            let rest = self.buf.split_off(end);
            out.push(Bytes::from(std::mem::replace(&mut self.buf, rest)));
        }
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(EventTooLarge);
        }
        Ok(out)
    }

    /// Bytes of an unfinished event at the end of the stream.
    pub fn rest(&self) -> &[u8] {
        &self.buf
    }
}

/// The `data:` of an event, lines joined.
pub fn event_data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data: Option<String> = None;
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data:") {
            let d = d.strip_prefix(' ').unwrap_or(d);
            match &mut data {
                Some(s) => {
                    s.push('\n');
                    s.push_str(d);
                }
                None => data = Some(d.to_string()),
            }
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn events_are_split_across_chunk_boundaries_and_kept_whole() {
        let mut s = SseSplitter::default();
        assert!(s.push(b"data: {\"a\"").unwrap().is_empty());
        let ev = s.push(b":1}\n\ndata: [DONE]\r\n\r\nevent: x\n").unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(&ev[0][..], b"data: {\"a\":1}\n\n");
        assert_eq!(event_data(&ev[0]).as_deref(), Some("{\"a\":1}"));
        assert_eq!(event_data(&ev[1]).as_deref(), Some("[DONE]"));
        assert_eq!(s.rest(), b"event: x\n");
        let mut big = SseSplitter::default();
        assert!(big.push(&vec![b'x'; MAX_EVENT_BYTES + 1]).is_err());
    }

    #[test]
    fn requests_the_provider_would_refuse_are_refused_first() {
        let cases = [
            (
                json!({"messages": [{"role": "user", "content": "hi"}]}),
                "`model`",
            ),
            (
                json!({"model": "gpt-4o", "messages": []}),
                "must not be empty",
            ),
            (
                json!({"model": "gpt-4o", "messages": [{"role": "robot", "content": "x"}]}),
                "role",
            ),
            (
                json!({"model": "gpt-4o", "messages": [{"role": "user", "content": 5}]}),
                "content",
            ),
            (
                json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "n": 3}),
                "`n`",
            ),
            (
                json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
                "stream",
            ),
        ];
        for (body, needle) in cases {
            let e = parse_chat(Dialect::OpenAi, body.as_object().unwrap()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(needle), "{} lacks {needle}", e.message);
        }
        let no_max =
            json!({"model": "claude-3-5-haiku", "messages": [{"role": "user", "content": "x"}]});
        let e = parse_chat(Dialect::Anthropic, no_max.as_object().unwrap()).unwrap_err();
        assert!(e.message.contains("max_tokens"));
    }

    #[test]
    fn prompt_text_includes_system_parts_tools_and_images() {
        let body = json!({
            "model": "claude-3-5-haiku", "max_tokens": 100,
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image", "source": {"type": "base64", "data": "AAAA"}}
            ]}],
            "tools": [{"name": "lookup"}]
        });
        let r = parse_chat(Dialect::Anthropic, body.as_object().unwrap()).unwrap();
        assert_eq!(r.messages[0].content, "be brief");
        assert_eq!(r.messages[1].content, "what is this");
        assert!(r.messages[2].content.contains("lookup"));
        assert_eq!(r.extra_prompt_tokens, IMAGE_TOKENS);
        assert_eq!(r.max_tokens, Some(100));
    }

    #[test]
    fn usage_is_read_from_both_dialects() {
        let mut seen = Seen::default();
        read_answer(
            Dialect::OpenAi,
            &json!({"model": "gpt-4o-mini-2024-07-18", "choices": [{"message": {"content": "hi"}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}}),
            &mut seen,
        );
        assert_eq!(
            seen.usage.unwrap(),
            TokenUsage {
                input_tokens: 10,
                cached_input_tokens: 4,
                output_tokens: 2
            }
        );
        assert_eq!(seen.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        let mut seen = Seen::default();
        read_event(
            Dialect::Anthropic,
            &json!({"type": "message_start", "message": {"model": "claude-3-5-haiku-20241022",
            "usage": {"input_tokens": 7, "cache_read_input_tokens": 3}}}),
            &mut seen,
        );
        let delta =
            json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "yo"}});
        let t = read_event(Dialect::Anthropic, &delta, &mut seen);
        assert_eq!(t, vec!["yo"]);
        read_event(
            Dialect::Anthropic,
            &json!({"type": "message_delta", "usage": {"output_tokens": 5}}),
            &mut seen,
        );
        read_event(
            Dialect::Anthropic,
            &json!({"type": "message_stop"}),
            &mut seen,
        );
        assert_eq!(
            seen.usage.unwrap(),
            TokenUsage {
                input_tokens: 10,
                cached_input_tokens: 3,
                output_tokens: 5
            }
        );
        assert!(seen.finished);
        assert_eq!(seen.text, "yo");
    }

    #[test]
    fn an_answers_head_reads_what_the_whole_answer_says_or_nothing() {
        let answers = [
            (
                Dialect::OpenAi,
                r#"{"id":"c1","model":"gpt-4o-mini-2024-07-18","choices":[{"message":{"content":"hi \"there\""}}],
                   "usage":{"prompt_tokens":10,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":4}}}"#,
            ),
            (
                Dialect::Anthropic,
                r#" {"model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"yo"}],
                   "usage":{"input_tokens":7,"cache_read_input_tokens":3,"cache_creation_input_tokens":2,"output_tokens":5}}"#,
            ),
            (
                Dialect::OpenAi,
                r#"{"model":null,"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
            ),
        ];
        for (dialect, raw) in answers {
            let mut whole = Seen::default();
            read_answer(dialect, &serde_json::from_str(raw).unwrap(), &mut whole);
            let head = read_answer_head(dialect, raw.as_bytes()).unwrap();
            assert!(whole.usage.is_some());
            assert_eq!(head.usage, whole.usage, "{raw}");
            assert_eq!(head.model, whole.model, "{raw}");
            assert!(head.finished);
        }
        // Read whole instead: no usage, a usage not in this dialect, not an object, not
        // JSON, cut short, a field twice.
        for (dialect, raw) in [
            (Dialect::OpenAi, r#"{"model":"gpt-4o","choices":[]}"#),
            (Dialect::Anthropic, r#"{"usage":{"prompt_tokens":1}}"#),
            (
                Dialect::OpenAi,
                r#"[{"prompt_tokens":1},{"prompt_tokens":1}]"#,
            ),
            (Dialect::OpenAi, "<html>502 Bad Gateway</html>"),
            (
                Dialect::OpenAi,
                r#"{"usage":{"prompt_tokens":1},"choices":[{"#,
            ),
            (
                Dialect::OpenAi,
                r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            ),
        ] {
            assert!(read_answer_head(dialect, raw.as_bytes()).is_none(), "{raw}");
        }
    }

    /// A JSON object's text from `(raw key, name, raw value)` fields, and whether a name
    /// is given twice.
    fn object(fields: &[(String, &'static str, String)]) -> (String, bool) {
        let body: Vec<String> = fields.iter().map(|(k, _, v)| format!("{k}:{v}")).collect();
        let mut names: Vec<&str> = fields.iter().map(|f| f.1).collect();
        names.sort_unstable();
        let twice = names.windows(2).any(|w| w[0] == w[1]);
        (format!("{{{}}}", body.join(",")), twice)
    }

    /// A key for `name`, written plain or with one character escaped.
    fn key(name: &'static str) -> impl Strategy<Value = String> {
        (any::<bool>(), any::<proptest::sample::Index>()).prop_map(move |(escape, i)| {
            if !escape {
                return format!("\"{name}\"");
            }
            let k = i.index(name.len());
            format!(
                "\"{}\\u{:04x}{}\"",
                &name[..k],
                name.as_bytes()[k],
                &name[k + 1..]
            )
        })
    }

    /// Values of every kind, numbers at the edges of `u64` and beyond.
    fn any_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("0".to_string()),
            Just("-0".to_string()),
            Just("18446744073709551615".to_string()),
            Just("18446744073709551616".to_string()),
            Just("-3".to_string()),
            Just("1.5".to_string()),
            Just("2e3".to_string()),
            Just("null".to_string()),
            Just("true".to_string()),
            Just("\"12\"".to_string()),
            Just("[1,{\"a\":2}]".to_string()),
            Just("{\"prompt_tokens\":1}".to_string()),
            (0u64..100_000).prop_map(|n| n.to_string()),
            (0u64..100_000).prop_map(|n| n.to_string()),
        ]
    }

    fn field(
        name: &'static str,
        value: impl Strategy<Value = String>,
    ) -> impl Strategy<Value = (String, &'static str, String)> {
        (key(name), value).prop_map(move |(k, v)| (k, name, v))
    }

    /// `prompt_tokens_details`: an object (its name twice or not) or another value.
    fn details() -> impl Strategy<Value = (String, bool)> {
        prop_oneof![
            proptest::collection::vec(
                prop_oneof![
                    field("cached_tokens", any_value()),
                    field("audio_tokens", any_value()),
                ],
                0..3
            )
            .prop_map(|f| object(&f)),
            any_value().prop_map(|v| (v, false)),
        ]
    }

    /// A usage of either dialect, mixed: every field the reader knows and one it does
    /// not, any value in each; or a value that is not an object.
    fn usage() -> impl Strategy<Value = (String, bool)> {
        let named = prop_oneof![
            field("prompt_tokens", any_value()),
            field("completion_tokens", any_value()),
            field("total_tokens", any_value()),
            field("input_tokens", any_value()),
            field("output_tokens", any_value()),
            field("cache_read_input_tokens", any_value()),
            field("cache_creation_input_tokens", any_value()),
        ]
        .prop_map(|f| (f, false));
        let details = (key("prompt_tokens_details"), details())
            .prop_map(|(k, (v, twice))| ((k, "prompt_tokens_details", v), twice));
        prop_oneof![
            proptest::collection::vec(prop_oneof![3 => named, 1 => details], 0..7).prop_map(
                |fields| {
                    let inner = fields.iter().any(|(_, twice)| *twice);
                    let fields: Vec<_> = fields.into_iter().map(|(f, _)| f).collect();
                    let (text, twice) = object(&fields);
                    (text, twice || inner)
                }
            ),
            any_value().prop_map(|v| (v, false)),
        ]
    }

    /// An answer: the fields of either dialect's answer in any order and number, a name
    /// given twice at times, any value for `model`.
    fn answer() -> impl Strategy<Value = (String, bool)> {
        let model = prop_oneof![
            Just("\"gpt-4o-mini-2024-07-18\"".to_string()),
            Just("\"claude-\\\"3\\u0035\"".to_string()),
            any_value(),
        ];
        let plain = prop_oneof![
            field("id", Just("\"chatcmpl-1\"".to_string())),
            field("model", model),
            field(
                "choices",
                Just(r#"[{"message":{"content":"hi","usage":{"prompt_tokens":9}}}]"#.to_string())
            ),
            field(
                "content",
                Just(r#"[{"type":"text","text":"yo"}]"#.to_string())
            ),
        ]
        .prop_map(|f| (f, false));
        let usage = (key("usage"), usage()).prop_map(|(k, (v, twice))| ((k, "usage", v), twice));
        proptest::collection::vec(prop_oneof![plain, usage], 0..6).prop_map(|fields| {
            let inner = fields.iter().any(|(_, twice)| *twice);
            let fields: Vec<_> = fields.into_iter().map(|(f, _)| f).collect();
            let (text, twice) = object(&fields);
            (text, twice || inner)
        })
    }

    #[test]
    fn a_request_body_that_is_not_one_object_is_refused() {
        for (raw, code, says) in [
            ("[1]", "invalid_request", "must be a JSON object"),
            ("\"model\"", "invalid_request", "must be a JSON object"),
            ("{not json", "invalid_json", "malformed JSON"),
            ("", "invalid_json", "malformed JSON"),
            ("{\"a\":1} {}", "invalid_json", "malformed JSON"),
            ("{\"a\":1,}", "invalid_json", "malformed JSON"),
            (
                r#"{"model":"a","messages":[],"model":"b"}"#,
                "invalid_request",
                "field `model` is given twice",
            ),
            (
                r#"{"model":"a","mod\u0065l":"b"}"#,
                "invalid_request",
                "field `model` is given twice",
            ),
        ] {
            let e = RequestBody::parse(Bytes::from(raw)).unwrap_err();
            assert_eq!(e.code, code, "{raw}");
            assert!(e.message.contains(says), "{raw}: {}", e.message);
        }
    }

    #[test]
    fn a_body_of_many_fields_is_read_by_name_and_a_name_twice_is_found() {
        for n in [
            FEW_FIELDS - 1,
            FEW_FIELDS,
            FEW_FIELDS + 1,
            3 * FEW_FIELDS,
            5000,
        ] {
            let names: Vec<String> = (0..n).map(|i| format!("f{}", (i * 7919) % n)).collect();
            let fields: Vec<String> = names.iter().map(|k| format!("\"{k}\":\"{k}!\"")).collect();
            let raw = format!("{{{}}}", fields.join(","));
            let body = RequestBody::parse(Bytes::from(raw.clone())).unwrap();
            for k in &names {
                let v = body.field(k).unwrap();
                assert_eq!(v.as_deref(), Some(&json!(format!("{k}!"))), "{n} fields");
            }
            assert!(body.field("absent").unwrap().is_none());
            assert_eq!(
                body.with_fields(std::iter::empty()).unwrap(),
                raw.as_bytes()
            );
            // The same name again, first, last or in the middle.
            for at in [0, n / 2, n] {
                let mut twice = fields.clone();
                twice.insert(at, format!("\"{}\":0", names[n / 3]));
                let raw = format!("{{{}}}", twice.join(","));
                let e = RequestBody::parse(Bytes::from(raw)).unwrap_err();
                assert_eq!(e.code, "invalid_request");
                assert!(
                    e.message.contains(&format!("`{}`", names[n / 3])),
                    "{}",
                    e.message
                );
            }
        }
    }

    #[test]
    fn a_field_bursar_reads_but_serde_cannot_is_refused_never_absent() {
        // JSON's grammar allows both; serde_json reads neither into a value.
        for (dialect, raw, field) in [
            (
                Dialect::OpenAi,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":1e400}"#,
                "max_tokens",
            ),
            (
                Dialect::OpenAi,
                r#"{"model":"\ud800","messages":[{"role":"user","content":"x"}]}"#,
                "model",
            ),
            (
                Dialect::OpenAi,
                r#"{"model":"m","messages":[{"role":"user","content":"\udc00"}]}"#,
                "messages",
            ),
            (
                Dialect::OpenAi,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"n":-1e999}]}"#,
                "tools",
            ),
            (
                Dialect::Anthropic,
                r#"{"model":"m","max_tokens":5,"system":"\ud800","messages":[{"role":"user","content":"x"}]}"#,
                "system",
            ),
        ] {
            let body = RequestBody::parse(Bytes::from(raw)).unwrap();
            let e = parse_chat(dialect, &body).unwrap_err();
            assert_eq!(e.code, "invalid_json", "{raw}");
            assert!(
                e.message.contains(&format!("`{field}`")),
                "{raw}: {}",
                e.message
            );
        }
        // A field Bursar does not read goes as written; only translating reads it.
        let raw = r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":1e400}"#;
        let body = RequestBody::parse(Bytes::from(raw)).unwrap();
        let req = parse_chat(Dialect::OpenAi, &body).unwrap();
        assert!(req.counted.is_empty(), "plain messages go as written");
        let out = body.with_fields(std::iter::empty()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), raw.replace(' ', ""));
        assert_eq!(body.to_map().unwrap_err().code, "invalid_json");
    }

    #[test]
    fn fields_counted_from_parsed_values_are_kept_as_parsed() {
        let raw = r#"{"model":"m","max_tokens":5,"system":[{"type":"text","text":"a","text":"b"}],
            "tools":[{"name":"f","name":"g"}],
            "messages":[{"role":"user","content":[{"type":"text","text":"long","text":"x"}]}]}"#;
        let body = RequestBody::parse(Bytes::from(raw)).unwrap();
        let req = parse_chat(Dialect::Anthropic, &body).unwrap();
        let names: Vec<&str> = req.counted.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["system", "tools", "messages"]);
        let fields: Vec<(&str, &Value)> = req.counted.iter().map(|(k, v)| (*k, v)).collect();
        let out = String::from_utf8(body.with_fields(fields.iter().copied()).unwrap()).unwrap();
        // Each name once, the copy counted (serde's: the last).
        assert!(RequestBody::parse(Bytes::from(out.clone())).is_ok());
        assert!(
            !out.contains("long") && !out.contains(r#""text":"a""#),
            "{out}"
        );
        assert!(!out.contains(r#""name":"f""#), "{out}");
        assert_eq!(req.messages[0].content, "b");
        assert_eq!(req.messages[1].content, "x");
        // Read from a parsed object nothing is kept: it is no text of the client's.
        let map: Map<String, Value> = serde_json::from_str(raw).unwrap();
        assert!(parse_chat(Dialect::Anthropic, &map)
            .unwrap()
            .counted
            .is_empty());
    }

    /// A request's top level with spaces and new lines between its parts.
    fn spaced(fields: &[(String, &'static str, String)], pad: &str) -> String {
        let body: Vec<String> = fields
            .iter()
            .map(|(k, _, v)| format!("{k}{pad}:{pad}{v}"))
            .collect();
        format!("{{{pad}{}{pad}}}", body.join(&format!(",{pad}")))
    }

    /// A chat message's text, and whether it is a plain one (for OpenAI's roles; for
    /// Anthropic's too unless its role is `system`): any role, content of every kind,
    /// a name or not, a field more or a field twice.
    fn message() -> impl Strategy<Value = (String, bool, bool)> {
        let role = prop_oneof![
            Just(("\"user\"", true, true)),
            Just(("\"assistant\"", true, true)),
            Just(("\"system\"", true, false)),
            Just(("\"bot\"", false, false)),
            Just(("3", false, false)),
        ];
        let content = prop_oneof![
            Just(("\"hi\"".to_string(), true)),
            Just((
                r#""line\nnext \"quoted\" \u00e9 \ud83d\ude00""#.to_string(),
                true
            )),
            "[a-z ]{0,12}".prop_map(|t| (format!("\"{t}\""), true)),
            Just(("null".to_string(), false)),
            Just((r#"[{"type":"text","text":"part"}]"#.to_string(), false)),
            Just(("7".to_string(), false)),
        ];
        let name = prop_oneof![
            Just(("", true)),
            Just((r#","name":"ann""#, true)),
            Just((r#","name":null"#, true)),
            Just((r#","name":5"#, false)),
        ];
        let more = prop_oneof![
            3 => Just(("", true)),
            1 => Just((r#","tool_calls":[{"id":"c1"}]"#, false)),
            1 => Just((r#","role":"user""#, false)),
            1 => Just((r#","content":"again""#, false)),
        ];
        (role, content, name, more, any::<bool>()).prop_map(
            |((role, openai, anthropic), (content, c), (name, n), (more, m), content_first)| {
                let text = if content_first {
                    format!(r#"{{"content":{content},"role":{role}{name}{more}}}"#)
                } else {
                    format!(r#"{{"role":{role},"content":{content}{name}{more}}}"#)
                };
                let plain = c && n && m;
                (text, plain && openai, plain && anthropic)
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Messages read straight from the body's text are what the general reading
        /// gives, errors included; and plain ones are read so.
        #[test]
        fn plain_messages_read_as_the_general_reading_does(
            listed in proptest::collection::vec(
                prop_oneof![9 => message(), 1 => Just(("1".to_string(), false, false))],
                0..5,
            ),
        ) {
            let texts: Vec<&str> = listed.iter().map(|(t, _, _)| t.as_str()).collect();
            let raw = format!(
                r#"{{"model":"m","max_tokens":5,"messages":[{}]}}"#,
                texts.join(",")
            );
            let body = RequestBody::parse(Bytes::from(raw.clone())).unwrap();
            let map: Map<String, Value> = serde_json::from_str(&raw).unwrap();
            for (dialect, plain) in [
                (Dialect::OpenAi, listed.iter().all(|m| m.1)),
                (Dialect::Anthropic, listed.iter().all(|m| m.2)),
            ] {
                let mut fast = parse_chat(dialect, &body);
                let general = parse_chat(dialect, &map);
                if let Ok(a) = &mut fast {
                    // What was counted from a parsed value is kept, as the object has it.
                    for (name, v) in std::mem::take(&mut a.counted) {
                        prop_assert_eq!(Some(&v), map.get(name), "{}", raw);
                        prop_assert!(!plain, "{}", raw);
                    }
                }
                match (&fast, &general) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(a, b, "{}", raw),
                    (Err(a), Err(b)) => {
                        prop_assert_eq!((a.code, &a.message), (b.code, &b.message), "{}", raw)
                    }
                    _ => prop_assert!(false, "{}: {:?} against {:?}", raw, fast, general),
                }
                let roles: &[&str] = match dialect {
                    Dialect::OpenAi => &["system", "user", "assistant"],
                    Dialect::Anthropic => &["user", "assistant"],
                };
                let taken = body.plain_messages(roles).is_some();
                prop_assert_eq!(taken, plain && !listed.is_empty(), "{}", raw);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// What goes upstream is the client's body with Bursar's fields in place of (or
        /// beside) its own, every other field's text as the client wrote it; a field is
        /// read as a parsed object reads it; a name given twice is refused.
        #[test]
        fn a_request_body_goes_upstream_as_written_but_for_the_fields_set(
            fields in proptest::collection::vec(
                prop_oneof![
                    field("model", any_value()),
                    field("max_tokens", any_value()),
                    field("temperature", any_value()),
                    field("messages", any_value()),
                    field("metadata", any_value()),
                ],
                0..6,
            ),
            pad in prop_oneof![Just(""), Just(" "), Just("\n  ")],
            set_model in any::<bool>(),
            set_cap in any::<bool>(),
        ) {
            let raw = spaced(&fields, pad);
            let (_, twice) = object(&fields);
            let body = match RequestBody::parse(Bytes::from(raw.clone())) {
                Ok(body) => body,
                Err(e) => {
                    prop_assert!(twice, "{}: {:?}", raw, e);
                    prop_assert_eq!(e.code, "invalid_request");
                    return Ok(());
                }
            };
            prop_assert!(!twice, "{}", raw);
            let map: Map<String, Value> = serde_json::from_str(&raw).unwrap();
            for (_, name, _) in &fields {
                let read = body.field(name).unwrap();
                prop_assert_eq!(read.as_deref(), map.get(*name), "{}", raw);
            }
            prop_assert!(body.field("absent").unwrap().is_none());
            let mut set: Vec<(&str, Value)> = Vec::new();
            if set_model {
                set.push(("model", json!("routed-\"model\"")));
            }
            if set_cap {
                set.push(("max_tokens", json!(7)));
            }
            let refs: Vec<(&str, &Value)> = set.iter().map(|(k, v)| (*k, v)).collect();
            let out = body.with_fields(refs.iter().copied()).unwrap();
            let mut expected = map;
            for (k, v) in &set {
                expected.insert((*k).to_string(), v.clone());
            }
            // No name twice in what is sent, either.
            prop_assert!(RequestBody::parse(Bytes::from(out.clone())).is_ok(), "{}", raw);
            let sent: Map<String, Value> = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(&sent, &expected, "{}", raw);
            let text = String::from_utf8(out).unwrap();
            for (_, name, v) in &fields {
                if !set.iter().any(|(k, _)| k == name) {
                    let kept = format!(":{v}");
                    prop_assert!(text.contains(&kept), "{} lost {}: {}", raw, v, text);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The head reader gives what the whole answer says, or nothing; and it gives
        /// nothing only for an answer without a usage or with a name given twice.
        #[test]
        fn an_answers_head_agrees_with_the_whole_answer((raw, twice) in answer()) {
            let parsed: Option<Value> = serde_json::from_str(&raw).ok();
            prop_assert!(parsed.is_some(), "{}", raw);
            for dialect in [Dialect::OpenAi, Dialect::Anthropic] {
                let mut whole = Seen::default();
                if let Some(v) = &parsed {
                    read_answer(dialect, v, &mut whole);
                }
                match read_answer_head(dialect, raw.as_bytes()) {
                    Some(head) => {
                        prop_assert!(whole.usage.is_some(), "{}", raw);
                        prop_assert_eq!(head.usage, whole.usage, "{}", raw);
                        prop_assert_eq!(&head.model, &whole.model, "{}", raw);
                    }
                    None => prop_assert!(whole.usage.is_none() || twice, "{}", raw),
                }
            }
        }
    }
}
