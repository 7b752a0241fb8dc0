//! The fault suite: a real name server and broker, three nodes, a client
//! per user that resumes where it was when its node goes, and pushes at a
//! steady rate through the nodes in turn (each with an idempotency key, a
//! push answered "outcome unknown" retried with it, a node that does not
//! answer skipped, as a business service behind a load balancer does),
//! while one fault happens. Each scenario prints one line:
//!
//! ```text
//! scenario                      pushes   202 refused lost dup refused-delivered no-service
//! ```
//!
//! `lost`: answered 202, never received; `dup`: received twice;
//! `refused-delivered`: refused, and delivered all the same; `no-service`:
//! the longest time in which no push was accepted.
//!
//! The test command runs the short form (these tests); `scripts/faults.sh`
//! the long form (`PUSHGATE_FAULTS=long`: 200 pushes/s, longer faults),
//! whose table is in BENCHMARKS.md.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::rocketmq::{CLUSTER_PATIENCE, NodeProcess, Rocketmq, test_topic};
use tokio_tungstenite::tungstenite::Message;

const TENANTS: &str = r#"
[tenants.acme]
push_keys = ["acme-key"]
auth = "development"
"#;

const NODES: [&str; 3] = ["a", "b", "c"];
const USERS: usize = 12;

/// How hard and how long: the short form for the test command, the long
/// one for the table.
struct Form {
    pushes_per_second: u64,
    /// Steady load before the fault, and after the cluster recovered.
    calm: Duration,
    /// How long a broker stays dead or frozen.
    outage: Duration,
}

fn form() -> Form {
    if std::env::var("PUSHGATE_FAULTS").as_deref() == Ok("long") {
        Form {
            pushes_per_second: 200,
            calm: Duration::from_secs(10),
            outage: Duration::from_secs(8),
        }
    } else {
        Form {
            pushes_per_second: 50,
            calm: Duration::from_secs(2),
            outage: Duration::from_secs(3),
        }
    }
}

/// Where each node is now (`None` while it is down): clients and the
/// pusher read it at each attempt.
type Addresses = Arc<RwLock<Vec<Option<(String, String)>>>>;

struct Cluster {
    rocketmq: Rocketmq,
    /// A second broker group, when the scenario has one.
    second_broker: Option<Rocketmq>,
    topic: String,
    nodes: Vec<Option<NodeProcess>>,
    addresses: Addresses,
}

/// What a scenario's cluster runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Brokers {
    /// One name server, one broker.
    One,
    /// Two name servers, two broker groups.
    Two,
}

impl Cluster {
    fn start(scenario: &str, brokers: Brokers) -> Self {
        let (rocketmq, second_broker) = match brokers {
            Brokers::One => (Rocketmq::start(), None),
            Brokers::Two => {
                let first = Rocketmq::start_with_two_name_servers();
                let second = first.start_second_broker();
                (first, Some(second))
            }
        };
        let label: String = scenario
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let topic = test_topic(&format!("faults_{label}"));
        let nodes: Vec<Option<NodeProcess>> = NODES
            .iter()
            .map(|name| {
                Some(NodeProcess::start(
                    name,
                    &rocketmq.name_server(),
                    &topic,
                    TENANTS,
                ))
            })
            .collect();
        for node in nodes.iter().flatten() {
            node.wait_ready();
        }
        let addresses = nodes
            .iter()
            .map(|n| n.as_ref().map(|n| (n.public.clone(), n.internal.clone())))
            .collect();
        Self {
            rocketmq,
            second_broker,
            topic,
            nodes,
            addresses: Arc::new(RwLock::new(addresses)),
        }
    }

    fn node_down(&mut self, index: usize, graceful: bool) {
        self.addresses.write().unwrap()[index] = None;
        if let Some(mut node) = self.nodes[index].take() {
            if graceful {
                node.terminate();
            } else {
                node.kill();
            }
        }
    }

    fn node_up(&mut self, index: usize) {
        let node = NodeProcess::start(
            NODES[index],
            &self.rocketmq.name_server(),
            &self.topic,
            TENANTS,
        );
        node.wait_ready();
        self.addresses.write().unwrap()[index] = Some((node.public.clone(), node.internal.clone()));
        self.nodes[index] = Some(node);
    }
}

/// What the clients received, by user: the sequence numbers, in order.
type Received = Arc<Mutex<HashMap<String, Vec<u64>>>>;

