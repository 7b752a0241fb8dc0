//! Cluster mode: three `pushgate` processes on loopback, clustered through a
//! real RocketMQ name server and broker (started by these tests on free
//! ports, stopped by PID when each test ends).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::rocketmq::{
    CLUSTER_PATIENCE, NodeProcess, Rocketmq, raw_bus, start_nodes, test_topic, until_routed,
    until_routing,
};
use support::{Client, plugin};
use tokio_tungstenite::tungstenite::Message;

/// Tenant `acme` (key `acme-key`, development authenticator, at most two
/// connections per user) and tenant `shop` with a keyword filter's settings
/// (a canary is judged after 5 calls).
const TENANTS: &str = r#"
[tenants.acme]
push_keys = ["acme-key"]
auth = "development"
max_connections_per_user = 2

[tenants.shop]
push_keys = ["shop-key"]
auth = "development"
[tenants.shop.plugin]
config = { words = "spoiler" }
[tenants.shop.plugin.canary]
min_calls = 5
"#;

/// Ready nodes called `names`, on one broker and a topic of `test`'s own.
fn cluster(rocketmq: &Rocketmq, test: &str, names: &[&str]) -> Vec<NodeProcess> {
    start_nodes(&rocketmq.name_server(), test, names, TENANTS, false)
}

/// [`cluster`], its nodes routing pushes to their users' nodes (once
/// they do) or not.
async fn cluster_routing_or_not(
    rocketmq: &Rocketmq,
    test: &str,
    names: &[&str],
    routing: bool,
) -> Vec<NodeProcess> {
    let nodes = start_nodes(&rocketmq.name_server(), test, names, TENANTS, routing);
    if routing {
        until_routing(&nodes).await;
    }
    nodes
}

/// A client of `user` whose connection is registered: its ping was answered
/// (it is registered before the first frame is read).
async fn connect(node: &NodeProcess, tenant: &str, user: &str) -> Client {
    let mut client = open_and_ping(node, tenant, user).await;
    assert_eq!(client.next_json().await["type"], "pong");
    client
}

/// [`connect`], for a user whose pushes may still be on their way to this
/// node: message frames before the pong are taken and dropped.
async fn connect_taking_messages_in_flight(node: &NodeProcess, tenant: &str, user: &str) -> Client {
    let mut client = open_and_ping(node, tenant, user).await;
    loop {
        let frame = client.next_json().await;
        match frame["type"].as_str() {
            Some("pong") => return client,
            Some("message") => continue,
            _ => panic!("before the pong: {frame}"),
        }
    }
}

/// A WebSocket connection of `user` that sent a ping.
async fn open_and_ping(node: &NodeProcess, tenant: &str, user: &str) -> Client {
    let (socket, _) = tokio::time::timeout(
        support::PATIENCE,
        tokio_tungstenite::connect_async(node.ws_url(tenant, user)),
    )
    .await
    .expect("handshake in time")
    .expect("handshake succeeds");
    let mut client = Client { socket };
    client.send_json(json!({"type": "ping"})).await;
    client
}

async fn push(node: &NodeProcess, key: &str, body: Value) -> (u16, Value) {
    post(node, "/v1/push", key, body).await
}

