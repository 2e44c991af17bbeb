//! OpenAI tools: the definitions checked and given to the chat template (or, for a template that does not
//! take `tools`, described in a Hermes-style system message), `tool_choice` "required" or a named function
//! enforced with a JSON-schema grammar, and the model's tool-call syntax parsed back into `tool_calls`:
//! Hermes / Qwen `<tool_call>{...}</tool_call>` blocks, or a whole answer that is one JSON call (Llama 3
//! JSON style, and what the forcing grammar produces).

use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::proto::grammar::Kind;
use crate::proto::Grammar;

pub const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// What a request's `tools` and `tool_choice` ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// The `tools` entries as given, each `{"type": "function", "function": {name, description?, parameters?}}`.
    pub defs: Vec<Value>,
    pub choice: Choice,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    Auto,
    Required,
    Named(String),
}

/// A parsed call, as `tool_calls` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

/// Checks `tools` and `tool_choice`; None when no tool can be called (none given, or `tool_choice: "none"`).
pub fn from_request(tools: Option<&Value>, choice: Option<&Value>) -> Result<Option<Tools>, ApiError> {
    let bad = |param: &str, m: String| ApiError::invalid_param(param, m);
    let defs = match tools {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(defs)) => defs.clone(),
        Some(_) => return Err(bad("tools", "tools must be a list".into())),
    };
    let mut names = Vec::new();
    for def in &defs {
        let name = def.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
        match (def.get("type").and_then(Value::as_str), name) {
            (Some("function"), Some(name)) if !name.is_empty() && !names.contains(&name) => names.push(name),
            _ => {
                return Err(bad("tools", "each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}} with a unique name".into()))
            }
        }
        let params = def["function"].get("parameters");
        if params.is_some_and(|p| !p.is_object()) {
            return Err(bad("tools", format!("the parameters of {name:?} must be a JSON schema object")));
        }
    }
    let choice = match choice {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(Value::String(s)) if s == "auto" => Choice::Auto,
        Some(Value::String(s)) if s == "required" => Choice::Required,
        Some(v) => match v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
                if !names.contains(&name) {
                    return Err(bad("tool_choice", format!("tool_choice names {name:?}, which is not in tools")));
                }
                Choice::Named(name.to_string())
            }
            _ => {
                return Err(bad(
                    "tool_choice",
                    "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}"
                        .into(),
                ))
            }
        },
    };
    if defs.is_empty() {
        return match choice {
            Choice::Auto => Ok(None),
            _ => Err(bad("tool_choice", "tool_choice requires tools".into())),
        };
    }
    Ok(Some(Tools { defs, choice }))
}

impl Tools {
    /// The grammar that makes the answer one call (`{"name": ..., "arguments": {...}}`) when the request
    /// requires one: any tool for "required", that one for a named choice.
    pub fn forced_grammar(&self) -> Option<Grammar> {
        let call = |def: &Value| {
            let f = &def["function"];
            let params = f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}));
            json!({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                   "required": ["name", "arguments"], "additionalProperties": false})
        };
        let schema = match &self.choice {
            Choice::Auto => return None,
            Choice::Required => json!({"anyOf": self.defs.iter().map(call).collect::<Vec<_>>()}),
            Choice::Named(name) => call(self.defs.iter().find(|d| d["function"]["name"] == name.as_str())?),
        };
        Some(Grammar { kind: Kind::JsonSchema as i32, spec: schema.to_string(), strict: true })
    }

    /// For a chat template that ignores `tools`: the tools described in a system message, in the Hermes
    /// format the parser reads back.
    pub fn system_prompt(&self) -> String {
        let defs: Vec<String> = self.defs.iter().map(|d| d["function"].to_string()).collect();
        format!(
            "You can call these functions. Their signatures, as JSON schemas, are inside <tools></tools>:\n\
             <tools>\n{}\n</tools>\n\
             To call one, answer with a JSON object holding its name and arguments inside \
             <tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
            defs.join("\n")
        )
    }
}

/// The answer's text outside its calls (None when nothing else was said) and the calls, or the text as
/// it is when it holds no well-formed call.
pub fn parse_calls(text: &str) -> (Option<String>, Vec<ToolCall>) {
    let as_is = || (Some(text.to_string()), vec![]);
    if let Some(calls) = whole_json_calls(text.trim()) {
        return (None, calls);
    }
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(CALL_OPEN) {
        content.push_str(&rest[..start]);
        let body = &rest[start + CALL_OPEN.len()..];
        let Some(end) = body.find(CALL_CLOSE) else { return as_is() };
        match serde_json::from_str::<Value>(body[..end].trim()).ok().and_then(|v| call_of(&v)) {
            Some(call) => calls.push(call),
            None => return as_is(),
        }
        rest = &body[end + CALL_CLOSE.len()..];
    }
    if calls.is_empty() {
        return as_is();
    }
    content.push_str(rest);
    let content = content.trim();
    (if content.is_empty() { None } else { Some(content.to_string()) }, calls)
}

