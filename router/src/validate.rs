//! Turns OpenAI requests into worker requests, refusing what the worker cannot do with a 400.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::openai::{ChatCompletionRequest, CompletionRequest, Prompt, SamplingFields, StopSpec};
use crate::proto::grammar::Kind;
use crate::proto::{Grammar, SamplingParams};
use crate::request_limits::RequestLimits;
use crate::tokenizer::ModelTokenizer;
use crate::tools::{self, Tools};

const MAX_STOP_STRINGS: usize = 16;
const MAX_TOP_LOGPROBS: i64 = 20;
const MAX_LOGIT_BIAS: usize = 1024;
const MAX_N: i64 = 16;
/// Prompts in one completions request (lm-eval sends its batch as one).
const MAX_PROMPTS: usize = 256;
/// OpenAI fields that change nothing saw computes: accepted on purpose.
const NO_EFFECT_FIELDS: &[&str] = &["user", "metadata", "store", "service_tier", "parallel_tool_calls"];
/// OpenAI (and vLLM) fields saw does not implement: refused by name unless given their no-op value.
const UNSUPPORTED_FIELDS: &[&str] = &[
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "best_of",
    "suffix",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
];

/// A validated generation request, in tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub input_ids: Vec<u32>,
    pub max_new_tokens: u32,
    pub min_new_tokens: u32,
    /// `max_tokens: 0` (prompt logprobs only): the worker still makes one token, which is dropped.
    pub discard_output: bool,
    pub ignore_eos: bool,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Logprob of each sampled token plus this many alternatives.
    pub logprobs: Option<u32>,
    pub prompt_logprobs: bool,
    /// What the output must match (structured output), if anything.
    pub grammar: Option<Grammar>,
    /// Choices to generate from this prompt (OpenAI's `n`).
    pub n: u32,
}

/// The validated request, and the tools whose calls the answer may hold.
pub fn chat(
    req: &ChatCompletionRequest,
    tok: &ModelTokenizer,
    request_limits: &RequestLimits,
) -> Result<(GenParams, Option<Tools>), ApiError> {
    refuse_other_fields(&req.other)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    let tools = tools::from_request(req.tools.as_ref(), req.tool_choice.as_ref())?;
    let mut messages = req.messages.iter().map(normalize_message).collect::<Result<Vec<_>, _>>()?;
    for m in messages.iter_mut().filter_map(Value::as_object_mut) {
        tools::history_for_template(m, tok.template_takes_tools);
    }
    let template_tools = match &tools {
        Some(t) if tok.template_takes_tools => Some(t.defs.as_slice()),
        Some(t) => {
            add_system_text(&mut messages, &t.system_prompt());
            None
        }
        None => None,
    };
    let text = tok
        .render_chat(&messages, template_tools, req.chat_template_kwargs.as_ref())
        .map_err(ApiError::bad_request)?;
    check_prompt_bytes(&text, tok, request_limits, "messages")?;
    let input_ids = tok.encode_chat(&text).map_err(ApiError::bad_request)?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid_param("top_logprobs", "top_logprobs requires logprobs: true"))
        }
        (false, _) => None,
        (true, k) => Some(top_logprobs("top_logprobs", k.unwrap_or(0))?),
    };
    let max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
    let limits =
        Limits { context_length: tok.context_length, allow_zero_max_tokens: false, prompt_field: "messages" };
    let mut params = common(&req.sampling, max_tokens, input_ids, &limits, tok.vocab_size)?;
    params.logprobs = logprobs;
    if let Some(forced) = tools.as_ref().and_then(Tools::forced_grammar) {
        if params.grammar.is_some() {
            return Err(ApiError::invalid_param(
                "tool_choice",
                "a required tool call cannot be combined with response_format or guided_*",
            ));
        }
        params.grammar = Some(forced);
    }
    Ok((params, tools))
}

/// Prepends text to the system message (a new one first when there is none).
fn add_system_text(messages: &mut Vec<Value>, text: &str) {
    match messages.first_mut().and_then(Value::as_object_mut) {
        Some(first) if first.get("role").and_then(Value::as_str) == Some("system") => {
            let content = first.get("content").and_then(Value::as_str).unwrap_or_default();
            let joined = if content.is_empty() { text.to_string() } else { format!("{content}\n\n{text}") };
            first.insert("content".into(), Value::String(joined));
        }
        _ => messages.insert(0, serde_json::json!({"role": "system", "content": text})),
    }
}

