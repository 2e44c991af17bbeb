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
    ChatMessageOut, ChatTokenLogprob, ChatTopLogprob, Usage,
};
use crate::validate;

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let model = state.model()?;
    // Templating and tokenizing long prompts is CPU work: keep it off the async threads.
    let (req, params) = super::blocking(&state, {
        let (model, limits) = (model.clone(), state.limits.clone());
        move || {
            let params = validate::chat(&req, &model.tokenizer, &limits);
            (req, params)
        }
    })
    .await?;
    let params = params?;
    let with_logprobs = params.logprobs.is_some();
    let generation = generate::start(&state, &model, params).await?;
    let writer = ChatWriter { id: response_id("chatcmpl"), created: unix_now(), model, with_logprobs };
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        return Ok(sse::respond(generation, writer, include_usage));
    }
    let out = generation.collect().await?;
    let logprobs = with_logprobs.then(|| writer.logprobs(&out.tokens));
    Ok(Json(ChatCompletion {
        id: writer.id,
        object: "chat.completion",
        created: writer.created,
        model: writer.model.name.clone(),
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessageOut { role: "assistant", content: out.text },
            logprobs,
            finish_reason: out.reason,
        }],
        usage: out.usage,
    })
    .into_response())
}

struct ChatWriter {
    id: String,
    created: u64,
    model: Arc<Model>,
    with_logprobs: bool,
}

impl ChatWriter {
    fn chunk(
        &self,
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        finish: Option<&'static str>,
    ) -> String {
        let choice = ChatChunkChoice { index: 0, delta, logprobs, finish_reason: finish };
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
        let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()) };
        vec![self.chunk(delta, None, None)]
    }

    fn text(&mut self, text: String, tokens: &[TokenOut]) -> String {
        let logprobs = self.with_logprobs.then(|| self.logprobs(tokens));
        self.chunk(ChatDelta { role: None, content: Some(text) }, logprobs, None)
    }

    fn finish(&mut self, reason: &'static str) -> String {
        self.chunk(ChatDelta::default(), None, Some(reason))
    }

    fn usage(&mut self, usage: Usage) -> String {
        self.to_json(vec![], Some(usage))
    }
}
