//! The model's tokenizer and chat template, both taken from the worker's `Info` reply.

use minijinja::{Environment, ErrorKind, Value as JinjaValue};
use serde_json::{Map, Value};

use crate::proto::InfoReply;

/// A template used when the model ships none: plain "role: content" lines.
const FALLBACK_TEMPLATE: &str = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}\
{% if add_generation_prompt %}assistant: {% endif %}";

pub struct ModelTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// The worker's tokenizer JSON as received, served at `/v1/tokenizer` for clients that
    /// must count tokens exactly (load tests build prompts of a given length with it).
    pub json: String,
    templates: Environment<'static>,
    bos_token: String,
    eos_token: String,
    pub context_length: u32,
    pub vocab_size: u32,
    /// The chat template reads `tools` (HF templates that support tool calling do).
    pub template_takes_tools: bool,
}

impl ModelTokenizer {
    pub fn from_info(info: &InfoReply) -> Result<Self, String> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(info.tokenizer_json.as_bytes())
            .map_err(|e| format!("worker sent an unreadable tokenizer: {e}"))?;
        let source =
            if info.chat_template.trim().is_empty() { FALLBACK_TEMPLATE } else { &info.chat_template };
        let templates =
            chat_environment(source.to_string()).map_err(|e| format!("bad chat template: {e}"))?;
        Ok(ModelTokenizer {
            tokenizer,
            json: info.tokenizer_json.clone(),
            templates,
            bos_token: info.bos_token.clone(),
            eos_token: info.eos_token.clone(),
            context_length: info.context_length,
            vocab_size: info.vocab_size,
            template_takes_tools: source.contains("tools"),
        })
    }

    /// Renders messages the way HF `apply_chat_template(..., add_generation_prompt=True)` does.
    pub fn render_chat(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        kwargs: Option<&Map<String, Value>>,
    ) -> Result<String, String> {
        let mut ctx = kwargs.cloned().unwrap_or_default();
        ctx.insert("messages".into(), Value::Array(messages.to_vec()));
        if let Some(tools) = tools {
            ctx.insert("tools".into(), Value::Array(tools.to_vec()));
        }
        ctx.entry("add_generation_prompt").or_insert(Value::Bool(true));
        ctx.insert("bos_token".into(), Value::String(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Value::String(self.eos_token.clone()));
        let template = self.templates.get_template("chat").map_err(|e| e.to_string())?;
        template.render(JinjaValue::from(minijinja::value::Serde(&ctx))).map_err(|e| match e.kind() {
            // raise_exception() carries a message written for the user.
            ErrorKind::InvalidOperation => e.detail().unwrap_or("chat template error").to_string(),
            _ => format!("chat template error: {e}"),
        })
    }

    /// Tokenizes a rendered chat (special tokens are already in the text, as in HF).
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>, String> {
        self.encode(text, false)
    }

    /// Tokenizes a raw completion prompt, adding BOS etc. as the tokenizer's post-processor says.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, String> {
        self.encode(text, true)
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        let encoding =
            self.tokenizer.encode(text, add_special_tokens).map_err(|e| format!("tokenizer: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, dropping special tokens (so EOS never shows in output).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// The text of one token as it appears in logprobs (special tokens included).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

fn chat_environment(source: String) -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    // HF renders chat templates with trim_blocks and lstrip_blocks on.
    env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
    // Python string/dict methods (`.strip()`, `.items()`, ...) used by HF templates.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<JinjaValue, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned("chat", source)?;
    Ok(env)
}

/// `strftime_now(fmt)` as HF provides it (Llama 3 templates print today's date). Only the
/// common date directives are supported; this avoids a date-time dependency.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month_name = MONTHS[(month - 1) as usize];
    format
        .replace("%Y", &year.to_string())
        .replace("%m", &format!("{month:02}"))
        .replace("%d", &format!("{day:02}"))
        .replace("%B", month_name)
        .replace("%b", &month_name[..3])
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A tiny word-level tokenizer, enough to exercise the router without a real model.
    pub fn test_tokenizer_json() -> String {
        let words = [
            "<unk>",
            "<s>",
            "</s>",
            "Hello",
            "world",
            "!",
            "The",
            "capital",
            "is",
            "Paris",
            ".",
            "<|im_start|>",
            "<|im_end|>",
            "user",
            "assistant",
            "\n",
            "What",
            "?",
            "héllo",
            "STOP",
            "a",
            "b",
            "c",
        ];
        let vocab: Map<String, Value> =
            words.iter().enumerate().map(|(i, w)| (w.to_string(), json!(i))).collect();
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false,
                 "normalized": false, "special": true},
                {"id": 11, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false,
                 "normalized": false, "special": true},
                {"id": 12, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false,
                 "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        })
        .to_string()
    }

    pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + \
        message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}\
        {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    pub fn test_info() -> InfoReply {
        InfoReply {
            model_id: "test-model".into(),
            tokenizer_json: test_tokenizer_json(),
            chat_template: CHATML.into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
            eos_token_ids: vec![2],
            context_length: 64,
            kv_format: "int4-bdr:b32+center+scale+s4+w16".into(),
            kv_capacity_tokens: 1000,
            page_size: 16,
            vocab_size: 23,
            device: "cpu".into(),
            bos_token_id: Some(1),
            kv_bytes_per_token: 4320,
            kv_window_bytes_per_request: 491520,
        }
    }

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let tok = ModelTokenizer::from_info(&test_info()).unwrap();
        let messages = vec![
            json!({"role": "system", "content": "Be brief. "}),
            json!({"role": "user", "content": "Hi"}),
        ];
        let text = tok.render_chat(&messages, None, None).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn kwargs_reach_the_template_and_raise_exception_is_a_user_error() {
        let mut info = test_info();
        info.chat_template = "{% if enable_thinking %}T{% endif %}{% if messages[0]['role'] != 'user' %}\
            {{ raise_exception('first message must be from the user') }}{% endif %}{{ messages[0]['content'].strip() }}"
            .into();
        let tok = ModelTokenizer::from_info(&info).unwrap();
        let kwargs: Map<String, Value> = [("enable_thinking".to_string(), json!(true))].into_iter().collect();
        let user = vec![json!({"role": "user", "content": "  hi  "})];
        assert_eq!(tok.render_chat(&user, None, Some(&kwargs)).unwrap(), "Thi");
        let err = tok.render_chat(&[json!({"role": "assistant", "content": "x"})], None, None).unwrap_err();
        assert_eq!(err, "first message must be from the user");
    }

    #[test]
    fn hf_whitespace_rules_apply() {
        let mut info = test_info();
        info.chat_template =
            "{% for m in messages %}\n    {% if true %}\n{{ m['content'] }}\n    {% endif %}\n{% endfor %}"
                .into();
        let tok = ModelTokenizer::from_info(&info).unwrap();
        let text = tok.render_chat(
            &[json!({"role": "user", "content": "x"}), json!({"role": "user", "content": "y"})],
            None,
            None,
        );
        assert_eq!(text.unwrap(), "x\ny\n");
    }

    /// Qwen3's template shape: namespace, reversed slices, `is string`, Python string methods,
    /// `enable_thinking` from chat_template_kwargs. Expected text rendered by Python's jinja2.
    #[test]
    fn renders_a_qwen3_style_template_like_jinja2() {
        let mut info = test_info();
        info.chat_template = include_str!("../testdata/qwen3_chat_template.jinja").into();
        let tok = ModelTokenizer::from_info(&info).unwrap();
        let messages = vec![
            json!({"role": "system", "content": "S"}),
            json!({"role": "user", "content": "Q1"}),
            json!({"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA1"}),
            json!({"role": "user", "content": "Q2"}),
        ];
        let kwargs: Map<String, Value> =
            [("enable_thinking".to_string(), json!(false))].into_iter().collect();
        assert_eq!(
            tok.render_chat(&messages, None, Some(&kwargs)).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n\
             <|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
    }

    #[test]
    fn encodes_and_decodes_without_specials() {
        let tok = ModelTokenizer::from_info(&test_info()).unwrap();
        let ids = tok.encode_prompt("Hello world !").unwrap();
        assert_eq!(ids, vec![3, 4, 5]);
        assert_eq!(tok.decode(&[3, 4, 2]), "Hello world");
        assert_eq!(tok.token_text(2), "</s>");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
