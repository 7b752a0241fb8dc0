//! Passes every message to every recipient: measures the host's own cost
//! of an `on-deliver` call.

use pushgate_plugin_sdk::wit_bindgen;

wit_bindgen::generate!({
    world: "deliver-filter",
    path: "../../../wit",
    runtime_path: "pushgate_plugin_sdk::wit_bindgen::rt",
});

use exports::pushgate::plugin::on_deliver::Guest;
use pushgate::plugin::types::{DeliverVerdict, Message, Metadata, Recipient};

struct PassThrough;

impl Guest for PassThrough {
    fn on_deliver(
        _message: Message,
        _profiles: Vec<Metadata>,
        recipients: Vec<Recipient>,
    ) -> Vec<DeliverVerdict> {
        recipients.iter().map(|_| DeliverVerdict::Pass).collect()
    }
}

export!(PassThrough);
