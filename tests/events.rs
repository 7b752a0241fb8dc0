//! Server-Sent Events clients (`/sse/{tenant}`), through real HTTP: the
//! same frames, admission and resumption as WebSocket clients, commands
//! through `POST /sse/{tenant}/commands`, heartbeats and closing reasons.

mod support;

use serde_json::{Value, json};
use support::{PATIENCE, TestNode};

const TENANTS: &str = r#"
[websocket]
ping_interval = "300ms"
idle_timeout = "10s"

[tenants.shop]
push_keys = ["shop-key"]
auth = "development"

[tenants.other]
push_keys = ["other-key"]
auth = "development"

[tenants.secure]
push_keys = ["secure-key"]
auth = "jwt"
allowed_origins = ["https://app.example"]
[tenants.secure.jwt]
algorithm = "HS256"
secret = "events-test-secret"
cookie = "push_token"
"#;

/// One event of a stream: its `id`, its data (JSON), or a comment.
#[derive(Debug)]
enum Event {
    Data { id: Option<String>, data: Value },
    Comment,
}

/// A Server-Sent Events client.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(node: &TestNode, path_and_query: &str, last_event_id: Option<&str>) -> Self {
        let mut request = node.http.get(format!("{}{path_and_query}", public(node)));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{path_and_query}");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Stream {
            response,
            buffer: String::new(),
        }
    }

    async fn next_event(&mut self) -> Event {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut id = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("id: ") {
                        id = Some(value.to_owned());
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(value).unwrap());
                    }
                }
                return match data {
                    Some(data) => Event::Data { id, data },
                    None => Event::Comment,
                };
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("an event in time")
                .unwrap()
                .expect("the stream goes on");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next frame (comments skipped): its id and data.
    async fn next_frame(&mut self) -> (Option<String>, Value) {
        loop {
            if let Event::Data { id, data } = self.next_event().await {
                return (id, data);
            }
        }
    }
}

fn public(node: &TestNode) -> String {
    node.ws_base.replacen("ws://", "http://", 1)
}

