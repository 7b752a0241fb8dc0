//! Personalises each message per recipient, at delivery.
//!
//! A message whose data carries `"i18n": {"en": "...", "fr": "..."}` is
//! delivered with `"text"` set to the recipient's language (session
//! metadata `lang`, else the configuration `default_lang`, else `en`), and
//! without the `i18n` map. A message with `"visible_to": ["admin", …]` is
//! delivered only to recipients whose session metadata `role` is listed.
//! Anything else passes as it is.

use pushgate_plugin_sdk::serde_json::{self, Value};
use pushgate_plugin_sdk::{metadata, wit_bindgen};

wit_bindgen::generate!({
    world: "deliver-filter",
    path: "../../wit",
    runtime_path: "pushgate_plugin_sdk::wit_bindgen::rt",
});

use exports::pushgate::plugin::on_deliver::Guest;
use pushgate::plugin::host;
use pushgate::plugin::types::{DeliverVerdict, Message, Metadata, Recipient};

struct Personalize;

impl Guest for Personalize {
    fn on_deliver(
        message: Message,
        profiles: Vec<Metadata>,
        recipients: Vec<Recipient>,
    ) -> Vec<DeliverVerdict> {
        let pass = || recipients.iter().map(|_| DeliverVerdict::Pass).collect();
        let Ok(Value::Object(data)) = serde_json::from_str::<Value>(&message.data) else {
            return pass();
        };
        let visible_to: Option<Vec<&str>> = data
            .get("visible_to")
            .and_then(Value::as_array)
            .map(|roles| roles.iter().filter_map(Value::as_str).collect());
        let i18n = data.get("i18n").and_then(Value::as_object);
        if visible_to.is_none() && i18n.is_none() {
            return pass();
        }
        let default_lang = host::config("default_lang").unwrap_or_else(|| "en".to_owned());
        recipients
            .iter()
            .map(|recipient| {
                let session: &[(String, String)] = profiles
                    .get(recipient.profile as usize)
                    .map_or(&[], Vec::as_slice);
                if let Some(roles) = &visible_to {
                    let role = metadata(session, "role").unwrap_or("");
                    if !roles.contains(&role) {
                        return DeliverVerdict::Drop;
                    }
                }
                let Some(i18n) = i18n else {
                    return DeliverVerdict::Pass;
                };
                let lang = metadata(session, "lang").unwrap_or(&default_lang);
                let text = i18n
                    .get(lang)
                    .or_else(|| i18n.get(&default_lang))
                    .cloned()
                    .unwrap_or(Value::Null);
                let mut personal = data.clone();
                personal.remove("i18n");
                personal.remove("visible_to");
                personal.insert("text".to_owned(), text);
                DeliverVerdict::Replace(Value::Object(personal).to_string())
            })
            .collect()
    }
}

export!(Personalize);