/// Keeps `user` connected to some node, resuming from the last position
/// it saw after each disconnection, until `stop`.
async fn client(user: String, addresses: Addresses, received: Received, stop: Arc<AtomicBool>) {
    let mut since: Option<String> = None;
    let mut attempt = user.len();
    while !stop.load(Ordering::Acquire) {
        attempt += 1;
        let Some((public, _)) = live_node(&addresses, attempt) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let resume = since
            .as_ref()
            .map_or(String::new(), |s| format!("&since={s}"));
        let url = format!("ws://{public}/ws/acme?user={user}{resume}");
        let Ok(Ok((mut socket, _))) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let frame = tokio::select! {
                frame = socket.next() => frame,
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if stop.load(Ordering::Acquire) { return; }
                    continue;
                }
            };
            let Some(Ok(Message::Text(text))) = frame else {
                if matches!(frame, Some(Ok(Message::Ping(_) | Message::Pong(_)))) {
                    continue;
                }
                break;
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] != "message" {
                continue;
            }
            if let Some(pos) = frame["pos"].as_str() {
                since = Some(pos.to_owned());
            }
            if let Some(seq) = frame["data"]["seq"].as_u64() {
                received
                    .lock()
                    .unwrap()
                    .entry(user.clone())
                    .or_default()
                    .push(seq);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `n`th live node, counting round from `start`.
fn live_node(addresses: &Addresses, start: usize) -> Option<(String, String)> {
    let nodes = addresses.read().unwrap();
    (0..nodes.len()).find_map(|i| nodes[(start + i) % nodes.len()].clone())
}

/// What happened to one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Refused,
}

/// Pushes `seq` to its user through the nodes in turn from `seq`: a node
/// that does not answer is skipped; "outcome unknown" (504) is retried
/// with the same idempotency key; 202 or a refusal by every node ends it.
async fn push(http: &reqwest::Client, addresses: &Addresses, seq: u64) -> Outcome {
    let user = format!("user-{}", seq % USERS as u64);
    let body =
        json!({"users": [user], "data": {"seq": seq}, "idempotency_key": format!("push-{seq}")});
    let nodes = addresses.read().unwrap().len();
    let mut unknown = true;
    while unknown {
        unknown = false;
        for attempt in 0..nodes {
            let Some((_, internal)) = live_node(addresses, seq as usize + attempt) else {
                continue;
            };
            let answer = http
                .post(format!("http://{internal}/v1/push"))
                .bearer_auth("acme-key")
                .json(&body)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            match answer.map(|a| a.status().as_u16()) {
                Ok(202) => return Outcome::Accepted,
                Ok(504) => unknown = true,
                _ => {}
            }
        }
    }
    Outcome::Refused
}

/// Pushes at the form's rate until `stop`; each push's outcome and when
/// it was answered.
async fn pusher(
    addresses: Addresses,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> Vec<(u64, Outcome, Instant)> {
    let http = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut in_flight = Vec::new();
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        let seq = next.fetch_add(1, Ordering::Relaxed);
        let (http, addresses, outcomes) = (http.clone(), addresses.clone(), outcomes.clone());
        in_flight.push(tokio::spawn(async move {
            let outcome = push(&http, &addresses, seq).await;
            outcomes
                .lock()
                .unwrap()
                .push((seq, outcome, Instant::now()));
        }));
    }
    for push in in_flight {
        let _ = push.await;
    }
    let mut outcomes = outcomes.lock().unwrap().clone();
    outcomes.sort_by_key(|(seq, _, _)| *seq);
    outcomes
}

/// One scenario's line.
#[derive(Debug)]
struct Report {
    scenario: &'static str,
    pushes: usize,
    accepted: usize,
    refused: usize,
    lost: usize,
    duplicates: usize,
    refused_delivered: usize,
    without_service: Duration,
    /// When that time began, in seconds after the fault began.
    gap_from_fault: f64,
    /// Times a node's sends moved off a broker.
    failovers: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<38} pushes {:>5}  202 {:>5}  refused {:>4}  lost {}  dup {}  refused-delivered {}  no-service {:.2} s (from {:+.1} s)  failovers {}",
            self.scenario,
            self.pushes,
            self.accepted,
            self.refused,
            self.lost,
            self.duplicates,
            self.refused_delivered,
            self.without_service.as_secs_f64(),
            self.gap_from_fault,
            self.failovers as u64
        )
    }
}