async fn command(node: &TestNode, tenant: &str, body: Value) -> (u16, Value) {
    let response = node
        .http
        .post(format!("{}/sse/{tenant}/commands", public(node)))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_event_stream_gets_each_frame_with_its_position_and_resumes_from_last_event_id() {
    let node = TestNode::start(TENANTS).await;
    let mut stream = Stream::open(&node, "/sse/shop?user=ann&topics=news", None).await;
    let (_, hello) = stream.next_frame().await;
    assert_eq!(hello["type"], "hello");
    support::eventually("ann is registered", PATIENCE, || {
        node.node().sessions().tenant_connections("shop") == 1
    })
    .await;
    node.push("shop-key", json!({"users": ["ann"], "data": 1}))
        .await;
    node.push("shop-key", json!({"topic": "news", "data": 2}))
        .await;
    node.push("shop-key", json!({"broadcast": true, "data": 3}))
        .await;
    let mut last = String::new();
    for expected in 1..=3 {
        let (id, frame) = stream.next_frame().await;
        assert_eq!(frame["type"], "message");
        assert_eq!(frame["data"], expected);
        assert_eq!(
            id.as_deref(),
            frame["pos"].as_str(),
            "the id is the position"
        );
        last = id.unwrap();
    }
    drop(stream);
    support::eventually("ann is gone", PATIENCE, || {
        node.node().sessions().tenant_connections("shop") == 0
    })
    .await;
    node.push("shop-key", json!({"users": ["ann"], "data": 4}))
        .await;
    node.push("shop-key", json!({"topic": "news", "data": 5}))
        .await;

    // An EventSource reconnecting sends the last id it saw.
    let mut again = Stream::open(&node, "/sse/shop?user=ann&topics=news", Some(&last)).await;
    let (_, hello) = again.next_frame().await;
    assert_eq!(hello["type"], "hello");
    for expected in [4, 5] {
        assert_eq!(again.next_frame().await.1["data"], expected);
    }
    let (_, recovered) = again.next_frame().await;
    assert_eq!(
        recovered,
        json!({"type": "recovered", "complete": true, "replayed": 2})
    );

    // Idle, it hears a heartbeat.
    loop {
        if let Event::Comment = again.next_event().await {
            break;
        }
    }
}

#[tokio::test]
async fn commands_go_through_the_stream_secret_and_a_disconnect_closes_it_with_its_code() {
    let node = TestNode::start(TENANTS).await;
    let mut stream = Stream::open(&node, "/sse/shop?user=bo", None).await;
    let (_, hello) = stream.next_frame().await;
    let id = hello["stream"].clone();
    let secret = hello["secret"].as_str().unwrap().to_owned();

    let (status, reply) = command(
        &node,
        "shop",
        json!({"stream": id, "secret": secret, "command": {"type": "subscribe", "topic": "deals"}}),
    )
    .await;
    assert_eq!(
        (status, &reply),
        (200, &json!({"type": "subscribed", "topic": "deals"}))
    );
    node.push("shop-key", json!({"topic": "deals", "data": "half price"}))
        .await;
    assert_eq!(stream.next_frame().await.1["data"], "half price");
    let (status, reply) = command(
        &node,
        "shop",
        json!({"stream": id, "secret": secret, "command": {"type": "dance"}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        reply["type"], "error",
        "as a WebSocket client is answered: {reply}"
    );

    // Refused: another secret, another tenant's path, no such stream, a
    // body that is not a command.
    for (tenant, body, expected) in [
        (
            "shop",
            json!({"stream": id, "secret": "guess", "command": {"type": "ping"}}),
            403,
        ),
        (
            "other",
            json!({"stream": id, "secret": secret, "command": {"type": "ping"}}),
            403,
        ),
        (
            "shop",
            json!({"stream": 999_999, "secret": secret, "command": {"type": "ping"}}),
            404,
        ),
        ("shop", json!({"stream": id}), 400),
    ] {
        let (status, answer) = command(&node, tenant, body.clone()).await;
        assert_eq!(status, expected, "{tenant} {body}: {answer}");
    }

    // Logged out through the API: the last frame says why.
    let (status, _) = node
        .post("/v1/disconnect", Some("shop-key"), &json!({"user": "bo"}))
        .await;
    assert_eq!(status, 200);
    let (_, close) = stream.next_frame().await;
    assert_eq!(close["type"], "close");
    assert_eq!(close["code"], 4008);
    let (status, _) = command(
        &node,
        "shop",
        json!({"stream": id, "secret": secret, "command": {"type": "ping"}}),
    )
    .await;
    assert_eq!(status, 404, "the stream is gone");
}

#[tokio::test]
async fn event_streams_are_admitted_like_websocket_clients() {
    let node = TestNode::start(TENANTS).await;
    for (path, last_event_id, expected) in [
        ("/sse/nobody?user=ann", None, 404),
        ("/sse/secure", None, 401),
        ("/sse/shop?user=ann&since=nope", None, 400),
        ("/sse/shop?user=ann", Some("not-a-position"), 400),
    ] {
        let mut request = node.http.get(format!("{}{path}", public(&node)));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), expected, "{path}");
    }
    // A token in the query, as an EventSource cannot send headers.
    let token = support::token(
        jsonwebtoken::Algorithm::HS256,
        "events-test-secret",
        &json!({"sub": "cy", "exp": support::now_secs() + 600}),
    );
    let mut stream = Stream::open(&node, &format!("/sse/secure?token={token}"), None).await;
    assert_eq!(stream.next_frame().await.1["type"], "hello");
    // Or in the tenant's cookie, from one of its origins; the stream
    // answers that origin (CORS), never with credentials.
    let from_app = |cookie: &str, origin: &str| {
        node.http
            .get(format!("{}/sse/secure", public(&node)))
            .header("cookie", cookie.to_owned())
            .header("origin", origin.to_owned())
            .send()
    };
    let admitted = from_app(
        &format!("theme=dark; push_token={token}"),
        "https://app.example",
    )
    .await
    .unwrap();
    assert_eq!(admitted.status(), 200);
    assert_eq!(
        admitted.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(
        admitted
            .headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    let elsewhere = from_app(&format!("push_token={token}"), "https://evil.example")
        .await
        .unwrap();
    assert_eq!(
        elsewhere.status(),
        403,
        "another site's page, with the cookie"
    );
    let no_token = from_app("push_token=", "https://app.example")
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
}