/// One validated request per prompt (a list of prompts is a batch), each with its prompt as text (for `echo`).
pub fn completion(
    req: &CompletionRequest,
    tok: &ModelTokenizer,
    request_limits: &RequestLimits,
) -> Result<Vec<(GenParams, String)>, ApiError> {
    refuse_other_fields(&req.other)?;
    let encode = |text: &str| {
        check_prompt_bytes(text, tok, request_limits, "prompt")?;
        tok.encode_prompt(text).map_err(ApiError::bad_request)
    };
    let prompts: Vec<(Vec<u32>, String)> = match &req.prompt {
        Prompt::Text(text) => vec![(encode(text)?, text.clone())],
        Prompt::Texts(texts) => {
            texts.iter().map(|t| Ok((encode(t)?, t.clone()))).collect::<Result<_, ApiError>>()?
        }
        Prompt::Tokens(ids) => vec![(ids.clone(), tok.decode(ids))],
        Prompt::TokenLists(lists) => lists.iter().map(|ids| (ids.clone(), tok.decode(ids))).collect(),
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid_param("prompt", format!("send 1 to {MAX_PROMPTS} prompts")));
    }
    let vocab = tok.vocab_size;
    let echo = req.echo.unwrap_or(false);
    let logprobs = req.logprobs.map(|k| top_logprobs("logprobs", k)).transpose()?;
    let limits =
        Limits { context_length: tok.context_length, allow_zero_max_tokens: echo, prompt_field: "prompt" };
    prompts
        .into_iter()
        .map(|(input_ids, text)| {
            if let Some(bad) = input_ids.iter().find(|&&id| vocab > 0 && id >= vocab) {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary ({vocab})"),
                ));
            }
            let mut params = common(&req.sampling, req.sampling.max_tokens, input_ids, &limits, vocab)?;
            params.logprobs = logprobs;
            params.prompt_logprobs = echo && logprobs.is_some();
            Ok((params, text))
        })
        .collect()
}

struct Limits {
    context_length: u32,
    allow_zero_max_tokens: bool,
    prompt_field: &'static str,
}

fn common(
    s: &SamplingFields,
    max_tokens: Option<i64>,
    input_ids: Vec<u32>,
    limits: &Limits,
    vocab_size: u32,
) -> Result<GenParams, ApiError> {
    let n = s.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid_param("n", format!("n must be between 1 and {MAX_N}")));
    }
    if input_ids.is_empty() {
        return Err(ApiError::invalid_param(limits.prompt_field, "the prompt is empty"));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param("temperature", "temperature must be between 0 and 2"));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param("top_p", "top_p must be in (0, 1]"));
    }
    let top_k = s.top_k.unwrap_or(-1);
    if top_k < -1 || top_k > i64::from(i32::MAX) {
        return Err(ApiError::invalid_param("top_k", "top_k must be -1 (off), 0 (off) or positive"));
    }
    let seed = match s.seed {
        Some(seed) if seed < 0 => return Err(ApiError::invalid_param("seed", "seed must not be negative")),
        seed => seed.map(|v| v as u64),
    };
    let min_p = in_range("min_p", s.min_p, 0.0, 0.0..=1.0)?;
    let frequency_penalty = in_range("frequency_penalty", s.frequency_penalty, 0.0, -2.0..=2.0)?;
    let presence_penalty = in_range("presence_penalty", s.presence_penalty, 0.0, -2.0..=2.0)?;
    let repetition_penalty = in_range("repetition_penalty", s.repetition_penalty, 1.0, 0.0..=2.0)?;
    if repetition_penalty == 0.0 {
        return Err(ApiError::invalid_param("repetition_penalty", "repetition_penalty must be in (0, 2]"));
    }
    let logit_bias =
        s.logit_bias.as_ref().map(|b| logit_bias(b, vocab_size)).transpose()?.unwrap_or_default();
    let grammar = grammar(s)?;

    let prompt_len = input_ids.len() as u64;
    let context = u64::from(limits.context_length);
    if context > 0 && prompt_len >= context {
        return Err(ApiError::context_length_exceeded(
            limits.prompt_field,
            format!(
                "This model's maximum context length is {context} tokens. However, your prompt has {prompt_len} \
                 tokens; shorten it."
            ),
        ));
    }
    let room = if context > 0 { context - prompt_len } else { u64::from(u32::MAX) };
    let max_new = match max_tokens {
        None => room,
        Some(0) if limits.allow_zero_max_tokens => 0,
        Some(n) if n < 1 => {
            return Err(ApiError::invalid_param("max_tokens", "max_tokens must be at least 1"))
        }
        Some(n) if n as u64 > room => {
            return Err(ApiError::context_length_exceeded(
                "max_tokens",
                format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens \
                     ({prompt_len} in the prompt, {n} for the completion); reduce the prompt or max_tokens.",
                prompt_len + n as u64
            ),
            ))
        }
        Some(n) => n as u64,
    };
    let min_new = s.min_tokens.unwrap_or(0);
    if min_new < 0 || min_new as u64 > max_new {
        return Err(ApiError::invalid_param("min_tokens", "min_tokens must be between 0 and max_tokens"));
    }
    let stop = match &s.stop {
        None => vec![],
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP_STRINGS || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            format!("stop takes up to {MAX_STOP_STRINGS} non-empty strings"),
        ));
    }
    Ok(GenParams {
        input_ids,
        max_new_tokens: max_new.clamp(1, u64::from(u32::MAX)) as u32,
        min_new_tokens: min_new as u32,
        discard_output: max_new == 0,
        ignore_eos: s.ignore_eos.unwrap_or(false),
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: top_k.max(0) as i32,
            seed,
            min_p,
            frequency_penalty,
            presence_penalty,
            repetition_penalty,
            logit_bias,
        },
        stop,
        logprobs: None,
        prompt_logprobs: false,
        grammar,
        n: n as u32,
    })
}