/// A whole answer that is one call object or a list of them.
fn whole_json_calls(text: &str) -> Option<Vec<ToolCall>> {
    match serde_json::from_str::<Value>(text).ok()? {
        Value::Array(items) if !items.is_empty() => items.iter().map(call_of).collect(),
        v @ Value::Object(_) => Some(vec![call_of(&v)?]),
        _ => None,
    }
}

/// `{"name": ..., "arguments" | "parameters": {...}}` as a call.
fn call_of(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args =
        v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or(Value::Object(Map::new()));
    let arguments = match args {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// Chat history as templates take it: the `arguments` of an assistant's `tool_calls` as objects (HF templates
/// print them with `tojson`), or, for a template that ignores tools, calls and results written as text in the
/// format of `Tools::system_prompt`.
pub fn history_for_template(message: &mut Map<String, Value>, template_takes_tools: bool) {
    let calls = message.get("tool_calls").and_then(Value::as_array).cloned().unwrap_or_default();
    if template_takes_tools {
        let parsed: Vec<Value> = calls
            .into_iter()
            .map(|mut call| {
                if let Some(args) = call.pointer_mut("/function/arguments") {
                    if let Some(obj) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
                        *args = obj;
                    }
                }
                call
            })
            .collect();
        if !parsed.is_empty() {
            message.insert("tool_calls".into(), Value::Array(parsed));
        }
        return;
    }
    let mut text = message.get("content").and_then(Value::as_str).unwrap_or_default().to_string();
    for call in &calls {
        let f = &call["function"];
        let args = f["arguments"].as_str().and_then(|s| serde_json::from_str::<Value>(s).ok());
        let body = json!({"name": f["name"], "arguments": args.unwrap_or_else(|| f["arguments"].clone())});
        text.push_str(&format!("{CALL_OPEN}\n{body}\n{CALL_CLOSE}"));
    }
    if message.get("role").and_then(Value::as_str) == Some("tool") {
        message.insert("role".into(), Value::String("user".into()));
        text = format!("<tool_response>\n{text}\n</tool_response>");
    }
    message.remove("tool_calls");
    message.insert("content".into(), Value::String(text));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn choices_and_their_errors() {
        let tools = weather();
        assert_eq!(from_request(Some(&tools), None).unwrap().unwrap().choice, Choice::Auto);
        assert_eq!(from_request(Some(&tools), Some(&json!("none"))).unwrap(), None);
        assert_eq!(from_request(None, Some(&json!("auto"))).unwrap(), None);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = from_request(Some(&tools), Some(&named)).unwrap().unwrap();
        assert_eq!(t.choice, Choice::Named("get_weather".into()));
        let grammar: Value = serde_json::from_str(&t.forced_grammar().unwrap().spec).unwrap();
        assert_eq!(grammar["properties"]["name"]["const"], "get_weather");
        let other = json!({"type": "function", "function": {"name": "nope"}});
        assert_eq!(
            from_request(Some(&tools), Some(&other)).unwrap_err().param.as_deref(),
            Some("tool_choice")
        );
        assert!(from_request(None, Some(&json!("required"))).is_err());
        assert!(from_request(Some(&json!([{"type": "function"}])), None).is_err());
        assert!(from_request(Some(&json!([{"type": "code"}])), None).is_err());
    }

    #[test]
    fn hermes_blocks_and_whole_json_calls_parse() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, calls) = parse_calls(text);
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls, [ToolCall { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() }]);
        let (content, calls) = parse_calls(r#" {"name": "get_weather", "parameters": {"city": "Rome"}} "#);
        assert_eq!((content, calls[0].arguments.as_str()), (None, r#"{"city":"Rome"}"#));
        for plain in [
            "Paris.",
            "<tool_call>{\"name\": 1}</tool_call>",
            "<tool_call>{\"name\": \"f\"}",
            "[]",
            "{\"a\": 1}",
        ] {
            assert_eq!(parse_calls(plain), (Some(plain.to_string()), vec![]), "{plain}");
        }
    }

    #[test]
    fn history_round_trips_for_both_kinds_of_template() {
        let call = json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]});
        let mut m = call.as_object().unwrap().clone();
        history_for_template(&mut m, true);
        assert_eq!(m["tool_calls"][0]["function"]["arguments"]["city"], "Paris");
        let mut m = call.as_object().unwrap().clone();
        m.insert("content".into(), json!(""));
        history_for_template(&mut m, false);
        let text = m["content"].as_str().unwrap();
        assert_eq!(parse_calls(text).1[0].name, "get_weather");
        let mut result =
            json!({"role": "tool", "tool_call_id": "c1", "content": "18 C"}).as_object().unwrap().clone();
        history_for_template(&mut result, false);
        assert_eq!(
            (result["role"].as_str(), result["content"].as_str()),
            (Some("user"), Some("<tool_response>\n18 C\n</tool_response>"))
        );
    }
}
