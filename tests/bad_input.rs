//! Every bad input gets its documented status or close code, and the other
//! clients keep receiving afterwards.

mod support;

use serde_json::json;
use support::{Client, RawClient, TestNode, frame};
use tokio::io::AsyncWriteExt;

/// A connected bystander that must keep receiving whatever happens to others.
async fn bystander(node: &TestNode) -> Client {
    node.connect_user("acme", "bystander").await
}

async fn bystander_still_receives(node: &TestNode, bystander: &mut Client, marker: &str) {
    node.push("acme-key", json!({"users": ["bystander"], "data": marker}))
        .await;
    assert_eq!(bystander.next_data().await, marker);
}

async fn http_status(node: &TestNode, request: String) -> String {
    let mut raw = RawClient::connect(node.node().public_addr().to_string().as_str()).await;
    raw.send(request.as_bytes()).await;
    raw.read_head().await
}

#[tokio::test]
async fn handshake_errors_get_their_status_before_any_upgrade() {
    let node = TestNode::start("[tenants.closed]\npush_keys = [\"closed-key\"]").await;
    let mut watcher = bystander(&node).await;
    let addr = node.node().public_addr();
    let upgrade = |path: &str, extra: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    };
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases = [
        (
            "plain GET",
            format!("GET /ws/acme?user=a HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
            "426",
        ),
        ("unknown tenant", upgrade("/ws/nope?user=a", key), "404"),
        ("missing key", upgrade("/ws/acme?user=a", ""), "400"),
        (
            "key not 16 bytes",
            upgrade("/ws/acme?user=a", "Sec-WebSocket-Key: c2hvcnQ=\r\n"),
            "400",
        ),
        (
            "wrong version",
            format!(
                "GET /ws/acme?user=a HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Version: 8\r\n{key}\r\n"
            ),
            "426",
        ),
        ("no user", upgrade("/ws/acme", key), "401"),
        (
            "user id too long",
            upgrade(&format!("/ws/acme?user={}", "u".repeat(300)), key),
            "401",
        ),
        (
            "tenant without authenticator",
            upgrade("/ws/closed?user=a", key),
            "403",
        ),
        (
            "POST",
            format!("POST /ws/acme HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"),
            "405",
        ),
        (
            "URI too long",
            upgrade(&format!("/ws/acme?user={}", "a".repeat(9_000)), key),
            "414",
        ),
        (
            "headers too large",
            upgrade(
                "/ws/acme?user=a",
                &format!("{key}X-Padding: {}\r\n", "p".repeat(20_000)),
            ),
            "431",
        ),
    ];
    for (what, request, status) in cases {
        let head = http_status(&node, request).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: expected {status}, got {head:?}"
        );
    }
    let head = http_status(
        &node,
        upgrade("/ws/acme?user=a", "Sec-WebSocket-Version: 8\r\n"),
    )
    .await;
    assert!(!head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(node.node().sessions().tenant_connections("closed"), 0);
    bystander_still_receives(&node, &mut watcher, "after handshakes").await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_handshake_that_never_completes_is_closed() {
    let node = TestNode::start("[websocket]\nhandshake_timeout = \"300ms\"").await;
    let mut watcher = bystander(&node).await;
    let addr = node.node().public_addr().to_string();
    let mut slow = RawClient::connect(&addr).await;
    slow.send(b"GET /ws/acme?user=slow HTTP/1.1\r\nHost: x\r\n")
        .await;
    assert!(
        slow.is_closed_by_server().await,
        "half a request head is not kept open"
    );
    let mut silent = RawClient::connect(&addr).await;
    assert!(
        silent.is_closed_by_server().await,
        "a connection that sends nothing is closed"
    );
    bystander_still_receives(&node, &mut watcher, "after slowloris").await;
    node.shutdown().await;
}

#[tokio::test]
async fn protocol_violations_close_with_1002() {
    let node = TestNode::start("").await;
    let mut watcher = bystander(&node).await;
    let addr = node.node().public_addr().to_string();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked frame", frame(0x81, b"{\"type\":\"ping\"}", false)),
        ("reserved bit set", frame(0x81 | 0x40, b"{}", true)),
        ("unknown data opcode", frame(0x83, b"{}", true)),
        ("unknown control opcode", frame(0x8b, b"", true)),
        ("stray continuation", frame(0x80, b"{}", true)),
        (
            "control frame over 125 bytes",
            frame(0x89, &[0u8; 126], true),
        ),
        ("fragmented control frame", frame(0x09, b"", true)),
        ("close code 999", frame(0x88, &999u16.to_be_bytes(), true)),
        (
            "close code 1005 on the wire",
            frame(0x88, &1005u16.to_be_bytes(), true),
        ),
        ("close reason over 123 bytes", {
            let mut payload = 1000u16.to_be_bytes().to_vec();
            payload.extend_from_slice(&[b'r'; 124]);
            frame(0x88, &payload, true)
        }),
    ];
    for (what, bytes) in cases {
        let mut raw = RawClient::upgrade(&addr, "/ws/acme?user=rogue").await;
        raw.send(&bytes).await;
        assert_eq!(raw.close_code().await, Some(1002), "{what}");
    }
    bystander_still_receives(&node, &mut watcher, "after protocol errors").await;
    node.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007_and_oversized_messages_with_1009() {
    let node = TestNode::start("[websocket]\nmax_message_bytes = 4096").await;
    let mut watcher = bystander(&node).await;
    let addr = node.node().public_addr().to_string();

    let mut raw = RawClient::upgrade(&addr, "/ws/acme?user=rogue").await;
    raw.send(&frame(0x81, &[0xc3, 0x28], true)).await;
    assert_eq!(raw.close_code().await, Some(1007), "invalid UTF-8");

    let mut raw = RawClient::upgrade(&addr, "/ws/acme?user=rogue").await;
    raw.send(&frame(0x81, &vec![b'a'; 5000], true)).await;
    assert_eq!(
        raw.close_code().await,
        Some(1009),
        "one frame over the limit"
    );

    // A message over the limit in small fragments.
    let mut raw = RawClient::upgrade(&addr, "/ws/acme?user=rogue").await;
    raw.send(&frame(0x01, &vec![b'a'; 3000], true)).await;
    raw.send(&frame(0x80, &vec![b'a'; 3000], true)).await;
    assert_eq!(
        raw.close_code().await,
        Some(1009),
        "fragments over the limit"
    );

    bystander_still_receives(&node, &mut watcher, "after bad payloads").await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_connections_from_one_address_is_limited() {
    let node = TestNode::start("[websocket]\nmax_connections_per_ip = 3").await;
    let _a = node.connect_user("acme", "a").await;
    let _b = node.connect_user("acme", "b").await;
    let mut c = node.connect_user("acme", "c").await;
    let addr = node.node().public_addr();
    let head = http_status(
        &node,
        format!(
            "GET /ws/acme?user=d HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    let (_, metrics) = node.get_text("/metrics").await;
    assert!(support::metric_value(&metrics, "pushgate_connections_refused_total", &[]) >= 1.0);

    node.push("acme-key", json!({"users": ["c"], "data": "ok"}))
        .await;
    assert_eq!(c.next_data().await, "ok");
    // A slot frees up when a connection ends.
    drop(c);
    node.wait_for(|n| n.sessions().tenant_connections("acme") == 2)
        .await;
    let mut again = None;
    for _ in 0..200 {
        let url = format!("{}/ws/acme?user=e", node.ws_base);
        if let Ok((socket, _)) = tokio_tungstenite::connect_async(url).await {
            again = Some(socket);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(again.is_some(), "a freed slot can be used again");
    node.shutdown().await;
}

#[tokio::test]
async fn push_errors_are_json_with_the_right_status() {
    let node = TestNode::start("[push]\nmax_body_bytes = 2000\nmax_batch = 3").await;
    let mut watcher = bystander(&node).await;
    let ok = json!({"users": ["bystander"], "data": 1});
    let cases = [
        ("no key", None, json!(ok), 401, "unauthorized"),
        ("unknown key", Some("wrong"), json!(ok), 401, "unauthorized"),
        (
            "no address",
            Some("acme-key"),
            json!({"data": 1}),
            400,
            "bad_request",
        ),
        (
            "two addresses",
            Some("acme-key"),
            json!({"topic": "t", "broadcast": true, "data": 1}),
            400,
            "bad_request",
        ),
        (
            "empty users",
            Some("acme-key"),
            json!({"users": [], "data": 1}),
            400,
            "bad_request",
        ),
        (
            "no data",
            Some("acme-key"),
            json!({"users": ["u"]}),
            400,
            "bad_request",
        ),
        (
            "unknown field",
            Some("acme-key"),
            json!({"users": ["u"], "data": 1, "extra": 1}),
            400,
            "bad_request",
        ),
        (
            "body too large",
            Some("acme-key"),
            json!({"users": ["u"], "data": "x".repeat(3000)}),
            413,
            "too_large",
        ),
        (
            "other tenant",
            Some("acme-key"),
            json!({"tenant": "globex", "users": ["u"], "data": 1}),
            403,
            "forbidden",
        ),
        (
            "unknown tenant",
            Some("acme-key"),
            json!({"tenant": "nope", "users": ["u"], "data": 1}),
            404,
            "not_found",
        ),
    ];
    for (what, key, body, status, code) in cases {
        let (got, answer) = node.post("/v1/push", key, &body).await;
        assert_eq!(got, status, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{what}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }

    // Malformed JSON, sent as raw bytes.
    let response = node
        .http
        .post(format!("{}/v1/push", node.http_base))
        .bearer_auth("acme-key")
        .body("{\"users\": [\"u\"], \"data\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON")
    );

    // A batch is all or nothing: one bad message refuses the lot, by index.
    let (status, answer) = node
        .post(
            "/v1/push/batch",
            Some("acme-key"),
            &json!({"messages": [ok, {"users": [], "data": 1}]}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("messages[1]"),
        "{answer}"
    );
    let (status, _) = node
        .post(
            "/v1/push/batch",
            Some("acme-key"),
            &json!({"messages": [ok, ok, ok, ok]}),
        )
        .await;
    assert_eq!(status, 400, "over max_batch");

    let (status, answer) = node
        .post(
            "/v1/push/batch",
            Some("acme-key"),
            &json!({"messages": [
                {"users": ["bystander"], "data": "b1"},
                {"broadcast": true, "data": "b2"}
            ]}),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["ids"].as_array().unwrap().len(), 2);
    // Nothing from the refused requests arrived; the batch did, in order.
    assert_eq!(watcher.next_data().await, "b1");
    assert_eq!(watcher.next_data().await, "b2");
    bystander_still_receives(&node, &mut watcher, "after push errors").await;
    node.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_get_a_json_404() {
    let node = TestNode::start("").await;
    let (status, text) = node.get_text("/nope").await;
    assert_eq!(status, 404);
    assert!(text.contains("\"not_found\""), "{text}");
    let mut raw = RawClient::connect(node.node().public_addr().to_string().as_str()).await;
    raw.stream
        .write_all(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(raw.read_head().await.starts_with("HTTP/1.1 404"));
    node.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_commands_on_one_connection_closes_it_with_4006() {
    let node = TestNode::start("").await;
    let mut watcher = bystander(&node).await;
    let addr = node.node().public_addr().to_string();

    let mut raw = RawClient::upgrade(&addr, "/ws/acme?user=chatty").await;
    let ping = frame(0x81, br#"{"type":"ping"}"#, true);
    let burst: Vec<u8> = std::iter::repeat_n(ping, 200).flatten().collect();
    raw.send(&burst).await;
    assert_eq!(raw.close_code().await, Some(4006), "too many commands");

    // A client that pings as clients do is never affected.
    let mut calm = node.connect_user("acme", "calm").await;
    for _ in 0..20 {
        calm.send_json(serde_json::json!({"type": "ping"})).await;
        assert_eq!(calm.next_json().await["type"], "pong");
    }
    bystander_still_receives(&node, &mut watcher, "after a command flood").await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_protocol_pings_or_pongs_closes_the_connection_with_4006() {
    let node = TestNode::start("").await;
    let mut watcher = bystander(&node).await;
    let addr = node.node().public_addr().to_string();
    // Control frames cost the node a read and (pings) a reply each: they
    // are commands like any other.
    for opcode in [0x89, 0x8a] {
        let mut raw = RawClient::upgrade(&addr, "/ws/acme?user=pinger").await;
        let ping = frame(opcode, b"", true);
        let burst: Vec<u8> = std::iter::repeat_n(ping, 200).flatten().collect();
        raw.send(&burst).await;
        assert_eq!(raw.close_code().await, Some(4006), "opcode {opcode:#x}");
    }
    bystander_still_receives(&node, &mut watcher, "after a ping flood").await;
    node.shutdown().await;
}

/// A handshake to tenant `acme` carrying `X-Forwarded-For: forwarded`:
/// the socket, or the HTTP status it was refused with.
async fn handshake_forwarded(
    node: &TestNode,
    user: &str,
    forwarded: &str,
) -> Result<support::Client, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("{}/ws/acme?user={user}", node.ws_base)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("x-forwarded-for", forwarded.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(support::Client { socket }),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(other) => panic!("unexpected handshake error {other}"),
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_per_address_limits_apply_to_the_forwarded_client() {
    let mut config = support::config("[websocket]\nmax_connections_per_ip = 1");
    config.listen.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let node = TestNode::start_with(config).await;

    let _a = handshake_forwarded(&node, "a", "198.51.100.1")
        .await
        .unwrap();
    let _b = handshake_forwarded(&node, "b", "198.51.100.2")
        .await
        .unwrap();
    assert_eq!(
        handshake_forwarded(&node, "c", "198.51.100.1").await.err(),
        Some(429),
        "a second connection of the same client"
    );
    // Through a chain of proxies, the last hop not a trusted proxy counts.
    let _d = handshake_forwarded(&node, "d", "203.0.113.9, 127.0.0.1")
        .await
        .unwrap();
    node.shutdown().await;

    // Without trusted proxies the header is the client's say: ignored.
    let node = TestNode::start("[websocket]\nmax_connections_per_ip = 1").await;
    let _a = handshake_forwarded(&node, "a", "198.51.100.1")
        .await
        .unwrap();
    assert_eq!(
        handshake_forwarded(&node, "b", "198.51.100.2").await.err(),
        Some(429),
        "a spoofed header changes nothing"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn behind_a_proxy_protocol_balancer_limits_apply_to_the_client_it_names() {
    let mut config = support::config("[websocket]\nmax_connections_per_ip = 1");
    config.listen.proxy_protocol = true;
    let node = TestNode::start_with(config).await;
    let addr = node.node().public_addr().to_string();
    let upgrade = |proxy_header: &str| {
        format!(
            "{proxy_header}GET /ws/acme?user=p HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let open = |proxy_header: String| {
        let addr = addr.clone();
        async move {
            let mut client = RawClient::connect(&addr).await;
            client.send(proxy_header.as_bytes()).await;
            let head = client.read_head().await;
            (client, head)
        }
    };
    let v1 = |ip: &str| format!("PROXY TCP4 {ip} 10.0.0.1 40000 443\r\n");

    let (_first, head) = open(upgrade(&v1("198.51.100.1"))).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_second, head) = open(upgrade(&v1("198.51.100.1"))).await;
    assert!(
        head.starts_with("HTTP/1.1 429"),
        "the same client again: {head}"
    );
    let (_other, head) = open(upgrade(&v1("198.51.100.2"))).await;
    assert!(head.starts_with("HTTP/1.1 101"), "another client: {head}");

    // PROXY v2 (binary): signature, version 2 PROXY, TCP over IPv4, 12
    // bytes of addresses: 203.0.113.7:40000 → 10.0.0.1:443.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[203, 0, 113, 7, 10, 0, 0, 1, 0x9c, 0x40, 0x01, 0xbb]);
    let mut client = RawClient::connect(&addr).await;
    client.send(&v2).await;
    client.send(upgrade("").as_bytes()).await;
    let head = client.read_head().await;
    assert!(head.starts_with("HTTP/1.1 101"), "PROXY v2: {head}");

    // Without a header the connection is dropped: nobody names a client.
    let (mut plain, head) = open(upgrade("")).await;
    assert!(head.is_empty(), "{head}");
    assert!(plain.is_closed_by_server().await);
    node.shutdown().await;
}