/// `value` (or `default`) as f32, refused with a 400 outside `range`.
fn in_range(
    field: &str,
    value: Option<f64>,
    default: f64,
    range: std::ops::RangeInclusive<f64>,
) -> Result<f32, ApiError> {
    let v = value.unwrap_or(default);
    if !range.contains(&v) {
        return Err(ApiError::invalid_param(
            field,
            format!("{field} must be between {} and {}", range.start(), range.end()),
        ));
    }
    Ok(v as f32)
}

/// OpenAI's `logit_bias` ({"token id": bias in [-100, 100]}) as token ids.
fn logit_bias(bias: &Map<String, Value>, vocab_size: u32) -> Result<HashMap<u32, f32>, ApiError> {
    let bad = |m: String| ApiError::invalid_param("logit_bias", m);
    if bias.len() > MAX_LOGIT_BIAS {
        return Err(bad(format!("logit_bias takes at most {MAX_LOGIT_BIAS} tokens")));
    }
    bias.iter()
        .map(|(key, value)| {
            let id: u32 =
                key.parse().map_err(|_| bad(format!("logit_bias key {key:?} is not a token id")))?;
            if vocab_size > 0 && id >= vocab_size {
                return Err(bad(format!("token id {id} is outside the vocabulary ({vocab_size})")));
            }
            match value.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(bad(format!("the bias of token {id} must be a number between -100 and 100"))),
            }
        })
        .collect()
}

