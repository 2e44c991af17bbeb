//! Turns OpenAI requests into worker requests, refusing what the worker cannot do with a 400.

use serde_json::Value;

use crate::error::ApiError;
use crate::openai::{ChatCompletionRequest, CompletionRequest, Prompt, SamplingFields, StopSpec};
use crate::proto::SamplingParams;
use crate::request_limits::RequestLimits;
use crate::tokenizer::ModelTokenizer;

const MAX_STOP_STRINGS: usize = 16;
const MAX_TOP_LOGPROBS: i64 = 20;

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
}

pub fn chat(
    req: &ChatCompletionRequest,
    tok: &ModelTokenizer,
    request_limits: &RequestLimits,
) -> Result<GenParams, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    let messages = req.messages.iter().map(normalize_message).collect::<Result<Vec<_>, _>>()?;
    let text =
        tok.render_chat(&messages, req.chat_template_kwargs.as_ref()).map_err(ApiError::bad_request)?;
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
    let mut params = common(&req.sampling, max_tokens, input_ids, &limits)?;
    params.logprobs = logprobs;
    Ok(params)
}

/// The validated request and the prompt as text (for `echo`).
pub fn completion(
    req: &CompletionRequest,
    tok: &ModelTokenizer,
    request_limits: &RequestLimits,
) -> Result<(GenParams, String), ApiError> {
    let one = |n: usize| {
        if n == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid_param(
                "prompt",
                "send one prompt per request (batched prompts are not supported)",
            ))
        }
    };
    let encode = |text: &str| {
        check_prompt_bytes(text, tok, request_limits, "prompt")?;
        tok.encode_prompt(text).map_err(ApiError::bad_request)
    };
    let (input_ids, text) = match &req.prompt {
        Prompt::Text(text) => (encode(text)?, text.clone()),
        Prompt::Texts(texts) => {
            one(texts.len())?;
            (encode(&texts[0])?, texts[0].clone())
        }
        Prompt::Tokens(ids) => (ids.clone(), tok.decode(ids)),
        Prompt::TokenLists(lists) => {
            one(lists.len())?;
            (lists[0].clone(), tok.decode(&lists[0]))
        }
    };
    let vocab = tok.vocab_size;
    if let Some(bad) = input_ids.iter().find(|&&id| vocab > 0 && id >= vocab) {
        return Err(ApiError::invalid_param(
            "prompt",
            format!("token id {bad} is outside the vocabulary ({vocab})"),
        ));
    }
    let echo = req.echo.unwrap_or(false);
    let logprobs = req.logprobs.map(|k| top_logprobs("logprobs", k)).transpose()?;
    let limits =
        Limits { context_length: tok.context_length, allow_zero_max_tokens: echo, prompt_field: "prompt" };
    let mut params = common(&req.sampling, req.sampling.max_tokens, input_ids, &limits)?;
    params.logprobs = logprobs;
    params.prompt_logprobs = echo && logprobs.is_some();
    Ok((params, text))
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
) -> Result<GenParams, ApiError> {
    match s.n {
        None | Some(1) => {}
        Some(n) if n < 1 => return Err(ApiError::invalid_param("n", "n must be at least 1")),
        Some(_) => return Err(ApiError::invalid_param("n", "n > 1 is not supported; send several requests")),
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
        },
        stop,
        logprobs: None,
        prompt_logprobs: false,
    })
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
