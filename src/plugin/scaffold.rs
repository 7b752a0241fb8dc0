//! `pushgate plugin new NAME`: a plugin crate of its own, outside the
//! gateway's workspace — the WIT package copied in, `wit-bindgen` and
//! `serde_json` from crates.io, built for `wasm32-wasip2` by default — with
//! a publish filter that is correct for any JSON to start from.

use std::path::Path;

use super::WIT_VERSION;

/// The WIT package this host speaks, as the new crate gets it.
const WIT: &str = include_str!("../../wit/pushgate-plugin.wit");

const LIB_RS: &str = r#"//! A pushgate plugin: a publish filter that uppercases every string in a
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
        // `data` is JSON text: parse it, change it, write it back.
        let Ok(mut data) = serde_json::from_str::<Value>(&message.data) else {
            return PublishVerdict::Pass;
        };
        shout(&mut data);
        host::log(host::Level::Debug, &format!("shouted {}", message.id));
        PublishVerdict::Replace(data.to_string())
    }
}

export!(Plugin);
"#;

/// Writes the crate `name` into `dir` (which must not exist yet).
pub fn new_plugin(dir: &Path, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        return Err(format!(
            "{name:?}: a plugin name is 1 to 64 characters of a-z, 0-9, '-' and '_'"
        ));
    }
    if dir.exists() {
        return Err(format!("{} exists already", dir.display()));
    }
    let cargo_toml = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
description = "A pushgate plugin (WIT package pushgate:plugin@{WIT_VERSION})"

[lib]
crate-type = ["cdylib"]

[dependencies]
wit-bindgen = {{ version = "0.63", default-features = false, features = ["macros", "realloc", "std"] }}
serde_json = "1"

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true

# A crate of its own, even inside another workspace.
[workspace]
"#
    );
    let readme = format!(
        "# {name}\n\nA pushgate plugin. Build it, try it, upload it:\n\n```sh\n\
         rustup target add wasm32-wasip2\n\
         cargo build --release          # target/wasm32-wasip2/release/{file}.wasm\n\
         pushgate plugin try target/wasm32-wasip2/release/{file}.wasm --hook on-publish --data '{{\"text\": \"hi\"}}'\n\
         pushgate plugin upload --admin-token … --tenant … target/wasm32-wasip2/release/{file}.wasm\n```\n\n\
         The interface is `wit/pushgate-plugin.wit` (pushgate:plugin@{WIT_VERSION}).\n",
        file = name.replace('-', "_"),
    );
    let files: [(&str, &str); 5] = [
        ("Cargo.toml", &cargo_toml),
        ("README.md", &readme),
        ("src/lib.rs", LIB_RS),
        ("wit/pushgate-plugin.wit", WIT),
        (
            ".cargo/config.toml",
            "[build]\ntarget = \"wasm32-wasip2\"\n",
        ),
    ];
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
