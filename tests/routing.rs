//! Pushes routed to their users' nodes (`bus.rocketmq.route_to_holders`):
//! three `pushgate` processes on loopback through a real RocketMQ name
//! server and broker (started by these tests on free ports, stopped by
//! PID when each test ends).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::rocketmq::{
    CLUSTER_PATIENCE, NodeProcess, Rocketmq, raw_bus, start_nodes, test_topic, until_routed,
    until_routing,
};
use support::{Client, metric_value};

const TENANTS: &str = r#"
[tenants.acme]
push_keys = ["acme-key"]
auth = "development"
max_connections_per_user = 2
"#;

/// Ready routing nodes called `names`, on one broker and a topic of
/// `test`'s own, each routing (they heard each other and settled).
async fn routing_cluster(rocketmq: &Rocketmq, test: &str, names: &[&str]) -> Vec<NodeProcess> {
    let nodes = start_nodes(&rocketmq.name_server(), test, names, TENANTS, true);
    until_routing(&nodes).await;
    nodes
}

async fn push(node: &NodeProcess, body: Value) -> Value {
    let response = reqwest::Client::new()
        .post(node.http("/v1/push"))
        .bearer_auth("acme-key")
        .json(&body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("push request");
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 202, "push through {} answered {answer}", node.name);
    answer
}

/// A client of `user` on `nodes[on]` whose connection every node routes
/// to: pushes to the user through every node reach it.
async fn connect_routed(nodes: &[NodeProcess], on: usize, user: &str) -> Client {
    let mut client = support::connect_url(nodes[on].ws_url("acme", user)).await;
    for node in nodes {
        until_routed(node, &mut client, user, "acme-key").await;
    }
    client
}

