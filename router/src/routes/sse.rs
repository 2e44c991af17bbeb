//! Server-sent events for streaming responses: chunks, optional usage chunk, `data: [DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};

use crate::generate::{Event, Generation, TokenOut};
use crate::openai::Usage;

/// Formats one endpoint's chunks as JSON strings.
pub trait ChunkWriter: Send + 'static {
    /// Chunks sent before any generated text (chat: the role; completions with echo: the prompt).
    fn preamble(&mut self, generation: &Generation) -> Vec<String>;
    /// The chunk for new text, or none while the writer holds it back (a tool call may be starting).
    fn text(&mut self, text: String, tokens: &[TokenOut]) -> Option<String>;
    /// The last chunks: what was held back, then the finish reason.
    fn finish(&mut self, reason: &'static str) -> Vec<String>;
    fn usage(&mut self, usage: Usage) -> String;
}

struct Stream<W> {
    generation: Generation,
    writer: W,
    include_usage: bool,
    pending: VecDeque<String>,
    started: bool,
    done: bool,
}

pub fn respond(generation: Generation, writer: impl ChunkWriter, include_usage: bool) -> Response {
    let stream =
        Stream { generation, writer, include_usage, pending: VecDeque::new(), started: false, done: false };
    let events = futures_util::stream::unfold(stream, |mut s| async move {
        let data = s.next_frame().await?;
        Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s))
    });
    Sse::new(events).into_response()
}

impl<W: ChunkWriter> Stream<W> {
    async fn next_frame(&mut self) -> Option<String> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            if self.done {
                return None;
            }
            if !self.started {
                self.started = true;
                self.pending.extend(self.writer.preamble(&self.generation));
                continue;
            }
            match self.generation.next().await {
                Some(Ok(Event::Text { text, tokens })) => {
                    if !text.is_empty() || !tokens.is_empty() {
                        self.pending.extend(self.writer.text(text, &tokens));
                    }
                }
                Some(Ok(Event::Finished { reason, usage })) => {
                    self.pending.extend(self.writer.finish(reason));
                    if self.include_usage {
                        self.pending.push_back(self.writer.usage(usage));
                    }
                    self.end();
                }
                // A failure after the first token: an error event, then the usual end marker.
                Some(Err(e)) => {
                    self.pending.push_back(e.body().to_string());
                    self.end();
                }
                None => self.end(),
            }
        }
    }

    fn end(&mut self) {
        self.pending.push_back("[DONE]".to_string());
        self.done = true;
    }
}