/// Runs `fault` on a fresh cluster under load: calm, the fault, calm;
/// then waits until every accepted push reached its user (or patience
/// ran out) and reports.
async fn scenario(
    name: &'static str,
    brokers: Brokers,
    fault: impl AsyncFnOnce(&mut Cluster, &Form),
) -> Report {
    let form = form();
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(name, brokers));
    let received: Received = Arc::default();
    let stop_clients = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..USERS)
        .map(|n| {
            tokio::spawn(client(
                format!("user-{n}"),
                cluster.addresses.clone(),
                received.clone(),
                stop_clients.clone(),
            ))
        })
        .collect();
    // Every client connected before the first push.
    support::eventually("every client connected", CLUSTER_PATIENCE, || {
        cluster
            .nodes
            .iter()
            .flatten()
            .map(|n| {
                support::metric_value(&n.metrics(), "pushgate_connections", &["tenant=\"acme\""])
            })
            .sum::<f64>()
            >= USERS as f64
    })
    .await;
    let stop_pushing = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(pusher(
        cluster.addresses.clone(),
        form.pushes_per_second,
        stop_pushing.clone(),
    ));
    tokio::time::sleep(form.calm).await;
    let fault_began = Instant::now();
    fault(&mut cluster, &form).await;
    tokio::time::sleep(form.calm).await;
    stop_pushing.store(true, Ordering::Release);
    let outcomes = load.await.unwrap();

    let accepted: BTreeMap<u64, ()> = outcomes
        .iter()
        .filter(|(_, o, _)| *o == Outcome::Accepted)
        .map(|(seq, _, _)| (*seq, ()))
        .collect();
    let delivered_all = || {
        let received = received.lock().unwrap();
        accepted.keys().all(|seq| {
            received
                .get(&format!("user-{}", seq % USERS as u64))
                .is_some_and(|seen| seen.contains(seq))
        })
    };
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    while !delivered_all() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A last push to every user, after everything else: once it arrived,
    // nothing of the run is still on its way.
    let http = reqwest::Client::new();
    let users = USERS as u64;
    let end = (outcomes.len() as u64 / users + 10) * users;
    for n in 0..users {
        assert_eq!(
            push(&http, &cluster.addresses, end + n).await,
            Outcome::Accepted
        );
    }
    let marker_seen = || {
        let received = received.lock().unwrap();
        (0..users).all(|n| {
            received
                .get(&format!("user-{n}"))
                .is_some_and(|seen| seen.last().is_some_and(|last| *last >= end))
        })
    };
    support::eventually(
        "every client got its last push",
        CLUSTER_PATIENCE,
        marker_seen,
    )
    .await;
    stop_clients.store(true, Ordering::Release);
    for client in clients {
        let _ = client.await;
    }
    let failovers = cluster
        .nodes
        .iter()
        .flatten()
        .map(|n| support::metric_value(&n.metrics(), "pushgate_bus_broker_failovers_total", &[]))
        .sum();

    let received = received.lock().unwrap();
    let mut lost = 0;
    let mut duplicates = 0;
    let mut refused_delivered = 0;
    for (seq, outcome, _) in &outcomes {
        let user = format!("user-{}", seq % USERS as u64);
        let copies = received
            .get(&user)
            .map_or(0, |seen| seen.iter().filter(|s| *s == seq).count());
        match (outcome, copies) {
            (Outcome::Accepted, 0) => lost += 1,
            (Outcome::Refused, 1..) => refused_delivered += 1,
            _ => {}
        }
        duplicates += copies.saturating_sub(1);
    }
    let mut without_service = Duration::ZERO;
    let mut gap_began = fault_began;
    let mut last_accepted: Option<Instant> = None;
    let mut by_time: Vec<_> = outcomes.iter().collect();
    by_time.sort_by_key(|(_, _, at)| *at);
    for (_, outcome, at) in by_time {
        if *outcome == Outcome::Accepted {
            if let Some(last) = last_accepted
                && at.duration_since(last) > without_service
            {
                without_service = at.duration_since(last);
                gap_began = last;
            }
            last_accepted = Some(*at);
        }
    }
    let report = Report {
        scenario: name,
        pushes: outcomes.len(),
        accepted: accepted.len(),
        refused: outcomes.len() - accepted.len(),
        lost,
        duplicates,
        refused_delivered,
        without_service,
        gap_from_fault: gap_began.checked_duration_since(fault_began).map_or(
            -(fault_began.duration_since(gap_began).as_secs_f64()),
            |d| d.as_secs_f64(),
        ),
        failovers,
    };
    println!("{report}");
    report
}

