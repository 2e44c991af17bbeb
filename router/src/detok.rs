//! Incremental detokenization and stop strings.
//!
//! Decoding token by token breaks multi-byte characters and word-boundary spaces, so (like vLLM
//! and TGI) we decode a short window twice: `ids[prefix..read]`, the text already emitted, and
//! `ids[prefix..]`; the new text is the difference, held back while it ends in U+FFFD (an
//! unfinished UTF-8 sequence).

/// Anything that turns token ids into text (the model tokenizer; a fake one in tests).
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> String;
}

impl Decode for crate::tokenizer::ModelTokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        crate::tokenizer::ModelTokenizer::decode(self, ids)
    }
}

/// How many prompt tokens seed the window, so the first output token decodes in context
/// (SentencePiece drops a leading space at the start of a sequence).
const PROMPT_CONTEXT: usize = 5;

pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    pub fn new(prompt: &[u32]) -> Self {
        let ids = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..].to_vec();
        let read_offset = ids.len();
        Detokenizer { ids, prefix_offset: 0, read_offset }
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, decoder: &impl Decode, id: u32) -> String {
        self.ids.push(id);
        let emitted = decoder.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = decoder.decode(&self.ids[self.prefix_offset..]);
        if full.len() <= emitted.len() || full.ends_with('\u{FFFD}') {
            return String::new();
        }
        let Some(delta) = full.get(emitted.len()..) else {
            // The window re-decoded differently (a normalizer merged across it): restart here.
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return decoder.decode(&self.ids[self.prefix_offset..]);
        };
        let delta = delta.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        delta
    }

    /// Text still held back at the end of generation (an unfinished character decodes as U+FFFD).
    pub fn flush(&mut self, decoder: &impl Decode) -> String {
        let emitted = decoder.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = decoder.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        full.get(emitted.len()..).unwrap_or_default().to_string()
    }
}

/// Finds stop strings in streamed text. Text that could be the start of a stop string is held
/// back until it is known not to be one, so the matched text is never returned.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What a piece of text produced: text safe to emit, and whether a stop string matched.
#[derive(Debug, PartialEq, Eq)]
pub struct StopScan {
    pub text: String,
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops, held: String::new() }
    }

    pub fn push(&mut self, text: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan { text: text.to_string(), stopped: false };
        }
        self.held.push_str(text);
        let first_match = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first_match {
            let text = self.held[..at].to_string();
            self.held.clear();
            return StopScan { text, stopped: true };
        }
        let keep = self.partial_match_len();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        StopScan { text, stopped: false }
    }

    /// Releases held text when generation ends without a match.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn partial_match_len(&self) -> usize {
        let held = self.held.as_str();
        self.stops
            .iter()
            .flat_map(|stop| {
                stop.char_indices()
                    .skip(1)
                    .map(|(i, _)| &stop[..i])
                    .filter(|prefix| held.ends_with(prefix))
                    .map(str::len)
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token i decodes to PIECES[i] bytes; decoding is lossy UTF-8, like byte-level BPE.
    struct Bytes;
    const PIECES: &[&[u8]] =
        &[b"Hello", b" wor", b"ld", b"\xC3", b"\xA9", b"\xE2\x82", b"\xAC", b"!", b"ST", b"OP", b" x"];

    impl Decode for Bytes {
        fn decode(&self, ids: &[u32]) -> String {
            let bytes: Vec<u8> = ids.iter().flat_map(|&i| PIECES[i as usize].iter().copied()).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    fn run(ids: &[u32]) -> Vec<String> {
        let mut d = Detokenizer::new(&[0]);
        let mut out: Vec<String> = ids.iter().map(|&i| d.push(&Bytes, i)).collect();
        out.push(d.flush(&Bytes));
        out
    }

    #[test]
    fn emits_words_incrementally() {
        assert_eq!(run(&[1, 2, 7]), vec![" wor", "ld", "!", ""]);
    }

    #[test]
    fn never_emits_broken_utf8() {
        // é = C3 A9 and € = E2 82 AC split across tokens.
        assert_eq!(run(&[3, 4, 5, 6]), vec!["", "é", "", "€", ""]);
    }

    #[test]
    fn flush_releases_an_unfinished_character() {
        assert_eq!(run(&[7, 3]), vec!["!", "", "\u{FFFD}"]);
    }

    #[test]
    fn stop_string_across_tokens_is_not_returned() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abc ST"), StopScan { text: "abc ".into(), stopped: false });
        assert_eq!(m.push("OP and more"), StopScan { text: "".into(), stopped: true });
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("x ST").text, "x ");
        assert_eq!(m.push("ART").text, "START");
        assert_eq!(m.push("ST").text, "");
        assert_eq!(m.flush(), "ST");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["world".into(), "lo".into()]);
        assert_eq!(m.push("Hello world"), StopScan { text: "Hel".into(), stopped: true });
    }

    #[test]
    fn multibyte_stop_prefixes() {
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("caf").text, "caf");
        assert_eq!(m.push("é").text, "");
        assert_eq!(m.push("!"), StopScan { text: "".into(), stopped: true });
    }

    #[test]
    fn no_stops_passes_through() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("anything"), StopScan { text: "anything".into(), stopped: false });
    }
}
