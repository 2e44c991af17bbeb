//! `POST /v1/completions` (the legacy API; with `echo` + `logprobs` it scores prompts).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{Map, Value};

use super::sse::{self, ChunkWriter};
use super::{response_id, unix_now};
use crate::app::{AppState, Model};
use crate::error::{ApiError, ApiJson};
use crate::generate::{self, Generation, TokenOut};
use crate::openai::{Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage};
use crate::proto::TokenLogprob;
use crate::validate;

pub async fn completions(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let model = state.model()?;
    model.check_name(req.model.as_deref())?;
    let (req, validated) = super::blocking(&state, {
        let (model, limits) = (model.clone(), state.limits.clone());
        move || {
            let validated = validate::completion(&req, &model.tokenizer, &limits);
            (req, validated)
        }
    })
    .await?;
    let prompts = validated?;
    let n = prompts[0].0.n as usize;
    let with_logprobs = prompts[0].0.logprobs.is_some();
    let echo = req.echo.unwrap_or(false);
    // choice i answers prompt i / n (OpenAI's order)
    let echoes: Vec<Option<(String, Vec<u32>)>> =
        prompts.iter().map(|(p, text)| echo.then(|| (text.clone(), p.input_ids.clone()))).collect();
    let choices =
        generate::start_choices(&state, &model, prompts.into_iter().map(|(p, _)| p).collect()).await?;
    let (id, created) = (response_id("cmpl"), unix_now());
    let writer = |index: usize| CompletionWriter {
        id: id.clone(),
        created,
        model: model.clone(),
        index: index as u32,
        echo: echoes[index / n].clone(),
        logprobs: with_logprobs.then(LegacyLogprobs::default),
    };
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let writers = choices.into_iter().enumerate().map(|(i, c)| (c, writer(i))).collect();
        return Ok(sse::respond(writers, include_usage.then(|| writer(0))));
    }
    let collected = futures_util::future::try_join_all(choices.into_iter().enumerate().map(|(i, choice)| {
        let mut w = writer(i);
        async move {
            let mut text = String::new();
            if let Some((prompt, ids)) = &w.echo {
                text.push_str(prompt);
                if let Some(lp) = w.logprobs.as_mut() {
                    lp.push_prompt(&w.model, ids, &choice.generation.prompt_logprobs);
                }
            }
            let (out, counts_prompt) = choice.collect().await?;
            text.push_str(&out.text);
            if let Some(lp) = w.logprobs.as_mut() {
                lp.push_tokens(&w.model, &out.tokens);
            }
            let choice = CompletionChoice {
                index: w.index,
                text,
                logprobs: w.logprobs.map(|lp| lp.all),
                finish_reason: Some(out.reason),
            };
            Ok::<_, ApiError>((choice, (out.usage, counts_prompt)))
        }
    }))
    .await?;
    let (out_choices, usages): (Vec<_>, Vec<_>) = collected.into_iter().unzip();
    Ok(Json(Completion {
        id,
        object: "text_completion",
        created,
        model: model.name.clone(),
        choices: out_choices,
        usage: Some(generate::total_usage(usages)),
    })
    .into_response())
}

/// Builds the legacy `{tokens, token_logprobs, top_logprobs, text_offset}` lists.
#[derive(Default)]
struct LegacyLogprobs {
    all: CompletionLogprobs,
    /// Character offset of the next token in the returned text.
    offset: usize,
}

impl LegacyLogprobs {
    fn push(
        &mut self,
        out: &mut CompletionLogprobs,
        token: String,
        logprob: Option<f32>,
        top: Option<Map<String, Value>>,
    ) {
        out.text_offset.push(self.offset);
        self.offset += token.chars().count();
        out.tokens.push(token);
        out.token_logprobs.push(logprob);
        out.top_logprobs.push(top);
    }

    /// Prompt tokens; the first has no logprob (nothing precedes it).
    fn push_prompt(&mut self, model: &Model, ids: &[u32], logprobs: &[TokenLogprob]) -> CompletionLogprobs {
        let mut part = CompletionLogprobs::default();
        for (i, &id) in ids.iter().enumerate() {
            let lp = logprobs.get(i).filter(|_| i > 0);
            let top = lp.map(|l| top_map(model, l.top.iter().map(|t| (t.token_id, t.logprob))));
            self.push(&mut part, model.tokenizer.token_text(id), lp.map(|l| l.logprob), top);
        }
        self.extend(&part);
        part
    }

    fn push_tokens(&mut self, model: &Model, tokens: &[TokenOut]) -> CompletionLogprobs {
        let mut part = CompletionLogprobs::default();
        for t in tokens {
            let top = top_map(model, t.top.iter().copied());
            self.push(&mut part, model.tokenizer.token_text(t.id), Some(t.logprob), Some(top));
        }
        self.extend(&part);
        part
    }

    fn extend(&mut self, part: &CompletionLogprobs) {
        self.all.tokens.extend(part.tokens.iter().cloned());
        self.all.token_logprobs.extend(part.token_logprobs.iter().copied());
        self.all.top_logprobs.extend(part.top_logprobs.iter().cloned());
        self.all.text_offset.extend(part.text_offset.iter().copied());
    }
}

fn top_map(model: &Model, top: impl Iterator<Item = (u32, f32)>) -> Map<String, Value> {
    top.map(|(id, logprob)| (model.tokenizer.token_text(id), Value::from(logprob))).collect()
}

struct CompletionWriter {
    id: String,
    created: u64,
    model: Arc<Model>,
    /// The choice's index.
    index: u32,
    /// The prompt text and ids, when `echo` is on.
    echo: Option<(String, Vec<u32>)>,
    logprobs: Option<LegacyLogprobs>,
}

impl CompletionWriter {
    fn chunk(
        &self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<&'static str>,
    ) -> String {
        let choice = CompletionChoice { index: self.index, text, logprobs, finish_reason: finish };
        self.to_json(vec![choice], None)
    }

    fn to_json(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> String {
        let chunk = Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.name.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }
}

impl ChunkWriter for CompletionWriter {
    fn preamble(&mut self, generation: &Generation) -> Vec<String> {
        let Some((prompt, ids)) = self.echo.clone() else { return vec![] };
        let model = self.model.clone();
        let logprobs =
            self.logprobs.as_mut().map(|lp| lp.push_prompt(&model, &ids, &generation.prompt_logprobs));
        vec![self.chunk(prompt, logprobs, None)]
    }

    fn text(&mut self, text: String, tokens: &[TokenOut]) -> Option<String> {
        let model = self.model.clone();
        let logprobs = self.logprobs.as_mut().map(|lp| lp.push_tokens(&model, tokens));
        Some(self.chunk(text, logprobs, None))
    }

    fn finish(&mut self, reason: &'static str) -> Vec<String> {
        vec![self.chunk(String::new(), None, Some(reason))]
    }

    fn usage(&mut self, usage: Usage) -> String {
        self.to_json(vec![], Some(usage))
    }
}
