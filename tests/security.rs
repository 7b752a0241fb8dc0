//! Who may connect: the built-in JWT authenticator (HS256 and ES256, token
//! in a header, a subprotocol or the query) and the Origin allow-list.

mod support;

use futures_util::StreamExt;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use support::{Client, TestNode};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const SECRET: &str = "a-test-secret-of-reasonable-length";

fn now() -> u64 {
    support::now_secs()
}

fn hs256(claims: &Value, secret: &str) -> String {
    support::token(Algorithm::HS256, secret, claims)
}

fn es256(claims: &Value, private_pem: &str) -> String {
    support::token(Algorithm::ES256, private_pem, claims)
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

async fn node() -> TestNode {
    let public_pem = fixture("es256-public.pem");
    TestNode::start(&format!(
        r#"
[tenants.hs]
push_keys = ["hs-key"]
auth = "jwt"
[tenants.hs.jwt]
algorithm = "HS256"
secret = "{SECRET}"
metadata_claims = ["lang"]
[tenants.hs.subscriptions]
allow = ["orders.{{user}}"]

[tenants.brief]
push_keys = ["brief-key"]
auth = "jwt"
[tenants.brief.jwt]
algorithm = "HS256"
secret = "{SECRET}"
leeway_secs = 0

[tenants.es]
push_keys = ["es-key"]
auth = "jwt"
allowed_origins = ["https://shop.example"]
[tenants.es.jwt]
algorithm = "ES256"
public_key_pem = """
{public_pem}"""
issuer = "https://login.shop.example"
"#
    ))
    .await
}

/// Opens `/ws/{tenant}` with `request` tweaks; Ok(client, selected
/// subprotocol) or Err(HTTP status of the refusal).
async fn open(
    node: &TestNode,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Result<(Client, Option<String>), u16> {
    let mut request = format!("{}{path}", node.ws_base)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, HeaderValue::from_str(value).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, response)) => {
            let protocol = response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_owned());
            Ok((Client { socket }, protocol))
        }
        Err(WsError::Http(response)) => Err(response.status().as_u16()),
        Err(other) => panic!("unexpected handshake error {other}"),
    }
}

#[tokio::test]
async fn a_valid_hs256_token_admits_its_subject_with_its_topics() {
    let node = node().await;
    let token = hs256(
        &json!({"sub": "alice", "exp": now() + 600, "topics": ["news"], "lang": "fr"}),
        SECRET,
    );

    // In the query (browsers), in a header (apps), in a subprotocol.
    let (mut by_query, _) = open(&node, &format!("/ws/hs?token={token}"), &[])
        .await
        .unwrap();
    let bearer = format!("Bearer {token}");
    let (mut by_header, _) = open(&node, "/ws/hs", &[("authorization", &bearer)])
        .await
        .unwrap();
    let offered = format!("pushgate.v1, bearer.{token}");
    let (mut by_protocol, selected) =
        open(&node, "/ws/hs", &[("sec-websocket-protocol", &offered)])
            .await
            .unwrap();
    assert_eq!(selected.as_deref(), Some("pushgate.v1"));
    node.wait_for(|n| n.sessions().tenant_connections("hs") == 3)
        .await;

    node.push(
        "hs-key",
        json!({"topic": "news", "data": "topic from the token"}),
    )
    .await;
    node.push("hs-key", json!({"users": ["alice"], "data": "to alice"}))
        .await;
    for client in [&mut by_query, &mut by_header, &mut by_protocol] {
        assert_eq!(client.next_data().await, "topic from the token");
        assert_eq!(client.next_data().await, "to alice");
    }
    let mut metadata = None;
    node.node().sessions().for_each_of_user("hs", "alice", |c| {
        metadata = Some(c.metadata().clone());
    });
    assert_eq!(
        metadata.unwrap().get("lang").map(String::as_str),
        Some("fr")
    );
    node.shutdown().await;
}

