//! Server-sent events for streaming responses: each choice's chunks as they come (choices interleaved),
//! an optional usage chunk, `data: [DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, StreamExt};

use crate::generate::{total_usage, Choice, Event, Generation, TokenOut};
use crate::openai::Usage;

/// Formats one choice's chunks (of one endpoint) as JSON strings.
pub trait ChunkWriter: Send + 'static {
    /// Chunks sent before any generated text (chat: the role; completions with echo: the prompt).
    fn preamble(&mut self, generation: &Generation) -> Vec<String>;
    /// The chunk for new text, or none while the writer holds it back (a tool call may be starting).
    fn text(&mut self, text: String, tokens: &[TokenOut]) -> Option<String>;
    /// The last chunks: what was held back, then the finish reason.
    fn finish(&mut self, reason: &'static str) -> Vec<String>;
    /// The usage chunk of the whole response.
    fn usage(&mut self, usage: Usage) -> String;
}

/// What a choice's stream yields: frames to send, and at its end its usage.
enum Piece {
    Frame(String),
    Usage(Usage, bool),
}

/// Streams choices (each with its writer) into one SSE response, then, with `usage_writer`, the usage
/// chunk of the whole response. Everything lives in the body: a client that goes away drops every
/// generation, which aborts them on the workers.
pub fn respond<W: ChunkWriter>(choices: Vec<(Choice, W)>, usage_writer: Option<W>) -> Response {
    let streams: Vec<BoxStream<'static, Piece>> =
        choices.into_iter().map(|(choice, writer)| choice_stream(choice, writer).boxed()).collect();
    let merge = Merge { choices: stream::select_all(streams), usages: Vec::new(), usage_writer, tail: None };
    let frames = stream::unfold(merge, |mut m| async move {
        loop {
            if let Some(tail) = m.tail.as_mut() {
                return tail.pop().map(|frame| (frame, m));
            }
            match m.choices.next().await {
                Some(Piece::Frame(frame)) => return Some((frame, m)),
                Some(Piece::Usage(usage, counts_prompt)) => m.usages.push((usage, counts_prompt)),
                None => {
                    // every choice has ended: the usage chunk (if asked for), then the end marker
                    let usage = total_usage(m.usages.drain(..));
                    let mut tail = vec!["[DONE]".to_string()];
                    tail.extend(m.usage_writer.as_mut().map(|w| w.usage(usage)));
                    m.tail = Some(tail);
                }
            }
        }
    });
    let events = frames.map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
    Sse::new(events).into_response()
}

struct Merge<W> {
    choices: stream::SelectAll<BoxStream<'static, Piece>>,
    usages: Vec<(Usage, bool)>,
    usage_writer: Option<W>,
    /// The last frames, in reverse order, once every choice has ended.
    tail: Option<Vec<String>>,
}

/// One choice's frames: its preamble, its text, its finish (or an error event), then its usage.
fn choice_stream<W: ChunkWriter>(choice: Choice, writer: W) -> impl futures_util::Stream<Item = Piece> {
    let Choice { generation, counts_prompt } = choice;
    stream::unfold(Some((generation, writer, false)), move |state| async move {
        let (mut generation, mut writer, started) = state?;
        let mut pieces: Vec<Piece> = Vec::new();
        if !started {
            pieces.extend(writer.preamble(&generation).into_iter().map(Piece::Frame));
        }
        let next = match generation.next().await {
            Some(Ok(Event::Text { text, tokens })) => {
                if !text.is_empty() || !tokens.is_empty() {
                    pieces.extend(writer.text(text, &tokens).map(Piece::Frame));
                }
                Some((generation, writer, true))
            }
            Some(Ok(Event::Finished { reason, usage })) => {
                pieces.extend(writer.finish(reason).into_iter().map(Piece::Frame));
                pieces.push(Piece::Usage(usage, counts_prompt));
                None
            }
            // A failure after the first token: an error event in place of the rest of this choice.
            Some(Err(e)) => {
                pieces.push(Piece::Frame(e.body().to_string()));
                None
            }
            None => return None,
        };
        Some((stream::iter(pieces), next))
    })
    .flatten()
}