/// The structured-output constraint of `response_format` or a vLLM `guided_*` field (at most one).
fn grammar(s: &SamplingFields) -> Result<Option<Grammar>, ApiError> {
    let make = |kind: Kind, spec: String, strict: bool| Grammar { kind: kind as i32, spec, strict };
    let mut found: Vec<(&str, Grammar)> = Vec::new();
    if let Some(format) = s.response_format.as_ref().filter(|f| !f.is_null()) {
        let bad = |m: &str| ApiError::invalid_param("response_format", m.to_string());
        match format.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                found.push(("response_format", make(Kind::JsonObject, String::new(), false)))
            }
            Some("json_schema") => {
                let spec =
                    format.get("json_schema").ok_or_else(|| bad("json_schema needs a json_schema object"))?;
                let schema = spec.get("schema").filter(|v| v.is_object() || v.is_boolean());
                let schema = schema.ok_or_else(|| bad("json_schema.schema must be a JSON schema object"))?;
                let strict = spec.get("strict").and_then(Value::as_bool).unwrap_or(false);
                found.push(("response_format", make(Kind::JsonSchema, schema.to_string(), strict)));
            }
            _ => return Err(bad("response_format.type must be text, json_object or json_schema")),
        }
    }
    if let Some(schema) = &s.guided_json {
        let text = match schema {
            Value::String(text) => text.clone(),
            Value::Object(_) => schema.to_string(),
            _ => return Err(ApiError::invalid_param("guided_json", "guided_json must be a JSON schema")),
        };
        found.push(("guided_json", make(Kind::JsonSchema, text, false)));
    }
    if let Some(regex) = &s.guided_regex {
        found.push(("guided_regex", make(Kind::Regex, regex.clone(), false)));
    }
    if let Some(choices) = &s.guided_choice {
        if choices.is_empty() || choices.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param("guided_choice", "guided_choice takes non-empty strings"));
        }
        found.push(("guided_choice", make(Kind::Choice, serde_json::json!(choices).to_string(), false)));
    }
    if let Some(ebnf) = &s.guided_grammar {
        found.push(("guided_grammar", make(Kind::Ebnf, ebnf.clone(), false)));
    }
    if found.len() > 1 {
        return Err(ApiError::invalid_param(found[1].0, "give at most one structured-output constraint"));
    }
    Ok(found.pop().map(|(_, g)| g))
}

/// Fields the request structs do not name: those that change nothing pass, the rest are refused by name.
fn refuse_other_fields(other: &Map<String, Value>) -> Result<(), ApiError> {
    for (key, value) in other {
        let no_op = match key.as_str() {
            k if NO_EFFECT_FIELDS.contains(&k) => true,
            "tools" | "functions" => value.is_null() || value.as_array().is_some_and(Vec::is_empty),
            "tool_choice" | "function_call" => value.is_null() || value == "none" || value == "auto",
            "best_of" => value.is_null() || value == 1,
            "suffix" => value.is_null() || value == "",
            "modalities" => value.is_null() || *value == serde_json::json!(["text"]),
            _ => false,
        };
        if !no_op {
            let why = if UNSUPPORTED_FIELDS.contains(&key.as_str()) {
                format!("{key} is not supported by this server")
            } else {
                format!("unknown field {key:?}")
            };
            return Err(ApiError::invalid_param(key, why));
        }
    }
    Ok(())
}

/// Refuses a prompt with more bytes than the context could hold tokens of, before tokenizing it
/// (which costs about a second of CPU per megabyte).
fn check_prompt_bytes(
    text: &str,
    tok: &ModelTokenizer,
    limits: &RequestLimits,
    field: &str,
) -> Result<(), ApiError> {
    let (context_length, bytes_per_token) = (tok.context_length, limits.max_prompt_bytes_per_token);
    let max_bytes = limits.max_prompt_bytes(context_length);
    if context_length == 0 || text.len() <= max_bytes {
        return Ok(());
    }
    Err(ApiError::context_length_exceeded(
        field,
        format!(
            "This model's maximum context length is {context_length} tokens. However, your prompt has {} bytes, \
             more than {max_bytes} ({bytes_per_token} per token) could fit; shorten it.",
            text.len()
        ),
    ))
}

fn top_logprobs(field: &str, k: i64) -> Result<u32, ApiError> {
    if !(0..=MAX_TOP_LOGPROBS).contains(&k) {
        return Err(ApiError::invalid_param(
            field,
            format!("{field} must be between 0 and {MAX_TOP_LOGPROBS}"),
        ));
    }
    Ok(k as u32)
}

/// Checks a chat message and flattens `content` parts (`[{"type": "text", "text": ...}]`) to one
/// string, since most chat templates expect a string.
fn normalize_message(message: &Value) -> Result<Value, ApiError> {
    let bad = |m: &str| ApiError::invalid_param("messages", m.to_string());
    let Some(obj) = message.as_object() else { return Err(bad("each message must be an object")) };
    if !obj.get("role").is_some_and(Value::is_string) {
        return Err(bad("each message needs a string 'role'"));
    }
    let mut obj = obj.clone();
    let content = match obj.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => return Err(bad("only text content parts are supported")),
                }
            }
            text
        }
        Some(_) => return Err(bad("message content must be a string or a list of text parts")),
    };
    obj.insert("content".into(), Value::String(content));
    Ok(Value::Object(obj))
}