#[tokio::test]
async fn forged_expired_and_missing_tokens_are_refused_with_401_and_no_session() {
    let node = node().await;
    let cases = [
        ("missing", None),
        (
            "wrong secret",
            Some(hs256(
                &json!({"sub": "mallory", "exp": now() + 600}),
                "another-secret",
            )),
        ),
        (
            "expired",
            Some(hs256(
                &json!({"sub": "mallory", "exp": now() - 3600}),
                SECRET,
            )),
        ),
        ("no exp", Some(hs256(&json!({"sub": "mallory"}), SECRET))),
        ("no sub", Some(hs256(&json!({"exp": now() + 600}), SECRET))),
        (
            "not yet valid",
            Some(hs256(
                &json!({"sub": "mallory", "exp": now() + 7200, "nbf": now() + 3600}),
                SECRET,
            )),
        ),
        (
            "another algorithm",
            Some(es256(
                &json!({"sub": "mallory", "exp": now() + 600}),
                &fixture("es256-private.pem"),
            )),
        ),
        ("garbage", Some("not.a.token".to_owned())),
    ];
    for (what, token) in cases {
        let path = match &token {
            Some(token) => format!("/ws/hs?token={token}"),
            None => "/ws/hs".to_owned(),
        };
        assert_eq!(open(&node, &path, &[]).await.err(), Some(401), "{what}");
    }
    assert_eq!(node.node().sessions().tenant_connections("hs"), 0);
    let (_, metrics) = node.get_text("/metrics").await;
    assert!(
        support::metric_value(
            &metrics,
            "pushgate_handshakes_total",
            &["tenant=\"hs\"", "outcome=\"unauthorized\""]
        ) >= 8.0
    );
    node.shutdown().await;
}

