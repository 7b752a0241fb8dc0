//! Drops or masks messages that contain words from the tenant's plugin
//! configuration, once per message at publish.
//!
//! Configuration: `words` (comma-separated, matched case-insensitively in
//! every string of the message data), `mode` = `drop` (default) or `mask`
//! (each matched word becomes `*`s).

use pushgate_plugin_sdk::serde_json::{self, Value};
use pushgate_plugin_sdk::{list, wit_bindgen};

wit_bindgen::generate!({
    world: "publish-filter",
    path: "../../wit",
    runtime_path: "pushgate_plugin_sdk::wit_bindgen::rt",
});

use exports::pushgate::plugin::on_publish::Guest;
use pushgate::plugin::host;
use pushgate::plugin::types::{Message, PublishVerdict};

struct KeywordFilter;

/// Masks every occurrence of `word` (ASCII case-insensitive) in `text`.
fn mask(text: &str, word: &str) -> (String, bool) {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut rest = 0;
    let mut found = false;
    while let Some(at) = lower[rest..].find(word) {
        let start = rest + at;
        out.push_str(&text[rest..start]);
        out.extend(std::iter::repeat_n('*', word.chars().count()));
        rest = start + word.len();
        found = true;
    }
    out.push_str(&text[rest..]);
    (out, found)
}

/// Masks `words` in every string of `value`; true if any was found.
fn mask_value(value: &mut Value, words: &[String]) -> bool {
    match value {
        Value::String(text) => {
            let mut found = false;
            for word in words {
                let (masked, hit) = mask(text, word);
                *text = masked;
                found |= hit;
            }
            found
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |f, v| mask_value(v, words) | f),
        Value::Object(fields) => fields
            .values_mut()
            .fold(false, |f, v| mask_value(v, words) | f),
        _ => false,
    }
}

impl Guest for KeywordFilter {
    fn on_publish(message: Message) -> PublishVerdict {
        let words: Vec<String> = list(host::config("words"))
            .into_iter()
            .map(|w| w.to_ascii_lowercase())
            .collect();
        if words.is_empty() {
            return PublishVerdict::Pass;
        }
        let Ok(mut data) = serde_json::from_str::<Value>(&message.data) else {
            return PublishVerdict::Pass;
        };
        if !mask_value(&mut data, &words) {
            return PublishVerdict::Pass;
        }
        match host::config("mode").as_deref() {
            Some("mask") => PublishVerdict::Replace(data.to_string()),
            _ => PublishVerdict::Drop("message contains a blocked word".to_owned()),
        }
    }
}

export!(KeywordFilter);