/// The next `message` frame's data (pings skipped).
async fn next_data(client: &mut Client) -> Value {
    loop {
        let frame = client.next_json().await;
        match frame["type"].as_str() {
            Some("message") => return frame,
            Some("pong") => continue,
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

/// Envelopes `node` received for tenant `acme` that it held no
/// recipient of.
fn received_for_nobody(node: &NodeProcess) -> f64 {
    metric_value(
        &node.metrics(),
        "pushgate_messages_dropped_total",
        &["tenant=\"acme\"", "reason=\"no_local_recipient\""],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_reaches_only_the_nodes_of_its_users_in_order_through_any_node() {
    let rocketmq = Rocketmq::start();
    let nodes = routing_cluster(&rocketmq, "routing-only", &["a", "b", "c"]).await;
    let mut eve = connect_routed(&nodes, 0, "eve").await;
    let mut bob = connect_routed(&nodes, 1, "bob").await;
    let before = received_for_nobody(&nodes[2]);
    for n in 0..60 {
        let user = if n % 2 == 0 { "eve" } else { "bob" };
        push(&nodes[n % 3], json!({"users": [user], "data": {"n": n}})).await;
    }
    // Both of eve's and bob's at once: a copy for each of their nodes.
    push(
        &nodes[2],
        json!({"users": ["eve", "bob"], "data": {"n": "both"}}),
    )
    .await;
    for (client, first) in [(&mut eve, 0), (&mut bob, 1)] {
        for n in (first..60).step_by(2) {
            let frame = next_data(client).await;
            assert_eq!(frame["data"]["n"], n, "in order, each once: {frame}");
        }
        let both = next_data(client).await;
        assert_eq!(both["data"]["n"], "both", "{both}");
        // The position is the same on both nodes: the first copy's.
        assert!(both["pos"].is_string(), "{both}");
    }
    assert_eq!(
        received_for_nobody(&nodes[2]),
        before,
        "node c, which holds neither user, received none of their pushes"
    );
    // A broadcast still reaches every node.
    push(&nodes[1], json!({"broadcast": true, "data": {"n": "all"}})).await;
    assert_eq!(next_data(&mut eve).await["data"]["n"], "all");
    assert_eq!(next_data(&mut bob).await["data"]["n"], "all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_moves_while_pushes_are_in_flight_gets_exactly_what_it_missed() {
    let rocketmq = Rocketmq::start();
    let nodes = routing_cluster(&rocketmq, "routing-resume", &["a", "b", "c"]).await;
    let mut eve = connect_routed(&nodes, 0, "eve").await;
    let seen = next_data_after(&mut eve, &nodes[1], "seen").await;
    let since = seen["pos"].as_str().expect("a position").to_owned();
    drop(eve);

    // While she is away: pushes through every node, routed to node a (or
    // to nobody, once a knows she left), none to c, where she comes back.
    for n in 0..30 {
        push(&nodes[n % 3], json!({"users": ["eve"], "data": {"n": n}})).await;
    }
    // She comes back on c while pushes keep coming through every node,
    // until her resume is over.
    let resumed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pushing = {
        let nodes: Vec<(String, String)> = nodes
            .iter()
            .map(|node| (node.name.clone(), node.http("/v1/push")))
            .collect();
        let resumed = resumed.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 30;
            while !resumed.load(std::sync::atomic::Ordering::Acquire) || n < 60 {
                let (name, url) = &nodes[n % 3];
                let response = client
                    .post(url)
                    .bearer_auth("acme-key")
                    .json(&json!({"users": ["eve"], "data": {"n": n}}))
                    .send()
                    .await
                    .expect("push request");
                assert_eq!(response.status().as_u16(), 202, "push through {name}");
                n += 1;
            }
            n as u64
        })
    };
    // Some of them on their way before she connects.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let url = format!("{}&since={since}", nodes[2].ws_url("acme", "eve"));
    let mut eve = support::connect_url(url).await;
    let mut received = Vec::new();
    let mut recovered = None;
    while recovered.is_none() {
        let frame = eve.next_json().await;
        match frame["type"].as_str() {
            Some("message") => received.push(frame["data"]["n"].as_u64().expect("a number")),
            Some("recovered") => recovered = Some(frame),
            _ => panic!("unexpected frame {frame}"),
        }
    }
    resumed.store(true, std::sync::atomic::Ordering::Release);
    let pushed = pushing.await.expect("every push accepted");
    while (received.len() as u64) < pushed {
        let frame = next_data(&mut eve).await;
        received.push(frame["data"]["n"].as_u64().expect("a number"));
    }
    assert_eq!(
        received,
        (0..pushed).collect::<Vec<u64>>(),
        "what she missed and what came while she resumed: each once, in order"
    );
    let recovered = recovered.expect("a recovered frame");
    assert_eq!(recovered["complete"], true, "{recovered}");
    // Nothing else is on its way: the next frame is the next push.
    push(&nodes[0], json!({"users": ["eve"], "data": {"n": "live"}})).await;
    assert_eq!(next_data(&mut eve).await["data"]["n"], "live");
}

/// Pushes `marker` to `client`'s user through `through`, and returns its
/// frame once it arrived.
async fn next_data_after(client: &mut Client, through: &NodeProcess, marker: &str) -> Value {
    push(
        through,
        json!({"users": ["eve"], "data": {"marker": marker}}),
    )
    .await;
    loop {
        let frame = next_data(client).await;
        if frame["data"]["marker"] == marker {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_resuming_connection_has_the_other_nodes_probe_early() {
    let rocketmq = Rocketmq::start();
    let nodes = routing_cluster(&rocketmq, "routing-probes", &["a", "b", "c"]).await;
    let early =
        |node: &NodeProcess| metric_value(&node.metrics(), "pushgate_bus_early_probes_total", &[]);
    let mut eve = connect_routed(&nodes, 0, "eve").await;
    let since = next_data_after(&mut eve, &nodes[1], "seen").await["pos"]
        .as_str()
        .expect("a position")
        .to_owned();
    drop(eve);
    // Fresh connections on a (no `since`) wait for nobody's fence: b does
    // not probe early for them (a ramp of connections on fifty nodes had
    // each probe ten times a second, each probe read by all).
    let applied = |node: &NodeProcess, event: &str| {
        let label = format!("event=\"{event}\"");
        metric_value(
            &node.metrics(),
            "pushgate_control_events_total",
            &[label.as_str()],
        )
    };
    let before = early(&nodes[1]);
    let (singles, batches) = (
        applied(&nodes[1], "connection_held"),
        applied(&nodes[1], "connections"),
    );
    let mut fresh = Vec::new();
    for n in 0..20 {
        let user = format!("fresh{n}");
        fresh.push(support::connect_url(nodes[0].ws_url("acme", &user)).await);
    }
    until_routed(&nodes[1], &mut fresh[19], "fresh19", "acme-key").await;
    assert!(applied(&nodes[1], "connections") > batches);
    // (A node whose consumer is renewed on a loaded machine stops saying
    // it routes for a while: announcements then go one per record, each
    // probed for as before.)
    if applied(&nodes[1], "connection_held") == singles {
        assert_eq!(
            early(&nodes[1]),
            before,
            "b probed early for connections nobody waited on"
        );
    }
    // Eve resumes on c: she waits for every node's fence, and b probes
    // early for her.
    let url = format!("{}&since={since}", nodes[2].ws_url("acme", "eve"));
    let mut eve = support::connect_url(url).await;
    assert_eq!(eve.next_json().await["type"], "recovered");
    support::eventually("b probed early for eve's resume", CLUSTER_PATIENCE, || {
        early(&nodes[1]) > before
    })
    .await;
}

/// Asks `node` for `users`' presence (`/v1/presence`).
async fn presence(node: &NodeProcess, users: &[&str]) -> Value {
    let response = reqwest::Client::new()
        .post(node.http("/v1/presence"))
        .bearer_auth("acme-key")
        .json(&json!({ "users": users }))
        .send()
        .await
        .expect("presence request");
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.expect("a JSON answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_presence_and_offline_users_hold_while_pushes_are_routed() {
    let rocketmq = Rocketmq::start();
    let nodes = routing_cluster(&rocketmq, "routing-cap", &["a", "b", "c"]).await;
    let mut first = connect_routed(&nodes, 0, "eve").await;
    let mut second = connect_routed(&nodes, 1, "eve").await;
    tokio::time::timeout(CLUSTER_PATIENCE, async {
        while presence(&nodes[2], &["eve"]).await["users"]["eve"]["count"] != 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("c's presence answer lists both of eve's connections");
    // A third connection, on c: the oldest (on a) is closed, the others
    // keep receiving pushes through any node.
    let mut third = support::connect_url(nodes[2].ws_url("acme", "eve")).await;
    assert_eq!(first.close_code().await, 4001);
    for (n, node) in nodes.iter().enumerate() {
        let answer = push(
            node,
            json!({"users": ["eve", "nobody"], "report_offline": true, "data": {"n": n}}),
        )
        .await;
        assert_eq!(answer["offline_users"], 1, "nobody is offline: {answer}");
    }
    for client in [&mut second, &mut third] {
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let frame = next_data(client).await;
            if frame["data"]["marker"].is_null() {
                seen.push(frame["data"]["n"].as_u64().unwrap());
            }
        }
        assert_eq!(seen, [0, 1, 2]);
    }
    // The connections were announced in batches: the form every node
    // reads once all of them route.
    let batches = |node: &NodeProcess| {
        metric_value(
            &node.metrics(),
            "pushgate_control_events_total",
            &["event=\"connections\""],
        )
    };
    assert!(
        batches(&nodes[2]) >= 1.0,
        "c read no batch of connection facts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_killed_node_resumes_on_another_and_loses_nothing() {
    let rocketmq = Rocketmq::start();
    let mut nodes = routing_cluster(&rocketmq, "routing-kill", &["a", "b", "c"]).await;
    let mut eve = connect_routed(&nodes, 0, "eve").await;
    let seen = next_data_after(&mut eve, &nodes[1], "seen").await;
    let since = seen["pos"].as_str().expect("a position").to_owned();
    nodes[0].kill();
    // Routed to a, which is gone, until b and c see it silent.
    for n in 0..30 {
        push(
            &nodes[1 + n % 2],
            json!({"users": ["eve"], "data": {"n": n}}),
        )
        .await;
    }
    drop(eve);
    let url = format!("{}&since={since}", nodes[1].ws_url("acme", "eve"));
    let mut eve = support::connect_url(url).await;
    let mut received = Vec::new();
    let recovered = loop {
        let frame = eve.next_json().await;
        match frame["type"].as_str() {
            Some("message") => received.push(frame["data"]["n"].as_u64().expect("a number")),
            Some("recovered") => break frame,
            _ => panic!("unexpected frame {frame}"),
        }
    };
    assert_eq!(
        received,
        (0..30).collect::<Vec<u64>>(),
        "each once, in order"
    );
    assert_eq!(recovered["complete"], true, "{recovered}");
    push(&nodes[2], json!({"users": ["eve"], "data": {"n": "live"}})).await;
    assert_eq!(next_data(&mut eve).await["data"]["n"], "live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_route_only_once_every_node_does() {
    let rocketmq = Rocketmq::start();
    let topic = test_topic("routing-mixed");
    let ns = rocketmq.name_server();
    let routing: Vec<NodeProcess> = ["a", "b"]
        .iter()
        .map(|name| NodeProcess::start_routing(name, &ns, &topic, TENANTS))
        .collect();
    // c does not route: it reads everything and announces only what its
    // users' owners need.
    let mut plain = NodeProcess::start("c", &ns, &topic, TENANTS);
    for node in routing.iter().chain([&plain]) {
        node.wait_ready();
    }
    support::eventually("a and b see c", CLUSTER_PATIENCE, || {
        routing
            .iter()
            .all(|node| metric_value(&node.metrics(), "pushgate_cluster_nodes", &[]) == 3.0)
    })
    .await;
    let mut bob = support::connect_url(plain.ws_url("acme", "bob")).await;
    let mut eve = support::connect_url(routing[0].ws_url("acme", "eve")).await;
    // Past a and b's listening (ten heartbeats) and settling: they still
    // send every push to every node, since c does not route, so c's and
    // a's users get pushes through any node. (What must not happen can
    // only be waited past.)
    tokio::time::sleep(Duration::from_secs(8)).await;
    for node in routing.iter().chain([&plain]) {
        assert_eq!(
            metric_value(&node.metrics(), "pushgate_bus_routing", &[]),
            0.0
        );
    }
    let all = [&routing[0], &routing[1], &plain];
    for (n, node) in all.iter().enumerate() {
        push(node, json!({"users": ["bob", "eve"], "data": {"n": n}})).await;
    }
    for client in [&mut bob, &mut eve] {
        for n in 0..3 {
            assert_eq!(next_data(client).await["data"]["n"], n);
        }
    }
    // Nor did a announce eve's connection in a batch: a node that does
    // not route may be of a version that cannot read one.
    assert_eq!(
        metric_value(
            &plain.metrics(),
            "pushgate_control_events_total",
            &["event=\"connections\""],
        ),
        0.0
    );
    // Once c is gone, a and b route.
    plain.terminate();
    until_routing(&routing).await;
    push(
        &routing[1],
        json!({"users": ["eve"], "data": {"n": "routed"}}),
    )
    .await;
    assert_eq!(next_data(&mut eve).await["data"]["n"], "routed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_history_through_a_node_that_never_held_them_has_every_push() {
    let rocketmq = Rocketmq::start();
    let nodes = routing_cluster(&rocketmq, "routing-history", &["a", "b", "c"]).await;
    let mut eve = connect_routed(&nodes, 0, "eve").await;
    for n in 0..5 {
        push(&nodes[1], json!({"users": ["eve"], "data": {"n": n}})).await;
    }
    let mut positions = Vec::new();
    while positions.len() < 5 {
        let frame = next_data(&mut eve).await;
        if frame["data"]["n"].is_u64() {
            positions.push(frame["pos"].as_str().unwrap().to_owned());
        }
    }
    // c never held eve: none of her pushes were routed to it.
    let history = |since: Option<&str>| {
        let mut body = json!({"user": "eve"});
        if let Some(since) = since {
            body["since"] = json!(since);
        }
        let url = nodes[2].http("/v1/history");
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .bearer_auth("acme-key")
                .json(&body)
                .send()
                .await
                .expect("history request");
            assert_eq!(response.status().as_u16(), 200);
            response.json::<Value>().await.expect("a JSON answer")
        }
    };
    let numbers = |page: &Value| -> Vec<u64> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["data"]["n"].as_u64())
            .collect()
    };
    let page = history(None).await;
    assert_eq!(numbers(&page), [0, 1, 2, 3, 4], "{page}");
    let page = history(Some(&positions[2])).await;
    assert_eq!(numbers(&page), [3, 4], "{page}");
    assert_eq!(page["complete"], true, "{page}");
    assert_eq!(
        page["messages"][0]["pos"], positions[3],
        "the same positions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_node_that_hears_a_node_of_an_older_version_sends_every_push_everywhere() {
    use pushgate::bus::Bus;
    use pushgate::bus::envelope::{Envelope, Target};

    let rocketmq = Rocketmq::start();
    let topic = test_topic("routing-older");
    let ns = rocketmq.name_server();
    let routing: Vec<NodeProcess> = ["a", "b"]
        .iter()
        .map(|name| NodeProcess::start_routing(name, &ns, &topic, TENANTS))
        .collect();
    // An older node: its records carry no tag (played by a bus publishing
    // raw records), heard while a and b listen after they started.
    let older = raw_bus(&ns, &topic, "older").await;
    for node in &routing {
        node.wait_ready();
    }
    let mut eve = support::connect_url(routing[0].ws_url("acme", "eve")).await;
    let untagged = Envelope::new(
        "acme",
        Target::Users(vec!["eve".into()]),
        r#"{"n":"from the older node"}"#.into(),
    );
    older
        .publish_raw(vec![untagged.encode()])
        .await
        .expect("the broker takes it");
    assert_eq!(
        next_data(&mut eve).await["data"]["n"],
        "from the older node"
    );
    // Past their listening (ten heartbeats) and settling: neither routes,
    // and pushes through either reach eve and the older node's clients.
    tokio::time::sleep(Duration::from_secs(8)).await;
    for node in &routing {
        assert_eq!(
            metric_value(&node.metrics(), "pushgate_bus_routing", &[]),
            0.0,
            "{} routes",
            node.name
        );
    }
    push(
        &routing[1],
        json!({"users": ["eve"], "data": {"n": "after"}}),
    )
    .await;
    assert_eq!(next_data(&mut eve).await["data"]["n"], "after");
    older
        .publish_raw(vec![
            Envelope::new(
                "acme",
                Target::Users(vec!["eve".into()]),
                r#"{"n":"still"}"#.into(),
            )
            .encode(),
        ])
        .await
        .expect("the broker takes it");
    assert_eq!(next_data(&mut eve).await["data"]["n"], "still");
    older.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resuming_together_on_one_node_read_the_queue_back_once_and_get_exactly_theirs() {
    // The clients of a lost node come back together, on the same nodes,
    // from nearby positions of their tenant's queue: what one resume reads
    // back, the others find kept.
    let rocketmq = Rocketmq::start();
    let nodes = routing_cluster(&rocketmq, "routing-storm", &["a", "b", "c"]).await;
    let users: Vec<String> = (0..12).map(|i| format!("r{i}")).collect();
    let mut clients = Vec::new();
    for user in &users {
        clients.push(connect_routed(&nodes, 0, user).await);
    }
    push(&nodes[1], json!({"users": users, "data": {"n": "seen"}})).await;
    let mut since = Vec::new();
    for client in &mut clients {
        let seen = next_data(client).await;
        since.push(seen["pos"].as_str().expect("a position").to_owned());
    }
    drop(clients);

    // While they are away: 10 pushes each, through every node, 120 in the
    // queue (several blocks).
    for n in 0..120 {
        let user = &users[n % users.len()];
        push(&nodes[n % 3], json!({"users": [user], "data": {"n": n}})).await;
    }
    let resumes = users.iter().zip(&since).map(|(user, since)| {
        let url = format!("{}&since={since}", nodes[2].ws_url("acme", user));
        async move {
            let mut client = support::connect_url(url).await;
            let mut received = Vec::new();
            loop {
                let frame = client.next_json().await;
                match frame["type"].as_str() {
                    Some("message") => received.push(frame["data"]["n"].as_u64().expect("n")),
                    Some("recovered") => return (received, frame),
                    _ => panic!("unexpected frame {frame}"),
                }
            }
        }
    });
    let resumed = futures_util::future::join_all(resumes).await;
    for (i, (received, recovered)) in resumed.iter().enumerate() {
        let missed: Vec<u64> = (0..120).filter(|n| n % 12 == i as u64).collect();
        assert_eq!(received, &missed, "{} got exactly what it missed", users[i]);
        assert_eq!(recovered["complete"], true, "{recovered}");
    }
    let metrics = nodes[2].metrics();
    let pulled = metric_value(
        &metrics,
        "pushgate_bus_read_back_pulls_total",
        &["block=\"pulled\""],
    );
    let kept = metric_value(
        &metrics,
        "pushgate_bus_read_back_pulls_total",
        &["block=\"kept\""],
    );
    assert!(
        kept > pulled,
        "12 resumes over the same blocks: {pulled} pulled, {kept} kept"
    );
}