#[tokio::test]
async fn es256_tokens_verify_against_the_tenants_public_key_and_issuer() {
    let node = node().await;
    let claims = json!({"sub": "bob", "exp": now() + 600, "iss": "https://login.shop.example"});
    let good = es256(&claims, &fixture("es256-private.pem"));
    let (mut bob, _) = open(&node, &format!("/ws/es?token={good}"), &[])
        .await
        .unwrap();
    node.wait_for(|n| n.sessions().tenant_connections("es") == 1)
        .await;
    node.push("es-key", json!({"users": ["bob"], "data": "hi bob"}))
        .await;
    assert_eq!(bob.next_data().await, "hi bob");

    let other_key = es256(&claims, &fixture("es256-other-private.pem"));
    assert_eq!(
        open(&node, &format!("/ws/es?token={other_key}"), &[])
            .await
            .err(),
        Some(401)
    );
    let other_issuer = es256(
        &json!({"sub": "bob", "exp": now() + 600, "iss": "https://evil.example"}),
        &fixture("es256-private.pem"),
    );
    assert_eq!(
        open(&node, &format!("/ws/es?token={other_issuer}"), &[])
            .await
            .err(),
        Some(401)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn an_origin_outside_the_tenants_list_is_refused() {
    let node = node().await;
    let token = es256(
        &json!({"sub": "carol", "exp": now() + 600, "iss": "https://login.shop.example"}),
        &fixture("es256-private.pem"),
    );
    let path = format!("/ws/es?token={token}");
    assert_eq!(
        open(&node, &path, &[("origin", "https://evil.example")])
            .await
            .err(),
        Some(403)
    );
    assert!(
        open(&node, &path, &[("origin", "https://shop.example")])
            .await
            .is_ok()
    );
    // Not a browser: no Origin, not affected.
    assert!(open(&node, &path, &[]).await.is_ok());
    node.shutdown().await;
}

#[test]
fn a_bad_key_in_the_configuration_is_refused_at_start_naming_the_field() {
    // What only a started node builds (authenticators, TLS) is checked
    // by the same function the node starts with.
    let refused = |toml: &str| match pushgate::Config::from_toml(toml) {
        Err(err) => err.to_string(),
        Ok(config) => pushgate::node::check(&config).unwrap_err().to_string(),
    };
    let err = refused(
        "[tenants.x]\nauth = \"jwt\"\n[tenants.x.jwt]\nalgorithm = \"ES256\"\npublic_key_pem = \"nope\"",
    );
    assert!(
        err.to_string().contains("tenants.x.jwt.public_key_pem"),
        "{err}"
    );
    let err = refused("[tenants.x]\nauth = \"jwt\"");
    assert!(err.to_string().contains("[tenants.x.jwt]"), "{err}");
    let err = refused(
        "[listen.tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"",
    );
    assert!(err.to_string().contains("listen.tls.cert_file"), "{err}");
}

#[tokio::test]
async fn a_tls_client_connects_with_the_test_certificate() {
    use std::sync::Arc;
    use tokio_rustls::rustls;

    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&cert_file, certified.cert.pem()).unwrap();
    std::fs::write(&key_file, certified.signing_key.serialize_pem()).unwrap();
    let mut config = support::config("");
    config.listen.tls = Some(pushgate::config::TlsConfig {
        cert_file,
        key_file,
    });
    let node = TestNode::start_with(config).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let client_config: rustls::ClientConfig = rustls::ClientConfig::builder_with_provider(
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(node.node().public_addr())
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config.clone()))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake with the test certificate");
    let (mut socket, _) =
        tokio_tungstenite::client_async("wss://localhost/ws/acme?user=secure", tls)
            .await
            .expect("WebSocket over TLS");
    node.wait_for(|n| n.sessions().tenant_connections("acme") == 1)
        .await;
    node.push("acme-key", json!({"users": ["secure"], "data": "over TLS"}))
        .await;
    let frame = loop {
        let message = tokio::time::timeout(support::PATIENCE, socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            break serde_json::from_str::<Value>(&text).unwrap();
        }
    };
    assert_eq!(frame["data"], "over TLS");

    // An event stream over TLS too (served by hyper there).
    let tcp = tokio::net::TcpStream::connect(node.node().public_addr())
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET /sse/acme?user=streamer HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut received = String::new();
    while !received.contains("\"type\":\"hello\"") {
        let mut chunk = [0u8; 1024];
        let read = tokio::time::timeout(support::PATIENCE, tls.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(read > 0, "the stream ended: {received}");
        received.push_str(&String::from_utf8_lossy(&chunk[..read]));
    }
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    assert!(received.contains("text/event-stream"), "{received}");

    // A client that does not speak TLS gets no WebSocket.
    let plain = tokio_tungstenite::connect_async(format!(
        "ws://{}/ws/acme?user=plain",
        node.node().public_addr()
    ))
    .await;
    assert!(plain.is_err());
    node.shutdown().await;
}

#[tokio::test]
async fn a_client_reads_only_the_topics_it_is_allowed_and_one_that_insists_is_closed() {
    let node = node().await;
    let connect = |claims: Value| {
        let token = hs256(&claims, SECRET);
        let node = &node;
        async move {
            open(node, &format!("/ws/hs?token={token}"), &[])
                .await
                .unwrap()
                .0
        }
    };
    let mut alice = connect(json!({"sub": "alice", "exp": now() + 600})).await;
    let mut mallory =
        connect(json!({"sub": "mallory", "exp": now() + 600, "topics": ["news.*"]})).await;

    // The tenant's rule: each user reads their own orders.
    alice
        .send_json(json!({"type": "subscribe", "topic": "orders.alice"}))
        .await;
    assert_eq!(alice.next_json().await["type"], "subscribed");
    // Mallory, with her own valid token, asks for Alice's: refused.
    mallory
        .send_json(json!({"type": "subscribe", "topic": "orders.alice"}))
        .await;
    let refused = mallory.next_json().await;
    assert_eq!(
        (&refused["type"], &refused["code"], &refused["topic"]),
        (
            &json!("error"),
            &json!("subscribe_denied"),
            &json!("orders.alice")
        ),
        "{refused}"
    );
    // Her token's pattern grants her the news.
    mallory
        .send_json(json!({"type": "subscribe", "topic": "news.sport"}))
        .await;
    assert_eq!(mallory.next_json().await["type"], "subscribed");

    node.push("hs-key", json!({"topic": "orders.alice", "data": "paid"}))
        .await;
    node.push("hs-key", json!({"topic": "news.sport", "data": "goal"}))
        .await;
    assert_eq!(alice.next_data().await, "paid");
    assert_eq!(
        mallory.next_data().await,
        "goal",
        "nothing of Alice's came first"
    );

    // Asking again and again closes the connection with 4005: this was
    // her first refusal, nine more make ten.
    for _ in 0..9 {
        mallory
            .send_json(json!({"type": "subscribe", "topic": "orders.bob"}))
            .await;
    }
    assert_eq!(mallory.close_code().await, 4005);
    let (_, metrics) = node.get_text("/metrics").await;
    let denied = support::metric_value(
        &metrics,
        "pushgate_subscriptions_total",
        &["tenant=\"hs\"", "outcome=\"denied\""],
    );
    assert!(denied >= 10.0, "denials counted ({denied})");
    node.shutdown().await;
}

#[tokio::test]
async fn a_connection_ends_when_its_token_expires_unless_the_client_sent_a_fresh_one() {
    let node = node().await;
    let token =
        |sub: &str, lifetime: u64| hs256(&json!({"sub": sub, "exp": now() + lifetime}), SECRET);
    let connect = |token: String| {
        let node = &node;
        async move {
            open(node, &format!("/ws/brief?token={token}"), &[])
                .await
                .unwrap()
                .0
        }
    };

    // Closed at its token's exp, with 4007.
    let mut expiring = connect(token("bob", 2)).await;
    assert_eq!(expiring.close_code().await, 4007);

    // A fresh token before then keeps it open past the first exp.
    let expires = now() + 2;
    let mut refreshed = connect(token("carol", 2)).await;
    refreshed
        .send_json(json!({"type": "refresh", "token": token("mallory", 600)}))
        .await;
    let refused = refreshed.next_json().await;
    assert_eq!(
        refused["code"], "refresh_refused",
        "another user's token: {refused}"
    );
    refreshed
        .send_json(json!({"type": "refresh", "token": token("carol", 600)}))
        .await;
    let answer = refreshed.next_json().await;
    assert_eq!(answer["type"], "refreshed", "{answer}");
    support::eventually(
        "the first token's exp has passed",
        support::PATIENCE,
        || now() > expires + 1,
    )
    .await;
    node.push(
        "brief-key",
        json!({"users": ["carol"], "data": "still here"}),
    )
    .await;
    assert_eq!(refreshed.next_data().await, "still here");
    node.shutdown().await;
}

#[tokio::test]
async fn any_numeric_exp_ends_the_connection_on_time_and_none_can_overflow_it() {
    let node = node().await;
    let connect = |claims: Value| {
        let node = &node;
        async move {
            let token = hs256(&claims, SECRET);
            open(node, &format!("/ws/brief?token={token}"), &[]).await
        }
    };
    // A fraction (RFC 7519 allows one) is floored: closed at its time.
    let fractional = now() as f64 + 2.5;
    let (mut expiring, _) = connect(json!({"sub": "bob", "exp": fractional}))
        .await
        .expect("a fractional exp is a valid exp");
    assert_eq!(expiring.close_code().await, 4007);
    // A refresh with one answers when it ends.
    let (mut refreshed, _) = connect(json!({"sub": "carol", "exp": now() + 600}))
        .await
        .unwrap();
    let token = hs256(
        &json!({"sub": "carol", "exp": now() as f64 + 600.5}),
        SECRET,
    );
    refreshed
        .send_json(json!({"type": "refresh", "token": token}))
        .await;
    let answer = refreshed.next_json().await;
    assert_eq!(answer["type"], "refreshed", "{answer}");
    assert_eq!(answer["expires_at"], now() + 600, "{answer}");
    // An exp near the end of time: open, and the node unharmed.
    let (mut far, _) = connect(json!({"sub": "dave", "exp": 9.2e18}))
        .await
        .expect("a far exp is accepted");
    far.send_json(json!({"type": "ping"})).await;
    assert_eq!(far.next_json().await["type"], "pong");
    let (mut farther, _) = connect(json!({"sub": "erin", "exp": u64::MAX}))
        .await
        .expect("the largest exp is accepted");
    farther.send_json(json!({"type": "ping"})).await;
    assert_eq!(farther.next_json().await["type"], "pong");
    node.push("brief-key", json!({"users": ["dave"], "data": "alive"}))
        .await;
    assert_eq!(far.next_data().await, "alive");
    node.shutdown().await;
}

#[tokio::test]
async fn user_matches_one_whole_segment_so_no_user_reads_anothers_topics() {
    let node = TestNode::start(&format!(
        r#"
[tenants.shop]
push_keys = ["shop-key"]
auth = "jwt"
[tenants.shop.jwt]
algorithm = "HS256"
secret = "{SECRET}"
[tenants.shop.subscriptions]
allow = ["orders.{{user}}", "orders.{{user}}.*"]
"#
    ))
    .await;
    let connect = |sub: &str| {
        let token = hs256(&json!({"sub": sub, "exp": now() + 600}), SECRET);
        let node = &node;
        async move {
            open(node, &format!("/ws/shop?token={token}"), &[])
                .await
                .unwrap()
                .0
        }
    };
    let mut bob = connect("bob").await;
    let mut bob_smith = connect("bob.smith").await;
    // `{user}` is one whole segment: `orders.bob.smith` is not user
    // bob.smith's `orders.{user}` (it is bob's sub-topic `smith`).
    bob_smith
        .send_json(json!({"type": "subscribe", "topic": "orders.bob.smith"}))
        .await;
    let refused = bob_smith.next_json().await;
    assert_eq!(refused["code"], "subscribe_denied", "{refused}");
    for topic in ["orders.bob", "orders.bob.smith"] {
        bob.send_json(json!({"type": "subscribe", "topic": topic}))
            .await;
        assert_eq!(bob.next_json().await["type"], "subscribed", "{topic}");
    }
    node.push(
        "shop-key",
        json!({"topic": "orders.bob.smith", "data": "bob's smith details"}),
    )
    .await;
    node.push(
        "shop-key",
        json!({"users": ["bob.smith"], "data": "for bob.smith alone"}),
    )
    .await;
    assert_eq!(bob.next_data().await, "bob's smith details");
    assert_eq!(
        bob_smith.next_data().await,
        "for bob.smith alone",
        "nothing of bob's came first"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_rotated_secret_and_a_removed_rule_apply_to_connections_opened_before() {
    const ROTATED: &str = "the-secret-after-the-rotation-xyz";
    let node = TestNode::start(&format!(
        r#"
[admin]
token = "{admin}"
[tenants.rot]
push_keys = ["rot-key"]
auth = "jwt"
[tenants.rot.jwt]
algorithm = "HS256"
secret = "{SECRET}"
[tenants.rot.subscriptions]
allow = ["orders.{{user}}"]
"#,
        admin = support::ADMIN_TOKEN
    ))
    .await;
    let token = |secret: &str| hs256(&json!({"sub": "carol", "exp": now() + 600}), secret);
    let (mut carol, _) = open(&node, &format!("/ws/rot?token={}", token(SECRET)), &[])
        .await
        .unwrap();
    // The secret leaked: the operator rotates it and drops the rule.
    let settings = json!({
        "push_keys": ["rot-key"],
        "auth": "jwt",
        "jwt": {"algorithm": "HS256", "secret": ROTATED},
        "subscriptions": {"allow": []},
    });
    let (status, answer) = node
        .admin(
            "PUT",
            "/admin/v1/tenants/rot",
            Some(settings.to_string().into_bytes()),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    carol
        .send_json(json!({"type": "refresh", "token": token(SECRET)}))
        .await;
    let refused = carol.next_json().await;
    assert_eq!(
        refused["code"], "refresh_refused",
        "the old secret: {refused}"
    );
    carol
        .send_json(json!({"type": "subscribe", "topic": "orders.carol"}))
        .await;
    let denied = carol.next_json().await;
    assert_eq!(
        denied["code"], "subscribe_denied",
        "the removed rule: {denied}"
    );
    carol
        .send_json(json!({"type": "refresh", "token": token(ROTATED)}))
        .await;
    assert_eq!(carol.next_json().await["type"], "refreshed");
    node.shutdown().await;
}

#[tokio::test]
async fn handshake_topics_follow_the_rules_of_subscribe() {
    let node = node().await;
    let token = hs256(&json!({"sub": "ann", "exp": now() + 600}), SECRET);
    let path = |topics: &str| format!("/ws/hs?token={token}&topics={topics}");
    // More than a connection may have: refused, not silently cut.
    let many: Vec<String> = (0..65).map(|n| format!("orders.ann.{n}")).collect();
    assert_eq!(
        open(&node, &path(&many.join(",")), &[]).await.err(),
        Some(400)
    );
    // As many refusals as close a connection: refused at once.
    let forbidden: Vec<String> = (0..10).map(|n| format!("orders.bob{n}")).collect();
    assert_eq!(
        open(&node, &path(&forbidden.join(",")), &[]).await.err(),
        Some(403)
    );
    // Fewer: answered one by one, and counted toward the close (4005).
    let (mut ann, _) = open(
        &node,
        &path("orders.ann,orders.bob,orders.cy,orders.dee"),
        &[],
    )
    .await
    .unwrap();
    for _ in 0..3 {
        assert_eq!(ann.next_json().await["code"], "subscribe_denied");
    }
    for n in 0..7 {
        ann.send_json(json!({"type": "subscribe", "topic": format!("orders.x{n}")}))
            .await;
    }
    assert_eq!(ann.close_code().await, 4005);
    let (_, metrics) = node.get_text("/metrics").await;
    let denied = support::metric_value(
        &metrics,
        "pushgate_subscriptions_total",
        &["tenant=\"hs\"", "outcome=\"denied\""],
    );
    assert!(denied >= 20.0, "handshake refusals counted ({denied})");
    node.shutdown().await;
}
