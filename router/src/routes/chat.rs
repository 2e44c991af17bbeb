//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::sse::{self, ChunkWriter};
use super::{response_id, unix_now};
use crate::app::{AppState, Model};
use crate::error::{ApiError, ApiJson};
use crate::generate::{self, Generation, TokenOut};
use crate::openai::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatCompletionRequest, ChatDelta, ChatLogprobs,
    ChatMessageOut, ChatTokenLogprob, ChatTopLogprob, FunctionCall, ToolCallOut, Usage,
};
use crate::tools::{self, ToolCall};
use crate::validate;

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let model = state.model()?;
    model.check_name(req.model.as_deref())?;
    // Templating and tokenizing long prompts is CPU work: keep it off the async threads.
    let (req, params) = super::blocking(&state, {
        let (model, limits) = (model.clone(), state.limits.clone());
        move || {
            let params = validate::chat(&req, &model.tokenizer, &limits);
            (req, params)
        }
    })
    .await?;
    let (params, tools) = params?;
    let with_logprobs = params.logprobs.is_some();
    let choices = generate::start_choices(&state, &model, vec![params]).await?;
    let (id, created) = (response_id("chatcmpl"), unix_now());
    let writer = |index: u32| ChatWriter {
        id: id.clone(),
        created,
        model: model.clone(),
        index,
        with_logprobs,
        calls: tools.is_some().then(CallHold::default),
    };
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let writers = choices.into_iter().zip(0..).map(|(c, i)| (c, writer(i))).collect();
        return Ok(sse::respond(writers, include_usage.then(|| writer(0))));
    }
    let outs = futures_util::future::try_join_all(choices.into_iter().map(generate::Choice::collect)).await?;
    let usage = generate::total_usage(outs.iter().map(|(out, counts_prompt)| (out.usage, *counts_prompt)));
    let choices = outs
        .into_iter()
        .zip(0..)
        .map(|((out, _), index)| {
            let w = writer(index);
            let logprobs = with_logprobs.then(|| w.logprobs(&out.tokens));
            let (content, calls) =
                if w.calls.is_some() { tools::parse_calls(&out.text) } else { (Some(out.text), vec![]) };
            let finish_reason = if calls.is_empty() { out.reason } else { "tool_calls" };
            let tool_calls = calls.into_iter().map(|c| tool_call_out(c, None)).collect();
            ChatChoice {
                index,
                message: ChatMessageOut { role: "assistant", content, tool_calls },
                logprobs,
                finish_reason,
            }
        })
        .collect();
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model: model.name.clone(),
        choices,
        usage,
    })
    .into_response())
}

fn tool_call_out(call: ToolCall, index: Option<u32>) -> ToolCallOut {
    ToolCallOut {
        index,
        id: response_id("call"),
        kind: "function",
        function: FunctionCall { name: call.name, arguments: call.arguments },
    }
}

struct ChatWriter {
    id: String,
    created: u64,
    model: Arc<Model>,
    /// The choice's index.
    index: u32,
    with_logprobs: bool,
    /// With tools: the streamed text held back while it may be a tool call.
    calls: Option<CallHold>,
}

/// Streamed text that may be a tool call: everything once the answer opens with JSON or a `<tool_call>`
/// tag appears (parsed at the end), else only a tail that could be the start of the tag.
#[derive(Default)]
struct CallHold {
    held: String,
    tokens: Vec<TokenOut>,
    all: bool,
    sent_any: bool,
}

impl CallHold {
    /// Adds new text; returns what can be sent as content now.
    fn push(&mut self, text: &str, tokens: &[TokenOut]) -> Option<(String, Vec<TokenOut>)> {
        self.held.push_str(text);
        self.tokens.extend_from_slice(tokens);
        let opens_json = !self.sent_any && self.held.trim_start().starts_with(['{', '[']);
        if self.all || opens_json || self.held.contains(tools::CALL_OPEN) {
            self.all = true;
            return None;
        }
        let keep = (1..tools::CALL_OPEN.len())
            .rev()
            .find(|&n| self.held.ends_with(&tools::CALL_OPEN[..n]))
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        if self.held[..cut].trim().is_empty() && !self.sent_any {
            return None; // leading whitespace: the answer may still open with JSON
        }
        self.sent_any = true;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        Some((out, std::mem::take(&mut self.tokens)))
    }
}

impl ChatWriter {
    fn content_chunk(&self, text: String, tokens: &[TokenOut]) -> String {
        let logprobs = self.with_logprobs.then(|| self.logprobs(tokens));
        self.chunk(ChatDelta { content: Some(text), ..Default::default() }, logprobs, None)
    }

    fn chunk(
        &self,
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        finish: Option<&'static str>,
    ) -> String {
        let choice = ChatChunkChoice { index: self.index, delta, logprobs, finish_reason: finish };
        self.to_json(vec![choice], None)
    }

    fn to_json(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> String {
        let chunk = ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.name.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    fn logprobs(&self, tokens: &[TokenOut]) -> ChatLogprobs {
        let tok = &self.model.tokenizer;
        let entry = |id: u32| {
            let token = tok.token_text(id);
            let bytes = token.as_bytes().to_vec();
            (token, bytes)
        };
        let content = tokens
            .iter()
            .map(|t| {
                let (token, bytes) = entry(t.id);
                let top_logprobs = t
                    .top
                    .iter()
                    .map(|&(id, logprob)| {
                        let (token, bytes) = entry(id);
                        ChatTopLogprob { token, logprob, bytes }
                    })
                    .collect();
                ChatTokenLogprob { token, logprob: t.logprob, bytes, top_logprobs }
            })
            .collect();
        ChatLogprobs { content }
    }
}

impl ChunkWriter for ChatWriter {
    fn preamble(&mut self, _: &Generation) -> Vec<String> {
        let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()), ..Default::default() };
        vec![self.chunk(delta, None, None)]
    }

    fn text(&mut self, text: String, tokens: &[TokenOut]) -> Option<String> {
        match self.calls.as_mut() {
            Some(hold) => {
                let (text, tokens) = hold.push(&text, tokens)?;
                Some(self.content_chunk(text, &tokens))
            }
            None => Some(self.content_chunk(text, tokens)),
        }
    }

    fn finish(&mut self, reason: &'static str) -> Vec<String> {
        let mut frames = Vec::new();
        let mut reason = reason;
        if let Some(hold) = self.calls.take() {
            let (content, calls) =
                if hold.all { tools::parse_calls(&hold.held) } else { (Some(hold.held), vec![]) };
            if let Some(text) = content.filter(|t| !t.is_empty()) {
                frames.push(self.content_chunk(text, &hold.tokens));
            }
            if !calls.is_empty() {
                let tool_calls = calls.into_iter().zip(0..).map(|(c, i)| tool_call_out(c, Some(i))).collect();
                frames.push(self.chunk(ChatDelta { tool_calls, ..Default::default() }, None, None));
                reason = "tool_calls";
            }
        }
        frames.push(self.chunk(ChatDelta::default(), None, Some(reason)));
        frames
    }

    fn usage(&mut self, usage: Usage) -> String {
        self.to_json(vec![], Some(usage))
    }
}
