//! A plugin that misbehaves on request, for the gateway's containment
//! tests: a message (or a handshake query) containing `trap` panics,
//! `loop` never returns, `bomb` allocates memory until it is stopped,
//! `chatty` writes a thousand forged log lines, `hoard` keeps 8 MiB for good
//! and takes 300 ms (so that calls overlap), `dawdle` takes 1.5 s, `huge`
//! replaces the message with data far over any message limit. A handshake query with `long-reason`
//! is rejected with a 10 KB reason, with `meta-flood` admitted with ten
//! thousand metadata entries. With `at-delivery` in it, a message misbehaves
//! only in `on-deliver`. Anything else passes; a handshake is admitted as
//! the `user` parameter.

use pushgate_plugin_sdk::{query_param, wit_bindgen};

wit_bindgen::generate!({
    world: "plugin",
    path: "../../../wit",
    runtime_path: "pushgate_plugin_sdk::wit_bindgen::rt",
});

use exports::pushgate::plugin::{authenticate, on_deliver, on_publish};
use pushgate::plugin::types::{
    DeliverVerdict, Handshake, Identity, Message, Metadata, PublishVerdict, Recipient, Rejection,
};

struct Misbehave;

/// What `hoard` keeps: it stays in the instance's memory between calls.
static HOARD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

fn misbehave_if_asked(text: &str) {
    if text.contains("trap") {
        panic!("asked to trap");
    }
    if text.contains("loop") {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
    if text.contains("hoard") {
        HOARD
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(std::hint::black_box(vec![1u8; 8 << 20]));
        let until = pushgate::plugin::host::now_millis() + 300;
        while pushgate::plugin::host::now_millis() < until {
            std::hint::spin_loop();
        }
    }
    if text.contains("dawdle") {
        let until = pushgate::plugin::host::now_millis() + 1_500;
        while pushgate::plugin::host::now_millis() < until {
            std::hint::spin_loop();
        }
    }
    if text.contains("chatty") {
        for n in 0..1000 {
            pushgate::plugin::host::log(
                pushgate::plugin::host::Level::Info,
                &format!("line {n}\nINFO pushgate: forged line"),
            );
        }
    }
    if text.contains("bomb") {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

impl authenticate::Guest for Misbehave {
    fn authenticate(request: Handshake) -> Result<Identity, Rejection> {
        misbehave_if_asked(&request.query);
        // A token (a refresh's comes in this header) may ask too.
        for header in &request.headers {
            if header.name.eq_ignore_ascii_case("authorization") {
                misbehave_if_asked(&header.value);
            }
        }
        if request.query.contains("long-reason") {
            return Err(Rejection {
                status: 401,
                reason: "r".repeat(10_000),
            });
        }
        let user = query_param(&request.query, "user").ok_or(Rejection {
            status: 401,
            reason: "user required".to_owned(),
        })?;
        let metadata = if request.query.contains("meta-flood") {
            (0..10_000)
                .map(|n| (format!("k{n}"), "v".to_owned()))
                .collect()
        } else {
            Vec::new()
        };
        let topics = if request.query.contains("topic-flood") {
            (0..100_000).map(|n| format!("granted.{n}.*")).collect()
        } else {
            Vec::new()
        };
        Ok(Identity {
            user,
            topics,
            metadata,
        })
    }
}

impl on_publish::Guest for Misbehave {
    fn on_publish(message: Message) -> PublishVerdict {
        if !message.data.contains("at-delivery") {
            misbehave_if_asked(&message.data);
            if message.data.contains("huge") {
                return PublishVerdict::Replace(huge_json());
            }
        }
        PublishVerdict::Pass
    }
}

impl on_deliver::Guest for Misbehave {
    fn on_deliver(
        message: Message,
        _profiles: Vec<Metadata>,
        recipients: Vec<Recipient>,
    ) -> Vec<DeliverVerdict> {
        misbehave_if_asked(&message.data);
        if message.data.contains("huge") {
            return recipients
                .iter()
                .map(|_| DeliverVerdict::Replace(huge_json()))
                .collect();
        }
        recipients.iter().map(|_| DeliverVerdict::Pass).collect()
    }
}

/// A JSON string of 1 MiB.
fn huge_json() -> String {
    format!("\"{}\"", "x".repeat(1 << 20))
}

export!(Misbehave);
