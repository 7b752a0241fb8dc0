//! A plugin that misbehaves on request, for the gateway's containment
//! tests: a message (or a handshake query) containing `trap` panics,
//! `loop` never returns, `bomb` allocates memory until it is stopped. With
//! `at-delivery` in it, a message misbehaves only in `on-deliver`.
//! Anything else passes; a handshake is admitted as the `user` parameter.

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
        let user = query_param(&request.query, "user").ok_or(Rejection {
            status: 401,
            reason: "user required".to_owned(),
        })?;
        Ok(Identity {
            user,
            topics: Vec::new(),
            metadata: Vec::new(),
        })
    }
}

impl on_publish::Guest for Misbehave {
    fn on_publish(message: Message) -> PublishVerdict {
        if !message.data.contains("at-delivery") {
            misbehave_if_asked(&message.data);
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
        recipients.iter().map(|_| DeliverVerdict::Pass).collect()
    }
}

export!(Misbehave);
