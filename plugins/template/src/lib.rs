//! A pushgate plugin: a publish filter that uppercases every string in a
//! message's data. Replace the hook with yours; pick another world in
//! `generate!` for other hooks (authenticator, deliver-filter, plugin).

use serde_json::Value;

wit_bindgen::generate!({
    // authenticator | publish-filter | deliver-filter | plugin
    world: "publish-filter",
    path: "wit",
});

use exports::pushgate::plugin::on_publish::Guest;
use pushgate::plugin::host;
use pushgate::plugin::types::{Message, PublishVerdict};

struct Plugin;

/// Uppercases every string value (not keys, numbers, `true`, `null`).
fn shout(value: &mut Value) {
    match value {
        Value::String(text) => *text = text.to_uppercase(),
        Value::Array(items) => items.iter_mut().for_each(shout),
        Value::Object(fields) => fields.values_mut().for_each(shout),
        _ => {}
    }
}

impl Guest for Plugin {
    fn on_publish(message: Message) -> PublishVerdict {
        // `data` is JSON text: parse it, change it, write it back. (Text
        // changed as text would break escapes, `true`, `null`, keys.)
        let Ok(mut data) = serde_json::from_str::<Value>(&message.data) else {
            return PublishVerdict::Pass;
        };
        shout(&mut data);
        host::log(host::Level::Debug, &format!("shouted {}", message.id));
        PublishVerdict::Replace(data.to_string())
    }
}

export!(Plugin);