/// POSTs `body` to `path` of `node`'s internal listener with push key `key`.
async fn post(node: &NodeProcess, path: &str, key: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(node.http(path))
        .bearer_auth(key)
        .json(&body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("push request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn push_accepted(node: &NodeProcess, body: Value) -> String {
    let (status, answer) = push(node, "acme-key", body).await;
    assert_eq!(status, 202, "push through {} answered {answer}", node.name);
    answer["id"].as_str().unwrap().to_owned()
}

/// Waits until `condition` holds, as long as a cluster may take.
async fn eventually(what: &str, condition: impl FnMut() -> bool) {
    support::eventually(what, CLUSTER_PATIENCE, condition).await;
}

/// The next `message` frame.
async fn next_message(client: &mut Client) -> Value {
    let frame = client.next_json().await;
    assert_eq!(frame["type"], "message", "{frame}");
    frame
}

/// The next `message` frame, however long it takes.
async fn next_message_slowly(client: &mut Client) -> Value {
    loop {
        match client.socket.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(frame["type"], "message", "{frame}");
                return frame;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("the connection ended: {other:?}"),
        }
    }
}

/// Reads nothing but `marker` next: proof that nothing (no duplicate) came
/// before it.
async fn expect_only_marker(client: &mut Client, marker: &str) {
    let frame = next_message(client).await;
    assert_eq!(frame["data"]["marker"], marker, "unexpected frame {frame}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_through_any_node_reach_every_node_exactly_once() {
    let rocketmq = Rocketmq::start();
    let nodes = cluster(&rocketmq, "delivery", &["a", "b", "c"]);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    let mut alice = connect(a, "acme", "alice").await;
    let mut bob_on_a = connect(a, "acme", "bob").await;
    let mut bob_on_b = connect(b, "acme", "bob").await;
    let mut carol_on_c = connect(c, "acme", "carol").await;
    carol_on_c
        .send_json(json!({"type": "subscribe", "topic": "news"}))
        .await;
    assert_eq!(carol_on_c.next_json().await["type"], "subscribed");
    alice
        .send_json(json!({"type": "subscribe", "topic": "news"}))
        .await;
    assert_eq!(alice.next_json().await["type"], "subscribed");

    let mut sent = 0;
    let mut received = 0;

    // A user on node A, pushed through node C.
    let id = push_accepted(c, json!({"users": ["alice"], "data": {"n": 1}})).await;
    sent += 1;
    let frame = next_message(&mut alice).await;
    assert_eq!(
        (frame["id"].as_str(), &frame["data"]),
        (Some(id.as_str()), &json!({"n": 1}))
    );
    received += 1;

    // A user with a connection on A and one on B: each gets it once.
    push_accepted(a, json!({"users": ["bob"], "data": {"n": 2}})).await;
    sent += 1;
    for bob in [&mut bob_on_a, &mut bob_on_b] {
        assert_eq!(next_message(bob).await["data"], json!({"n": 2}));
        received += 1;
    }
    push_accepted(c, json!({"users": ["bob"], "data": {"marker": "after-2"}})).await;
    sent += 1;
    for bob in [&mut bob_on_a, &mut bob_on_b] {
        expect_only_marker(bob, "after-2").await;
        received += 1;
    }

    // A topic, through B: subscribers on A and C.
    push_accepted(b, json!({"topic": "news", "data": {"n": 3}})).await;
    sent += 1;
    for subscriber in [&mut alice, &mut carol_on_c] {
        let frame = next_message(subscriber).await;
        assert_eq!(
            (frame["topic"].as_str(), &frame["data"]),
            (Some("news"), &json!({"n": 3}))
        );
        received += 1;
    }

    // The whole tenant, through A: every client on every node, once.
    push_accepted(a, json!({"broadcast": true, "data": {"n": 4}})).await;
    push_accepted(b, json!({"broadcast": true, "data": {"marker": "end"}})).await;
    sent += 2;
    for client in [&mut alice, &mut bob_on_a, &mut bob_on_b, &mut carol_on_c] {
        assert_eq!(next_message(client).await["data"], json!({"n": 4}));
        expect_only_marker(client, "end").await;
        received += 2;
    }

    // A burst of batches through every node: all of it arrives, in full.
    let mut expected: HashMap<String, usize> = HashMap::new();
    for round in 0..20 {
        let node = &nodes[round % 3];
        let messages: Vec<Value> = (0..10)
            .map(|i| json!({"users": ["carol"], "data": {"round": round, "i": i}}))
            .collect();
        let response = reqwest::Client::new()
            .post(node.http("/v1/push/batch"))
            .bearer_auth("acme-key")
            .json(&json!({ "messages": messages }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let answer: Value = response.json().await.unwrap();
        for id in answer["ids"].as_array().unwrap() {
            expected.insert(id.as_str().unwrap().to_owned(), 0);
        }
        sent += 10;
    }
    while expected.values().any(|seen| *seen == 0) {
        let frame = next_message(&mut carol_on_c).await;
        let seen = expected
            .get_mut(frame["id"].as_str().unwrap())
            .unwrap_or_else(|| panic!("unexpected frame {frame}"));
        *seen += 1;
        assert_eq!(*seen, 1, "{frame} arrived twice");
        received += 1;
    }
    // Every message answered 202 arrived, once per recipient: 6 messages
    // to 1 + 2 + 2 + 2 + 4 + 4 recipients, and 200 to carol.
    assert_eq!(sent, 6 + 200);
    assert_eq!(received, 15 + 200);
    for node in &nodes {
        let metrics = node.metrics();
        assert_eq!(
            support::metric_value(&metrics, "pushgate_bus_envelopes_rejected_total", &[]),
            0.0,
            "{}",
            node.name
        );
    }
}

async fn admin(
    node: &NodeProcess,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    support::admin(&node.http(""), method, path, body).await
}

/// Polls `GET path` of `node`'s admin API until `condition` holds for its
/// status and answer.
async fn admin_until(
    node: &NodeProcess,
    path: &str,
    what: &str,
    condition: impl Fn(u16, &Value) -> bool,
) {
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    loop {
        let (status, answer) = admin(node, "GET", path, None).await;
        if condition(status, &answer) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} on node {}: not reached in time ({status} {answer})",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asks `node` for `user`'s presence until `condition` holds of its answer.
async fn presence_until(
    node: &NodeProcess,
    user: &str,
    what: &str,
    mut condition: impl FnMut(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    loop {
        let (status, answer) =
            post(node, "/v1/presence", "acme-key", json!({ "users": [user] })).await;
        let presence = &answer["users"][user];
        if status == 200 && condition(presence) {
            return presence.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never seen through {} ({status}: {answer})",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until each of `nodes` sees `count` live nodes.
async fn nodes_see_each_other(nodes: &[&NodeProcess], count: usize) {
    for node in nodes {
        eventually(&format!("{} sees {count} nodes", node.name), || {
            support::metric_value(&node.metrics(), "pushgate_cluster_nodes", &[]) == count as f64
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_keeps_only_its_users_and_the_cap_survives_their_owner_crashing() {
    let rocketmq = Rocketmq::start();
    let mut nodes = cluster(&rocketmq, "owners", &["a", "b", "c"]);
    nodes_see_each_other(&[&nodes[0], &nodes[1], &nodes[2]], 3).await;

    // Thirty users, one connection each, all on a.
    let users: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    let mut on_a = HashMap::new();
    for user in &users {
        on_a.insert(user.clone(), connect(&nodes[0], "acme", user).await);
    }
    let (status, answer) = post(
        &nodes[1],
        "/v1/presence",
        "acme-key",
        json!({ "users": users }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let owner_of = |user: &str| answer["users"][user]["owner"].as_str().unwrap().to_owned();
    for user in &users {
        assert_eq!(answer["users"][user]["count"], 1, "{answer}");
    }
    // b and c each keep the connections of the users they own, and no
    // other: a node's memory grows with its share, not with the cluster.
    for node in &nodes[1..] {
        let owned = users.iter().filter(|u| owner_of(u) == node.name).count();
        assert!(owned > 0, "the users spread over the nodes: {answer}");
        admin_until(
            node,
            "/admin/v1/tenants/acme",
            &format!("{} keeps the {owned} connections of its users", node.name),
            |_, tenant| tenant["owned_users_connections_elsewhere"] == owned,
        )
        .await;
    }
    let (_, acme) = admin(&nodes[0], "GET", "/admin/v1/tenants/acme", None).await;
    assert_eq!(acme["owned_users_connections_elsewhere"], 0, "{acme}");

    // A user c owns gets a second connection, on b; then c dies.
    let user = users.iter().find(|u| owner_of(u) == "c").unwrap().clone();
    let mut on_b = connect(&nodes[1], "acme", &user).await;
    presence_until(&nodes[1], &user, "both connections known to c", |p| {
        p["count"] == 2
    })
    .await;
    drop(nodes.pop());
    let (a, b) = (&nodes[0], &nodes[1]);
    nodes_see_each_other(&[a, b], 2).await;
    presence_until(a, &user, "a new owner", |p| {
        p["owner"] != "c" && p["count"] == 2
    })
    .await;

    // The new owner learned of both: a third connection closes the oldest
    // (on a), whichever node owns the user now.
    let mut third = connect(b, "acme", &user).await;
    let mut first = on_a.remove(&user).unwrap();
    assert_eq!(first.close_code().await, 4001);
    push_accepted(a, json!({"users": [&user], "data": {"marker": "kept"}})).await;
    expect_only_marker(&mut on_b, "kept").await;
    expect_only_marker(&mut third, "kept").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_one_nodes_admin_api_reach_every_node() {
    let rocketmq = Rocketmq::start();
    let nodes = cluster(&rocketmq, "admin", &["a", "b", "c"]);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // A plugin uploaded through A is active on B and C.
    let (status, installed) = admin(
        a,
        "POST",
        "/admin/v1/tenants/shop/plugins",
        Some(plugin("keyword_filter")),
    )
    .await;
    assert_eq!(status, 201, "{installed}");
    let version = installed["version"].as_str().unwrap().to_owned();
    let uploaded = Instant::now();
    for node in [b, c] {
        admin_until(
            node,
            "/admin/v1/tenants/shop/plugins",
            "the plugin is active",
            |_, list| list["active"] == version.as_str(),
        )
        .await;
    }
    eprintln!(
        "plugin active on every node {:?} after the upload",
        uploaded.elapsed()
    );
    // ... and filters what is pushed through C, for a client on B.
    let mut reader = connect(b, "shop", "reader").await;
    let (status, answer) = push(
        c,
        "shop-key",
        json!({"users": ["reader"], "data": {"text": "a spoiler"}}),
    )
    .await;
    assert_eq!(
        (status, answer["dropped"].as_str()),
        (202, Some("message contains a blocked word"))
    );
    let (status, _) = push(
        c,
        "shop-key",
        json!({"users": ["reader"], "data": {"text": "clean"}}),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(
        next_message(&mut reader).await["data"],
        json!({"text": "clean"})
    );

    // Removing the version through B removes it everywhere.
    let (status, _) = admin(
        b,
        "DELETE",
        &format!("/admin/v1/tenants/shop/plugins/{version}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    for node in [a, c] {
        admin_until(
            node,
            "/admin/v1/tenants/shop/plugins",
            "the plugin is gone",
            |_, list| list["versions"].as_array().is_some_and(Vec::is_empty),
        )
        .await;
    }

    // A tenant created through C can be used on A at once after.
    let settings = json!({"push_keys": ["new-key"], "auth": "development"});
    let (status, _) = admin(
        c,
        "PUT",
        "/admin/v1/tenants/newco",
        Some(settings.to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201);
    admin_until(
        a,
        "/admin/v1/tenants/newco",
        "the tenant exists",
        |status, _| status == 200,
    )
    .await;
    let mut newcomer = connect(a, "newco", "n").await;
    let (status, _) = push(b, "new-key", json!({"users": ["n"], "data": 1})).await;
    assert_eq!(status, 202);
    assert_eq!(next_message(&mut newcomer).await["data"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_of_one_tenant_through_two_nodes_leave_both_with_the_same_settings() {
    let rocketmq = Rocketmq::start();
    let nodes = cluster(&rocketmq, "converge", &["a", "b"]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let settings = |cap: u64| {
        json!({
            "push_keys": [format!("race-key-{cap}")],
            "auth": "development",
            "max_connections_per_user": cap,
        })
        .to_string()
        .into_bytes()
    };
    for round in 0..5 {
        let (through_a, through_b) = tokio::join!(
            admin(
                a,
                "PUT",
                "/admin/v1/tenants/race",
                Some(settings(10 + round))
            ),
            admin(
                b,
                "PUT",
                "/admin/v1/tenants/race",
                Some(settings(20 + round))
            ),
        );
        for (node, (status, answer)) in [(a, through_a), (b, through_b)] {
            assert!(
                status == 200 || status == 201,
                "PUT through {}: {status} {answer}",
                node.name
            );
        }
        // Changes are applied in the bus's order: once a node has applied
        // a change made after both, it has applied both.
        for (through, name) in [
            (a, format!("after-a-{round}")),
            (b, format!("after-b-{round}")),
        ] {
            let (status, answer) = admin(
                through,
                "PUT",
                &format!("/admin/v1/tenants/{name}"),
                Some(json!({"auth": "development"}).to_string().into_bytes()),
            )
            .await;
            assert_eq!(status, 201, "{answer}");
            for node in [a, b] {
                admin_until(
                    node,
                    &format!("/admin/v1/tenants/{name}"),
                    "the later change is applied",
                    |status, _| status == 200,
                )
                .await;
            }
        }
        let (_, on_a) = admin(a, "GET", "/admin/v1/tenants/race", None).await;
        let (_, on_b) = admin(b, "GET", "/admin/v1/tenants/race", None).await;
        let cap = &on_a["max_connections_per_user"];
        assert!(
            *cap == json!(10 + round) || *cap == json!(20 + round),
            "round {round}: {on_a}"
        );
        assert_eq!(
            (cap, &on_a["push_keys"]),
            (&on_b["max_connections_per_user"], &on_b["push_keys"]),
            "round {round}: the nodes disagree"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_cap_holds_across_nodes() {
    let rocketmq = Rocketmq::start();
    let nodes = cluster(&rocketmq, "cap", &["a", "b", "c"]);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    let mut on_a = connect(a, "acme", "dave").await;
    let mut on_b = connect(b, "acme", "dave").await;
    let mut on_c = connect(c, "acme", "dave").await;
    // The cap is 2: the oldest, on A, goes, closed by A with 4001.
    assert_eq!(on_a.close_code().await, 4001);
    // Dave's owner, asked through any node, knows the two that are left.
    presence_until(c, "dave", "the connections on b and c", |dave| {
        dave["count"] == 2
    })
    .await;

    push_accepted(a, json!({"users": ["dave"], "data": {"marker": "kept"}})).await;
    expect_only_marker(&mut on_b, "kept").await;
    expect_only_marker(&mut on_c, "kept").await;

    // A new connection on A closes the now oldest, on B. (Node A may
    // deliver "kept" to it first, if A's own copy of that push is still
    // on its way: a message in flight reaches a device that just came.)
    let _again_on_a = connect_taking_messages_in_flight(a, "acme", "dave").await;
    assert_eq!(on_b.close_code().await, 4001);
    push_accepted(b, json!({"users": ["dave"], "data": {"marker": "still"}})).await;
    expect_only_marker(&mut on_c, "still").await;
}

/// How soon pushes must be accepted again after the broker is back: it
/// takes well under a second here; before the engine renewed its producer,
/// the client's reconnection breaker made it ~30 s.
const ACCEPTED_AGAIN_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_answers_503_keeps_clients_and_recovers_without_restarts() {
    a_broker_outage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_while_pushes_are_routed_to_their_users_nodes() {
    a_broker_outage(true).await;
}

/// A broker killed and started again under two nodes, pushes routed to
/// their users' nodes or not.
async fn a_broker_outage(routing: bool) {
    let mut rocketmq = Rocketmq::start();
    let nodes = cluster_routing_or_not(&rocketmq, "outage", &["a", "b"], routing).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut erin = connect(b, "acme", "erin").await;
    if routing {
        until_routed(a, &mut erin, "erin", "acme-key").await;
    }

    let mut accepted = Vec::new();
    for n in 0..20 {
        accepted.push(push_accepted(a, json!({"users": ["erin"], "data": {"n": n}})).await);
    }
    let mut received = Vec::new();
    while received.len() < accepted.len() {
        received.push(
            next_message(&mut erin).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(
        received, accepted,
        "everything acknowledged before the outage arrived, in order"
    );

    tokio::task::block_in_place(|| rocketmq.kill_broker());
    // Pushes fail with 503 and a JSON error, never a false 202.
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    loop {
        let (status, answer) =
            push(a, "acme-key", json!({"users": ["erin"], "data": "during"})).await;
        if status == 503 {
            assert!(answer["error"]["message"].as_str().is_some(), "{answer}");
            break;
        }
        assert_eq!(status, 202, "{answer}");
        accepted.push(answer["id"].as_str().unwrap().to_owned());
        assert!(
            Instant::now() < deadline,
            "pushes kept being accepted without a broker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The node says why it is not ready; the client stays connected.
    eventually("readyz fails while the broker is gone", || {
        a.readyz().0 == 503
    })
    .await;
    assert!(a.readyz().1["reason"].as_str().is_some());
    erin.send_json(json!({"type": "ping"})).await;
    let pong = loop {
        let frame = erin.next_json().await;
        if frame["type"] == "message" {
            received.push(frame["id"].as_str().unwrap().to_owned());
            continue;
        }
        break frame;
    };
    assert_eq!(pong["type"], "pong");

    // A client that connects while the broker is gone: its node cannot
    // announce the connection yet.
    let mut fay = if routing {
        Some(connect(b, "acme", "fay").await)
    } else {
        None
    };

    tokio::task::block_in_place(|| rocketmq.start_broker());
    // Delivery resumes by itself: no node restarted.
    let resumed = Instant::now();
    let marker = loop {
        let (status, answer) = push(
            a,
            "acme-key",
            json!({"users": ["erin"], "data": {"marker": "back"}}),
        )
        .await;
        if status == 202 {
            let id = answer["id"].as_str().unwrap().to_owned();
            accepted.push(id.clone());
            break id;
        }
        // Before: ~30 s, the RocketMQ client's reconnection breaker (now
        // a fresh producer takes over); generous for a loaded machine.
        assert!(
            resumed.elapsed() < ACCEPTED_AGAIN_WITHIN,
            "pushes not accepted again within {ACCEPTED_AGAIN_WITHIN:?}: {answer}"
        );
        assert_eq!(status, 503, "{answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let accepted_after = resumed.elapsed();
    // The consumer's pull that was in flight when the broker died hangs
    // until its own timeout (about 30 s): a fresh consumer takes over,
    // from where the old one was.
    loop {
        let frame = tokio::time::timeout(CLUSTER_PATIENCE, next_message_slowly(&mut erin))
            .await
            .expect("delivery resumes");
        let id = frame["id"].as_str().unwrap().to_owned();
        received.push(id.clone());
        if id == marker {
            break;
        }
    }
    let delivered_after = resumed.elapsed();
    eprintln!(
        "after the broker restarted: pushes accepted again in {accepted_after:?}, \
         delivered again in {delivered_after:?}"
    );
    assert!(
        delivered_after < ACCEPTED_AGAIN_WITHIN * 2,
        "delivery resumed only after {delivered_after:?}"
    );
    // Nothing answered 202 was lost, nothing came twice.
    let mut unique = received.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        received.len(),
        "duplicates among {received:?}"
    );
    for id in &accepted {
        assert!(
            received.contains(id),
            "message {id} was acknowledged but never delivered"
        );
    }
    a.wait_ready();
    b.wait_ready();
    if let Some(fay) = &mut fay {
        // Her connection is announced once the broker takes it: pushes
        // through the other node find her (an announcement given up on
        // left her unknown there, every push to her sent nowhere).
        until_routed(a, fay, "fay", "acme-key").await;
    }
    // The outage is in the metrics: failed publishes, the way back, and
    // the consume lag of what was delivered.
    let metrics = a.metrics();
    let value = |name: &str| support::metric_value(&metrics, name, &[]);
    assert!(
        value("pushgate_bus_publish_errors_total") >= 1.0,
        "{metrics}"
    );
    assert!(value("pushgate_bus_reconnects_total") >= 1.0, "{metrics}");
    assert_eq!(value("pushgate_bus_ready"), 1.0);
    let lag = support::metric_value(&b.metrics(), "pushgate_bus_consume_lag_seconds_count", &[]);
    assert!(
        lag >= accepted.len() as f64,
        "consume lag recorded for {lag} messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_its_broker_starts_unready_and_becomes_ready_when_it_appears() {
    let mut rocketmq = Rocketmq::new();
    let node = NodeProcess::start(
        "lonely",
        &rocketmq.name_server(),
        &test_topic("late"),
        TENANTS,
    );
    eventually("readyz explains the missing broker", || {
        let (status, body) = node.readyz();
        status == 503
            && body["reason"]
                .as_str()
                .is_some_and(|r| r.contains("RocketMQ"))
    })
    .await;
    let (status, answer) = push(&node, "acme-key", json!({"broadcast": true, "data": 1})).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer["error"]["message"].as_str().is_some(), "{answer}");
    // WebSocket clients are served meanwhile.
    let mut client = connect(&node, "acme", "early").await;

    tokio::task::block_in_place(|| {
        rocketmq.start_name_server();
        rocketmq.start_broker();
    });
    node.wait_ready();
    push_accepted(
        &node,
        json!({"users": ["early"], "data": {"marker": "hello"}}),
    )
    .await;
    expect_only_marker(&mut client, "hello").await;
    client.socket.send(Message::Close(None)).await.ok();
    let _ = client.socket.next().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_a_node_cannot_read_are_counted_and_ignored() {
    use pushgate::bus::Bus;
    use pushgate::bus::envelope::{ENVELOPE_MAJOR, Envelope, Target};

    let rocketmq = Rocketmq::start();
    let nodes = cluster(&rocketmq, "versions", &["today"]);
    let node = &nodes[0];
    let mut frank = connect(node, "acme", "frank").await;

    // A node of a newer version publishes on the same topic.
    let future = raw_bus(&rocketmq.name_server(), &test_topic("versions"), "tomorrow").await;
    let for_frank = Envelope::new(
        "acme",
        Target::Users(vec!["frank".into()]),
        r#"{"marker":"readable"}"#.into(),
    );
    let mut newer = for_frank.encode();
    newer[0] = ENVELOPE_MAJOR + 1;
    future
        .publish_raw(vec![
            newer,
            vec![ENVELOPE_MAJOR, 0, 0xff, 0xff],
            for_frank.encode(),
        ])
        .await
        .expect("the broker takes them");

    // The node skips what it cannot read and delivers what it can.
    let frame = next_message(&mut frank).await;
    assert_eq!(frame["id"].as_str(), Some(for_frank.id.as_str()));
    assert_eq!(frame["data"]["marker"], "readable");
    let metrics = node.metrics();
    let rejected = |reason: &str| {
        support::metric_value(
            &metrics,
            "pushgate_bus_envelopes_rejected_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    assert_eq!((rejected("newer_major"), rejected("malformed")), (1.0, 1.0));
    assert_eq!(node.readyz().0, 200);
    future.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_control_events_are_refused_and_disturb_nothing() {
    use pushgate::bus::Bus;
    use pushgate::cluster::change::{Change, ControlEvent};

    let rocketmq = Rocketmq::start();
    let nodes = cluster(&rocketmq, "forged", &["honest"]);
    let node = &nodes[0];
    let mut frank = connect(node, "acme", "frank").await;

    // Something that is not a node writes control events to the topic.
    let forger = raw_bus(&rocketmq.name_server(), &test_topic("forged"), "forger").await;
    let version = "a".repeat(64);
    let forged = [
        Change::TenantPut {
            name: "../escape".to_owned(),
            settings_json: r#"{"auth":"development"}"#.to_owned(),
        },
        Change::TenantPut {
            name: "acme".to_owned(),
            settings_json: r#"{"auth":"jwt"}"#.to_owned(),
        },
        Change::PluginInstalled {
            tenant: "../outside".to_owned(),
            component: b"\0asm\x0d\0\x01\0".to_vec(),
            activate: true,
        },
        Change::PluginRemoved {
            tenant: "../outside".to_owned(),
            version: version.clone(),
        },
        Change::PluginActivated {
            tenant: "acme".to_owned(),
            version: "../../pushgate.toml".to_owned(),
        },
        Change::ConnectionOpened {
            tenant: "acme".to_owned(),
            user: "x".repeat(100_000),
            connection: 1,
            opened_at_micros: 0,
        },
        Change::ConnectionHeld {
            owner: "honest".to_owned(),
            tenant: "acme".to_owned(),
            user: "x".repeat(100_000),
            connection: 1,
            opened_at_micros: 0,
        },
        Change::PresenceAsked {
            owner: "honest".to_owned(),
            id: 1,
            tenant: "acme".to_owned(),
            users: vec!["frank".to_owned(); 1_001],
        },
    ];
    let count = forged.len() as f64;
    let records = forged
        .into_iter()
        .enumerate()
        .map(|(id, change)| {
            ControlEvent {
                origin: "forger".to_owned(),
                id: id as u64,
                change,
            }
            .encode()
        })
        .collect();
    forger
        .announce(records)
        .await
        .expect("the broker takes them");

    eventually("every forged event is refused", || {
        let metrics = node.metrics();
        let refused: f64 = [
            "tenant_put",
            "plugin_installed",
            "plugin_removed",
            "plugin_activated",
            "connection_opened",
            "connection_held",
            "presence_asked",
        ]
        .iter()
        .map(|event| {
            support::metric_value(
                &metrics,
                "pushgate_control_events_refused_total",
                &[&format!("event=\"{event}\"")],
            )
        })
        .sum();
        refused == count
    })
    .await;
    // Nothing changed: the tenants and their settings, the files next to
    // the store, the node's service.
    let (status, tenants) = admin(node, "GET", "/admin/v1/tenants", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = tenants["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme", "shop"], "{tenants}");
    let (_, acme) = admin(node, "GET", "/admin/v1/tenants/acme", None).await;
    assert_eq!(acme["auth"], "development", "{acme}");
    assert_eq!(acme["owned_users_connections_elsewhere"], 0, "{acme}");
    let mut files: Vec<String> = std::fs::read_dir(node.dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["pushgate.toml", "state"]);
    let mut kept: Vec<String> = std::fs::read_dir(node.dir().join("state"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert!(
        kept.iter().all(
            |f| ["audit.jsonl", "compiled", "lock", "plugins", "state.json"].contains(&f.as_str())
        ),
        "{kept:?}"
    );
    assert_eq!(node.readyz().0, 200);
    let (status, _) = push(
        node,
        "acme-key",
        json!({"users": ["frank"], "data": {"marker": "still"}}),
    )
    .await;
    assert_eq!(status, 202);
    expect_only_marker(&mut frank, "still").await;
    forger.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_delivers_what_the_broker_took_before_it_closes_its_clients() {
    let rocketmq = Rocketmq::start();
    let nodes = cluster(&rocketmq, "drain", &["leaving", "staying"]);
    let (leaving, staying) = (&nodes[0], &nodes[1]);
    let mut grace = connect(leaving, "acme", "grace").await;

    let mut accepted = Vec::new();
    for n in 0..50 {
        accepted.push(push_accepted(staying, json!({"users": ["grace"], "data": {"n": n}})).await);
    }
    let (status, _) = admin(leaving, "POST", "/admin/v1/drain", None).await;
    assert_eq!(status, 202);
    let mut received = Vec::new();
    let code = loop {
        match grace.socket.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                received.push(frame["id"].as_str().unwrap().to_owned());
            }
            Some(Ok(Message::Close(Some(close)))) => break u16::from(close.code),
            Some(Ok(_)) => continue,
            other => panic!("closed without a close frame: {other:?}"),
        }
    };
    assert_eq!(code, 1012);
    assert_eq!(
        received, accepted,
        "every acknowledged message came before the close"
    );
    // The cluster forgets the node that left.
    eventually("the staying node sees it leave", || {
        staying.readyz().1["peers"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_no_longer_counts_against_anybodys_cap() {
    let rocketmq = Rocketmq::start();
    let mut nodes = cluster(&rocketmq, "crash", &["a", "b"]);
    let on_b = connect(&nodes[1], "acme", "hank").await;
    presence_until(&nodes[0], "hank", "b's connection is known", |hank| {
        hank["count"] == 1
    })
    .await;

    // b dies without a goodbye (SIGKILL) and comes back under its name.
    drop(nodes.pop());
    drop(on_b);
    let b = NodeProcess::start("b", &rocketmq.name_server(), &test_topic("crash"), TENANTS);
    b.wait_ready();
    presence_until(
        &nodes[0],
        "hank",
        "b's old connection is forgotten",
        |hank| hank["count"] == 0,
    )
    .await;
    // hank's two new connections fit the cap of two.
    let mut first = connect(&nodes[0], "acme", "hank").await;
    let mut second = connect(&b, "acme", "hank").await;
    push_accepted(&b, json!({"users": ["hank"], "data": {"marker": "both"}})).await;
    expect_only_marker(&mut first, "both").await;
    expect_only_marker(&mut second, "both").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_withdrawn_while_the_broker_hangs_is_never_delivered() {
    let rocketmq = Rocketmq::start();
    let node = NodeProcess::start(
        "w",
        &rocketmq.name_server(),
        &test_topic("withdraw"),
        &format!("[push]\nbus_timeout = \"200ms\"\n{TENANTS}"),
    );
    node.wait_ready();
    let mut wendy = connect(&node, "acme", "wendy").await;
    let url = node.http("/v1/push");
    let push_in_background = |marker: String| {
        let url = url.clone();
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(url)
                .bearer_auth("acme-key")
                .json(&json!({"users": ["wendy"], "data": {"marker": marker}}))
                .send()
                .await
                .expect("push request");
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        })
    };

    let nothing_published = |answer: &Value| {
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nothing was published"))
    };
    rocketmq.pause_broker();
    // Pushes go to the frozen broker until one is taken and sent: still
    // unanswered after its bus_timeout. Those not taken in time (the bus
    // may be busy with its own probes to the frozen broker) are withdrawn.
    let mut withdrawn = Vec::new();
    let mut sent = loop {
        let marker = format!("attempt-{}", withdrawn.len());
        let mut push = push_in_background(marker.clone());
        match tokio::time::timeout(Duration::from_millis(600), &mut push).await {
            Err(_) => break push,
            Ok(answered) => {
                let (status, answer) = answered.unwrap();
                assert_eq!(status, 503, "{answer}");
                assert!(nothing_published(&answer), "{answer}");
                withdrawn.push(marker);
                assert!(
                    withdrawn.len() < 20,
                    "no push was ever sent to the frozen broker"
                );
            }
        }
    };
    // Queued behind it: withdrawn at bus_timeout, published nowhere.
    let (status, answer) = push_in_background("behind".to_owned()).await.unwrap();
    assert_eq!(status, 503, "{answer}");
    assert!(nothing_published(&answer), "{answer}");
    withdrawn.push("behind".to_owned());
    rocketmq.resume_broker();
    let (status, answer) = (&mut sent).await.unwrap();
    assert!(matches!(status, 202 | 503 | 504), "{status} {answer}");

    // Once pushes go through again, everything that arrives is what was
    // sent: never the withdrawn one.
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    while push(
        &node,
        "acme-key",
        json!({"users": ["wendy"], "data": {"marker": "after"}}),
    )
    .await
    .0 != 202
    {
        assert!(Instant::now() < deadline, "pushes never went through again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let until_after = async {
        loop {
            let frame = next_message_slowly(&mut wendy).await;
            let marker = frame["data"]["marker"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert!(
                !withdrawn.contains(&marker),
                "{marker}, answered 503, was delivered"
            );
            if marker == "after" {
                break;
            }
        }
    };
    tokio::time::timeout(CLUSTER_PATIENCE, until_after)
        .await
        .expect("the push after the outage arrives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_moves_to_another_node_gets_the_50_it_missed_in_order_then_live_ones() {
    let rocketmq = Rocketmq::start();
    let nodes = cluster(&rocketmq, "resume", &["a", "b", "c"]);
    let mut eve = connect(&nodes[0], "acme", "eve").await;
    let (status, _) = push(
        &nodes[1],
        "acme-key",
        json!({"users": ["eve"], "data": {"marker": "seen"}}),
    )
    .await;
    assert_eq!(status, 202);
    let seen = next_message(&mut eve).await;
    assert_eq!(seen["data"]["marker"], "seen");
    let since = seen["pos"].as_str().expect("a position").to_owned();
    eve.socket.send(Message::Close(None)).await.ok();
    drop(eve);

    // Fifty pushes through every node while she is away.
    for n in 0..50 {
        let (status, answer) = push(
            &nodes[n % 3],
            "acme-key",
            json!({"users": ["eve"], "data": {"n": n}}),
        )
        .await;
        assert_eq!(status, 202, "{answer}");
    }
    let url = format!("{}&since={since}", nodes[2].ws_url("acme", "eve"));
    let (socket, _) =
        tokio::time::timeout(support::PATIENCE, tokio_tungstenite::connect_async(url))
            .await
            .expect("handshake in time")
            .expect("handshake succeeds");
    let mut eve = Client { socket };
    let mut received = Vec::new();
    let mut recovered = None;
    while received.len() < 50 {
        let frame = next_message_or_recovered(&mut eve).await;
        match frame["type"].as_str() {
            Some("message") => received.push(frame["data"]["n"].as_u64().unwrap()),
            Some("recovered") => recovered = Some(frame),
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert_eq!(
        received,
        (0..50).collect::<Vec<u64>>(),
        "each once, in order"
    );
    let recovered = match recovered {
        Some(frame) => frame,
        None => next_message_or_recovered(&mut eve).await,
    };
    assert_eq!(recovered["type"], "recovered", "{recovered}");
    assert_eq!(recovered["complete"], true, "{recovered}");
    let (status, _) = push(
        &nodes[0],
        "acme-key",
        json!({"users": ["eve"], "data": {"marker": "live"}}),
    )
    .await;
    assert_eq!(status, 202);
    expect_only_marker(&mut eve, "live").await;
}

/// The next message or `recovered` frame (pings skipped).
async fn next_message_or_recovered(client: &mut Client) -> Value {
    loop {
        let frame = client.next_json().await;
        if matches!(frame["type"].as_str(), Some("message" | "recovered")) {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_every_nodes_connections_and_a_disconnect_through_one_node_closes_them_all()
{
    let rocketmq = Rocketmq::start();
    let nodes = cluster(&rocketmq, "presence", &["a", "b", "c"]);
    let mut on_a = connect(&nodes[0], "acme", "fay").await;
    let mut on_c = connect(&nodes[2], "acme", "fay").await;

    // Asked through the node that holds none of them.
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    loop {
        let (status, answer) = post(
            &nodes[1],
            "/v1/presence",
            "acme-key",
            json!({"users": ["fay", "gus"]}),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let fay = &answer["users"]["fay"];
        let mut held_by: Vec<&str> = fay["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["node"].as_str().unwrap())
            .collect();
        held_by.sort_unstable();
        if held_by == ["a", "c"] {
            assert_eq!(fay["count"], 2);
            assert_eq!(answer["users"]["gus"]["count"], 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence never saw both: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A push through b counts gus offline when asked to: the users'
    // owners answer.
    let body = |report: Option<bool>| {
        let mut body = json!({"users": ["fay", "gus"], "data": {"marker": "counted"}});
        if let Some(report) = report {
            body["report_offline"] = json!(report);
        }
        body
    };
    let (status, answer) = push(&nodes[1], "acme-key", body(Some(true))).await;
    assert_eq!(
        (status, &answer["offline_users"]),
        (202, &json!(1)),
        "{answer}"
    );
    let (status, answer) = push(&nodes[1], "acme-key", body(None)).await;
    assert_eq!(status, 202, "{answer}");
    assert!(answer.get("offline_users").is_none(), "not asked: {answer}");
    for client in [&mut on_a, &mut on_c] {
        expect_only_marker(client, "counted").await;
        expect_only_marker(client, "counted").await;
    }

    // Logged out through node a: closed on a and on c.
    let (status, answer) = post(
        &nodes[0],
        "/v1/disconnect",
        "acme-key",
        json!({"user": "fay"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["connections"], 2, "{answer}");
    assert_eq!(on_a.close_code().await, 4008);
    assert_eq!(on_c.close_code().await, 4008);
}

/// The next text frame, or `None` once the connection closed.
async fn next_frame_or_close(client: &mut Client) -> Option<Value> {
    // One deadline for the call: the server's pings, skipped, must not
    // keep a client that receives nothing else waiting for ever.
    let deadline = tokio::time::Instant::now() + CLUSTER_PATIENCE;
    loop {
        let next = tokio::time::timeout_at(deadline, client.socket.next())
            .await
            .expect("a frame or a close in time");
        match next {
            Some(Ok(Message::Text(text))) => return Some(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_draining_node_that_resumes_on_another_loses_nothing() {
    a_client_of_a_draining_node_resumes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_draining_routing_node_that_resumes_on_another_loses_nothing() {
    a_client_of_a_draining_node_resumes(true).await;
}

/// A client of a draining node resumes on another while a service pushes
/// to it all along, pushes routed to their users' nodes or not.
async fn a_client_of_a_draining_node_resumes(routing: bool) {
    let rocketmq = Rocketmq::start();
    let names = ["leaving", "pushing", "staying"];
    let nodes = cluster_routing_or_not(&rocketmq, "drain-resume", &names, routing).await;
    let mut hal = connect(&nodes[0], "acme", "hal").await;
    if routing {
        until_routed(&nodes[1], &mut hal, "hal", "acme-key").await;
    }
    // A service pushes to hal all along; these are the ones it got 202 for.
    let pusher = {
        let url = nodes[1].http("/v1/push");
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut accepted = Vec::new();
            for n in 0..200u64 {
                let response = http
                    .post(&url)
                    .bearer_auth("acme-key")
                    .json(&json!({"users": ["hal"], "data": {"n": n}}))
                    .send()
                    .await
                    .expect("push request");
                if response.status() == 202 {
                    accepted.push(n);
                }
            }
            accepted
        })
    };
    let mut received = Vec::new();
    let mut last: Option<String> = None;
    let record = |frame: &Value, received: &mut Vec<u64>, last: &mut Option<String>| {
        if frame["type"] == "message" {
            received.push(frame["data"]["n"].as_u64().unwrap());
            *last = frame["pos"].as_str().map(str::to_owned);
        }
    };
    while received.len() < 20 {
        let frame = next_frame_or_close(&mut hal).await.expect("open");
        record(&frame, &mut received, &mut last);
    }
    let (status, _) = admin(&nodes[0], "POST", "/admin/v1/drain", None).await;
    assert_eq!(status, 202);
    while let Some(frame) = next_frame_or_close(&mut hal).await {
        record(&frame, &mut received, &mut last);
    }
    // As the client library does: to another node, from the last position.
    let since = last.clone().expect("a position");
    let url = format!("{}&since={since}", nodes[2].ws_url("acme", "hal"));
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("handshake succeeds");
    let mut hal = Client { socket };
    let accepted = pusher.await.unwrap();
    // What the resumed connection sent, to say what went missing where.
    let mut resumed = Vec::new();
    while received.len() < accepted.len() {
        // Within the helper's own deadline, to say what is missing.
        let next = tokio::time::timeout(CLUSTER_PATIENCE / 2, next_frame_or_close(&mut hal));
        let Ok(Some(frame)) = next.await else {
            panic!(
                "open, and more to come: received {received:?}, accepted {accepted:?}; \
                 resumed from {since}: {resumed:?}"
            );
        };
        resumed.push(format!(
            "{} {} {}",
            frame["type"], frame["data"]["n"], frame["pos"]
        ));
        if frame["type"] == "recovered" {
            assert_eq!(frame["complete"], true, "{frame}");
        }
        record(&frame, &mut received, &mut last);
    }
    assert_eq!(received, accepted, "every accepted push, once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_on_every_node_and_no_message_is_lost_or_doubled() {
    let rocketmq = Rocketmq::start();
    let nodes = cluster(&rocketmq, "canary", &["a", "b", "c"]);
    let a = &nodes[0];
    let plugins = "/admin/v1/tenants/shop/plugins";
    // The active version passes these messages; the canary traps on them.
    let (status, answer) = admin(a, "POST", plugins, Some(plugin("keyword_filter"))).await;
    assert_eq!(status, 201, "{answer}");
    let active = answer["version"].as_str().unwrap().to_owned();
    let inactive = format!("{plugins}?activate=false");
    let (status, answer) = admin(a, "POST", &inactive, Some(plugin("misbehave"))).await;
    assert_eq!(status, 201, "{answer}");
    let canary = answer["version"].as_str().unwrap().to_owned();
    let half = Some(br#"{"percent": 50}"#.to_vec());
    let (status, answer) = admin(a, "POST", &format!("{plugins}/{canary}/canary"), half).await;
    assert_eq!(
        (status, &answer["canary_percent"]),
        (200, &json!(50)),
        "{answer}"
    );
    for node in &nodes {
        admin_until(node, plugins, "the canary runs", |_, list| {
            list["canary"]["version"] == canary.as_str()
        })
        .await;
    }

    let users: Vec<String> = (0..12).map(|n| format!("user-{n}")).collect();
    let mut clients = Vec::new();
    for (n, user) in users.iter().enumerate() {
        clients.push(connect(&nodes[n % 3], "shop", user).await);
    }
    // Pushed through every node in turn, while the canary fails and is
    // rolled back: the failure policy is open, so each message reaches
    // its user whichever version decided it.
    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        for (n, user) in users.iter().enumerate() {
            let node = &nodes[(round + n) % 3];
            let body = json!({"users": [user], "data": {"text": "a trap", "round": round}});
            let (status, answer) = push(node, "shop-key", body).await;
            assert_eq!(status, 202, "through {}: {answer}", node.name);
        }
    }
    for node in &nodes {
        admin_until(node, plugins, "the canary rolled back", |_, list| {
            list["canary"].is_null()
                && list["active"] == active.as_str()
                && list["last_canary_rollback"]["version"] == canary.as_str()
        })
        .await;
    }
    let mut traps = 0.0;
    for node in &nodes {
        let metrics = node.metrics();
        let shop = "tenant=\"shop\"";
        assert_eq!(
            support::metric_value(&metrics, "pushgate_plugin_canary_rollbacks_total", &[shop]),
            1.0,
            "node {}",
            node.name
        );
        traps += support::metric_value(
            &metrics,
            "pushgate_plugin_calls_total",
            &[shop, "outcome=\"trap\""],
        );
    }
    assert!(traps >= 5.0, "the canary failed {traps} times");

    // Every message reached its user once, in order, unchanged.
    for (n, user) in users.iter().enumerate() {
        let marker = format!("end-{user}");
        push(
            &nodes[n % 3],
            "shop-key",
            json!({"users": [user], "data": {"marker": marker}}),
        )
        .await;
    }
    for (user, client) in users.iter().zip(&mut clients) {
        for round in 0..ROUNDS {
            let frame = next_message(client).await;
            assert_eq!(
                frame["data"],
                json!({"text": "a trap", "round": round}),
                "{user}"
            );
        }
        expect_only_marker(client, &format!("end-{user}")).await;
    }
}

/// Polls `GET path` of `node` with admin key `key` until it answers
/// `status`; returns how long that took.
async fn key_answers(node: &NodeProcess, key: &str, path: &str, status: u16) -> Duration {
    let started = Instant::now();
    let deadline = started + CLUSTER_PATIENCE;
    loop {
        let answer = reqwest::Client::new()
            .get(node.http(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("the admin API answers");
        if answer.status().as_u16() == status {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{path} with the key on node {}: {} instead of {status}",
            node.name,
            answer.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_reach_every_node_a_revoked_one_is_refused_everywhere_and_all_survive_a_full_restart()
{
    let rocketmq = Rocketmq::start();
    let mut nodes = cluster(&rocketmq, "control_state", &["a", "b", "c"]);
    let team = json!({"push_keys": ["team-key"], "auth": "development"});
    let (status, answer) = admin(
        &nodes[0],
        "PUT",
        "/admin/v1/tenants/team",
        Some(team.to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let made = |name: &str| json!({"name": name, "role": "tenant-admin", "tenant": "team"});
    let (status, kept) = admin(
        &nodes[0],
        "POST",
        "/admin/v1/keys",
        Some(made("team-admins").to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201, "{kept}");
    let kept = kept["key"].as_str().unwrap().to_owned();
    let (status, revoked) = admin(
        &nodes[0],
        "POST",
        "/admin/v1/keys",
        Some(made("leaked").to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201, "{revoked}");
    let revoked_id = revoked["id"].as_str().unwrap().to_owned();
    let revoked = revoked["key"].as_str().unwrap().to_owned();
    for node in &nodes {
        key_answers(node, &revoked, "/admin/v1/tenants/team", 200).await;
    }
    let (status, _) = admin(
        &nodes[1],
        "DELETE",
        &format!("/admin/v1/keys/{revoked_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    for node in &nodes {
        let took = key_answers(node, &revoked, "/admin/v1/tenants/team", 401).await;
        eprintln!(
            "revocation seen on node {} {took:?} after the answer",
            node.name
        );
    }

    // Every node killed at once, every node started again: the same state.
    for node in &mut nodes {
        node.kill_and_start_again();
    }
    for node in &nodes {
        node.wait_ready();
        key_answers(node, &kept, "/admin/v1/tenants/team", 200).await;
        key_answers(node, &revoked, "/admin/v1/tenants/team", 401).await;
        let (status, _) = push(
            node,
            "team-key",
            json!({"users": ["ann"], "data": "after the restart"}),
        )
        .await;
        assert_eq!(status, 202, "team's push key on node {}", node.name);
        let (_, audit) = admin(node, "GET", "/admin/v1/audit?tenant=team", None).await;
        let actions: Vec<&str> = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["change"]["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions,
            ["key_revoked", "key_created", "key_created", "tenant_put"],
            "node {}",
            node.name
        );
    }

    // Changes made while a node is down reach it when it is back, before
    // it reports ready; a node that joins later with an empty state
    // directory reaches the whole state (plugins included) by itself.
    nodes[2].kill();
    let late = json!({"push_keys": ["late-key"], "auth": "development"});
    let (status, _) = admin(
        &nodes[0],
        "PUT",
        "/admin/v1/tenants/late",
        Some(late.to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201);
    let (status, uploaded) = admin(
        &nodes[1],
        "POST",
        "/admin/v1/tenants/team/plugins",
        Some(plugin("keyword_filter")),
    )
    .await;
    assert_eq!(status, 201, "{uploaded}");
    nodes[2].kill_and_start_again();
    let topic = test_topic("control_state");
    let joiner = NodeProcess::start("d", &rocketmq.name_server(), &topic, TENANTS);
    for node in [&nodes[2], &joiner] {
        node.wait_ready();
        // Ready means caught up: no waiting for the state.
        let (status, plugins) = admin(node, "GET", "/admin/v1/tenants/team/plugins", None).await;
        assert_eq!(status, 200, "node {}", node.name);
        assert_eq!(plugins["active"], uploaded["version"], "node {}", node.name);
        let (status, _) = admin(node, "GET", "/admin/v1/tenants/late", None).await;
        assert_eq!(status, 200, "node {}", node.name);
        let (status, _) = push(
            node,
            "late-key",
            json!({"users": ["ann"], "data": "caught up"}),
        )
        .await;
        assert_eq!(status, 202, "node {}", node.name);
        key_answers(node, &kept, "/admin/v1/tenants/team", 200).await;
        key_answers(node, &revoked, "/admin/v1/tenants/team", 401).await;
    }
}

/// A broker keeps its log for a while (`fileReservedTime`), then drops it a
/// segment at a time. A node that was down longer, or that joins a cluster
/// older than that, finds the changes it needs gone: it takes the cluster's
/// state from a running node (a snapshot on the control queue) and reports
/// ready only with it — never serving a state with holes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_need_changes_the_broker_dropped_take_a_snapshot_and_are_ready_with_it() {
    let rocketmq = Rocketmq::start_with_short_retention();
    let topic = test_topic("snapshots");
    let mut nodes = cluster(&rocketmq, "snapshots", &["a", "b"]);
    let tenant = |key: &str| json!({"push_keys": [key], "auth": "development"});
    // b takes a change, so that it has a state that knows where it read.
    let (status, _) = admin(
        &nodes[0],
        "PUT",
        "/admin/v1/tenants/early",
        Some(tenant("early-key").to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201);
    let _ = key_answers(
        &nodes[1],
        support::ADMIN_TOKEN,
        "/admin/v1/tenants/early",
        200,
    )
    .await;
    nodes[1].kill();

    // While b is down: a tenant, a key, a plugin activated.
    let (status, _) = admin(
        &nodes[0],
        "PUT",
        "/admin/v1/tenants/late",
        Some(tenant("late-key").to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201);
    let (status, made) = admin(
        &nodes[0],
        "POST",
        "/admin/v1/keys",
        Some(
            json!({"name": "late-admins", "role": "tenant-admin", "tenant": "late"})
                .to_string()
                .into_bytes(),
        ),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let late_admin = made["key"].as_str().unwrap().to_owned();
    let (status, uploaded) = admin(
        &nodes[0],
        "POST",
        "/admin/v1/tenants/shop/plugins",
        Some(plugin("keyword_filter")),
    )
    .await;
    assert_eq!(status, 201, "{uploaded}");
    let (status, _) = admin(&nodes[0], "DELETE", "/admin/v1/tenants/early", None).await;
    assert_eq!(status, 204);

    fill_until_the_broker_drops_its_first_segment(&rocketmq, &nodes[0]).await;

    // b comes back with its state, which lacks changes the broker no longer
    // has; c joins with an empty state directory.
    nodes[1].kill_and_start_again();
    let joiner = NodeProcess::start("c", &rocketmq.name_server(), &topic, TENANTS);
    for node in [&nodes[1], &joiner] {
        node.wait_ready();
        let (status, _) = admin(node, "GET", "/admin/v1/tenants/late", None).await;
        assert_eq!(status, 200, "node {}", node.name);
        let (status, _) = admin(node, "GET", "/admin/v1/tenants/early", None).await;
        assert_eq!(
            status, 404,
            "node {}: a removed tenant stays removed",
            node.name
        );
        let (status, plugins) = admin(node, "GET", "/admin/v1/tenants/shop/plugins", None).await;
        assert_eq!(status, 200, "node {}", node.name);
        assert_eq!(plugins["active"], uploaded["version"], "node {}", node.name);
        key_answers(node, &late_admin, "/admin/v1/tenants/late", 200).await;
        let (status, _) = push(node, "late-key", json!({"users": ["u"], "data": 2})).await;
        assert_eq!(status, 202, "node {}", node.name);
        let (_, readyz) = node.readyz();
        assert!(readyz.get("missing_changes").is_none(), "{readyz}");
    }

    // Changes made after go on reaching them.
    let (status, _) = admin(
        &nodes[0],
        "PUT",
        "/admin/v1/tenants/later",
        Some(tenant("later-key").to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201);
    for node in [&nodes[1], &joiner] {
        key_answers(node, support::ADMIN_TOKEN, "/admin/v1/tenants/later", 200).await;
    }
}

/// Pushes through `node` until the broker dropped the first segment of its
/// log (the control records in it are gone).
async fn fill_until_the_broker_drops_its_first_segment(rocketmq: &Rocketmq, node: &NodeProcess) {
    let filler = "x".repeat(60_000);
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    let mut pushed = 0;
    while rocketmq.keeps_first_segment() {
        assert!(
            Instant::now() < deadline,
            "the broker kept its first segment after {pushed} pushes"
        );
        let (status, answer) = push(
            node,
            "acme-key",
            json!({"users": ["nobody"], "data": filler}),
        )
        .await;
        assert_eq!(status, 202, "{answer}");
        pushed += 1;
        if pushed > 60 {
            // Enough to fill two segments: the clean-up runs every 10 s.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!("the broker dropped its first segment after {pushed} pushes");
}

fn snapshots(node: &NodeProcess, event: &str) -> f64 {
    support::metric_value(
        &node.metrics(),
        "pushgate_control_snapshots_total",
        &[&format!("event=\"{event}\"")],
    )
}

/// Every node that had the state is gone, and the broker dropped the
/// changes that made it: the periodic snapshot on the control queue is
/// enough for a node started then to reach the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_snapshot_brings_a_new_node_the_state_when_no_node_that_had_it_runs() {
    let rocketmq = Rocketmq::start_with_short_retention();
    let topic = test_topic("periodic_snapshots");
    let mut a = NodeProcess::start_with_state(
        "a",
        &rocketmq.name_server(),
        &topic,
        TENANTS,
        r#"snapshot_every = "1s""#,
    );
    a.wait_ready();
    let late = json!({"push_keys": ["late-key"], "auth": "development"});
    let (status, _) = admin(
        &a,
        "PUT",
        "/admin/v1/tenants/late",
        Some(late.to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201);
    let (status, made) = admin(
        &a,
        "POST",
        "/admin/v1/keys",
        Some(
            json!({"name": "late-viewers", "role": "viewer", "tenant": "late"})
                .to_string()
                .into_bytes(),
        ),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let viewer = made["key"].as_str().unwrap().to_owned();
    fill_until_the_broker_drops_its_first_segment(&rocketmq, &a).await;
    // Three snapshots after the drop: the newest segment, which the broker
    // keeps, holds at least one whole.
    let sent = snapshots(&a, "sent");
    eventually("three more snapshots sent", || {
        snapshots(&a, "sent") >= sent + 3.0
    })
    .await;
    a.kill();

    let c = NodeProcess::start("c", &rocketmq.name_server(), &topic, TENANTS);
    c.wait_ready();
    assert_eq!(snapshots(&c, "installed"), 1.0);
    let (status, _) = admin(&c, "GET", "/admin/v1/tenants/late", None).await;
    assert_eq!(status, 200);
    key_answers(&c, &viewer, "/admin/v1/tenants/late", 200).await;
    let (status, _) = push(&c, "late-key", json!({"users": ["u"], "data": 1})).await;
    assert_eq!(status, 202);
}

/// With two broker groups, admin changes keep to the control log's queue
/// (the first group's): a node that restarts reads every change it missed
/// from there. While that broker is down they are refused (503) — never
/// sent to a queue no restarting node reads again — and pushes go on
/// through the other group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_keep_to_the_log_queue_when_its_broker_group_is_down() {
    let mut rocketmq = Rocketmq::start();
    let _second = rocketmq.start_second_broker();
    let mut nodes = cluster(&rocketmq, "control_log", &["a", "b"]);
    nodes[1].kill();
    rocketmq.kill_broker();
    let during = json!({"push_keys": ["during-key"], "auth": "development"});
    let put_during = || {
        admin(
            &nodes[0],
            "PUT",
            "/admin/v1/tenants/during",
            Some(during.to_string().into_bytes()),
        )
    };
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    loop {
        let (status, answer) =
            push(&nodes[0], "acme-key", json!({"users": ["u"], "data": 1})).await;
        if status == 202 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pushes refused: {status} {answer}"
        );
    }
    let (status, answer) = put_during().await;
    assert_eq!(status, 503, "{answer}");
    eprintln!("refused while the log's broker is down: {answer}");

    rocketmq.start_broker();
    loop {
        let (status, answer) = put_during().await;
        if status == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline + CLUSTER_PATIENCE,
            "the change is still refused with its broker back: {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    nodes[1].kill_and_start_again();
    nodes[1].wait_ready();
    let (status, _) = admin(&nodes[1], "GET", "/admin/v1/tenants/during", None).await;
    assert_eq!(
        status, 200,
        "the restarted node read the change from the log"
    );
}

/// The console's figures are the cluster's: each node's connections, its
/// owned users online anywhere (a user on two nodes counts once) and its
/// pushes, summed on whichever node is asked.
#[tokio::test]
async fn every_node_reports_the_clusters_connections_users_and_pushes_of_a_tenant() {
    let rocketmq = Rocketmq::start();
    let topic = test_topic("figures");
    let nodes: Vec<NodeProcess> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            NodeProcess::start_with_settings(
                name,
                &rocketmq.name_server(),
                &topic,
                TENANTS,
                "",
                r#"figures_every = "500ms""#,
            )
        })
        .collect();
    for node in &nodes {
        node.wait_ready();
    }
    let _fay_on_a = connect(&nodes[0], "acme", "fay").await;
    let _fay_on_c = connect(&nodes[2], "acme", "fay").await;
    let _gus_on_b = connect(&nodes[1], "acme", "gus").await;
    for node in &nodes {
        admin_until(
            node,
            "/admin/v1/tenants/acme/figures",
            "three connections of two users on three nodes",
            |status, answer| {
                let now = &answer["now"];
                status == 200 && now["connections"] == 3 && now["users"] == 2 && now["nodes"] == 3
            },
        )
        .await;
    }
    // Pushes through b are seen, per second, through a.
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    loop {
        for _ in 0..20 {
            let (status, _) =
                push(&nodes[1], "acme-key", json!({"users": ["fay"], "data": 1})).await;
            assert_eq!(status, 202);
        }
        let (_, answer) = admin(&nodes[0], "GET", "/admin/v1/tenants/acme/figures", None).await;
        let series = answer["series"].as_array().unwrap();
        let seen = series
            .iter()
            .any(|s| s["pushed_per_second"].as_f64().unwrap() > 0.0);
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no pushes in a's figures: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
