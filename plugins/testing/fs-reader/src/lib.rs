//! A publish filter that tries to read a host file: it imports
//! `wasi:filesystem`, which the gateway must refuse at upload.

use pushgate_plugin_sdk::wit_bindgen;

wit_bindgen::generate!({
    world: "publish-filter",
    path: "../../../wit",
    runtime_path: "pushgate_plugin_sdk::wit_bindgen::rt",
});

use exports::pushgate::plugin::on_publish::Guest;
use pushgate::plugin::types::{Message, PublishVerdict};

struct FsReader;

impl Guest for FsReader {
    fn on_publish(_message: Message) -> PublishVerdict {
        match std::fs::read_to_string("/etc/passwd") {
            Ok(text) => PublishVerdict::Replace(format!("{:?}", text)),
            Err(_) => PublishVerdict::Pass,
        }
    }
}

export!(FsReader);