/// What every scenario must keep: nothing acknowledged lost, nothing twice,
/// nothing refused delivered.
fn assert_kept_its_promises(report: &Report) {
    assert!(report.accepted > 0, "{report}");
    assert_eq!(
        (report.lost, report.duplicates, report.refused_delivered),
        (0, 0, 0),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted() {
    let report = scenario(
        "broker SIGKILL, restarted",
        Brokers::One,
        async |cluster, form| {
            tokio::task::block_in_place(|| cluster.rocketmq.kill_broker());
            tokio::time::sleep(form.outage).await;
            tokio::task::block_in_place(|| cluster.rocketmq.start_broker());
        },
    )
    .await;
    assert_kept_its_promises(&report);
    // The outage itself, the broker's start, and the way back (~0.1 s
    // measured); generous for a loaded machine.
    assert!(
        report.without_service < form().outage + Duration::from_secs(15),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_frozen_past_the_send_timeout() {
    let report = scenario(
        "broker SIGSTOP past send timeout",
        Brokers::One,
        async |cluster, form| {
            cluster.rocketmq.pause_broker();
            tokio::time::sleep(form.outage).await;
            cluster.rocketmq.resume_broker();
        },
    )
    .await;
    assert_kept_its_promises(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed() {
    let report = scenario(
        "node SIGKILL, clients move",
        Brokers::One,
        async |cluster, _| {
            tokio::task::block_in_place(|| cluster.node_down(2, false));
        },
    )
    .await;
    assert_kept_its_promises(&report);
    assert_eq!(report.refused, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node() {
    let report = scenario(
        "rolling restart of every node",
        Brokers::One,
        async |cluster, _| {
            for index in 0..NODES.len() {
                tokio::task::block_in_place(|| {
                    cluster.node_down(index, true);
                    cluster.node_up(index);
                });
            }
        },
    )
    .await;
    assert_kept_its_promises(&report);
    assert_eq!(report.refused, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_brokers_killed_and_restarted() {
    let report = scenario(
        "one of two brokers SIGKILL, restarted",
        Brokers::Two,
        async |cluster, form| {
            let second = cluster.second_broker.as_mut().unwrap();
            tokio::task::block_in_place(|| second.kill_broker());
            tokio::time::sleep(form.outage).await;
            tokio::task::block_in_place(|| second.start_broker());
        },
    )
    .await;
    assert_kept_its_promises(&report);
    // Sends moved to the other broker at the first failure.
    assert!(report.failovers >= 1.0, "{report}");
    assert_eq!(report.refused, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_name_servers_killed() {
    let report = scenario(
        "one of two name servers SIGKILL",
        Brokers::Two,
        async |cluster, form| {
            tokio::task::block_in_place(|| cluster.rocketmq.kill_name_server());
            tokio::time::sleep(form.outage).await;
        },
    )
    .await;
    assert_kept_its_promises(&report);
    assert_eq!(report.refused, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_brokers_frozen() {
    let report = scenario(
        "one of two brokers SIGSTOP",
        Brokers::Two,
        async |cluster, form| {
            let second = cluster.second_broker.as_ref().unwrap();
            second.pause_broker();
            tokio::time::sleep(form.outage).await;
            second.resume_broker();
        },
    )
    .await;
    assert_kept_its_promises(&report);
    // A send without an answer for half a second moves the next ones.
    assert!(report.failovers >= 1.0, "{report}");
    assert_eq!(report.refused, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_while_one_of_two_brokers_is_down_uses_it_once_back() {
    let queues =
        |node: &NodeProcess| support::metric_value(&node.metrics(), "pushgate_bus_queues", &[]);
    let report = scenario(
        "node restarted while a broker is down",
        Brokers::Two,
        async |cluster, form| {
            let all = queues(cluster.nodes[2].as_ref().unwrap());
            let second = cluster.second_broker.as_mut().unwrap();
            tokio::task::block_in_place(|| second.kill_broker());
            tokio::time::sleep(form.outage).await;
            tokio::task::block_in_place(|| {
                cluster.node_down(2, true);
                cluster.node_up(2);
            });
            // The name server forgot the dead broker: the node restarted
            // meanwhile knows only the other one's queues.
            let restarted = queues(cluster.nodes[2].as_ref().unwrap());
            assert!(restarted < all, "{restarted} of {all} queues");
            let second = cluster.second_broker.as_mut().unwrap();
            tokio::task::block_in_place(|| second.start_broker());
            let node = cluster.nodes[2].as_ref().unwrap();
            support::eventually(
                "the restarted node sends to both brokers",
                CLUSTER_PATIENCE,
                || queues(node) == all,
            )
            .await;
        },
    )
    .await;
    assert_kept_its_promises(&report);
    assert_eq!(report.refused, 0, "{report}");
}
