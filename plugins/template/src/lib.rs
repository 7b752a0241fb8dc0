//! A plugin template: a publish filter that stamps every message with the
//! time it was published. Copy this crate, rename it, pick a world, and
//! replace the hook.

use pushgate_plugin_sdk::serde_json::{self, Value, json};
use pushgate_plugin_sdk::wit_bindgen;

wit_bindgen::generate!({
    // authenticator | publish-filter | deliver-filter | plugin
    world: "publish-filter",
    path: "../../wit",
    runtime_path: "pushgate_plugin_sdk::wit_bindgen::rt",
});

use exports::pushgate::plugin::on_publish::Guest;
use pushgate::plugin::host;
use pushgate::plugin::types::{Message, PublishVerdict};

struct Template;

impl Guest for Template {
    fn on_publish(message: Message) -> PublishVerdict {
        let data: Value = serde_json::from_str(&message.data).unwrap_or(Value::Null);
        host::log(
            host::Level::Debug,
            &format!("stamping message {}", message.id),
        );
        PublishVerdict::Replace(
            json!({"data": data, "published_at": host::now_millis()}).to_string(),
        )
    }
}

export!(Template);
