//! The operator's files in deploy/: Prometheus accepts the alert rules and
//! their unit tests pass, the exposition of a running node passes
//! `promtool check metrics`, and every metric the rules and the Grafana
//! dashboard use is one a node really exports.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;
use support::TestNode;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn promtool() -> Command {
    let found = Command::new("promtool").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "promtool is not installed: install the Debian package `prometheus` \
         (scripts/test.sh does this on a fresh machine)"
    );
    Command::new("promtool")
}

fn run(command: &mut Command) -> String {
    let output = command.output().expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    text
}

/// Every `pushgate_…` metric name in `text`, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("pushgate_") {
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, suffix| {
                n.strip_suffix(suffix).map(str::to_owned).unwrap_or(n)
            });
        names.insert(name);
    }
    names
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    run(promtool()
        .args(["check", "rules"])
        .arg(deploy("prometheus/alerts.yml")));
    run(promtool()
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(deploy("prometheus")));
}

#[tokio::test]
async fn a_nodes_metrics_pass_promtool_and_cover_every_metric_the_rules_and_dashboard_use() {
    let store = tempfile::tempdir().unwrap();
    let mut config = support::config("[websocket]\nmax_connections_per_ip = 1");
    config.plugins.store_dir = Some(store.path().to_path_buf());
    let node = TestNode::start_with(config).await;
    // A plugin call, for the plugin metrics, with a canary and a shadow
    // beside it.
    let plugins = node.node().plugins();
    plugins
        .install("globex", &support::plugin("keyword_filter"), true)
        .unwrap();
    let canary = plugins
        .install("globex", &support::plugin("personalize"), false)
        .unwrap();
    plugins.set_canary("globex", &canary.version, 10).unwrap();
    let shadow = plugins
        .install("globex", &support::plugin("misbehave"), false)
        .unwrap();
    plugins.set_shadow("globex", Some(&shadow.version)).unwrap();
    node.push("globex-key", json!({"broadcast": true, "data": "filtered"}))
        .await;
    // Activity behind the metrics that appear only once used (handshakes,
    // disconnects, push requests, refused connections); per-tenant
    // counters exist from the tenant's creation.
    let mut client = node.connect_user("acme", "m").await;
    node.push("acme-key", json!({"users": ["m"], "data": 1}))
        .await;
    client.next_data().await;
    node.push("acme-key", json!({"users": ["offline"], "data": 2}))
        .await;
    let refused =
        tokio_tungstenite::connect_async(format!("{}/ws/acme?user=n", node.ws_base)).await;
    assert!(refused.is_err());
    drop(client);
    node.wait_for(|n| n.sessions().connection_count() == 0)
        .await;

    // The shadow compares on its own thread.
    let deadline = std::time::Instant::now() + support::PATIENCE;
    let exposition = loop {
        let (status, exposition) = node.get_text("/metrics").await;
        assert_eq!(status, 200);
        if exposition.contains("pushgate_plugin_shadow_calls_total{") {
            break exposition;
        }
        assert!(std::time::Instant::now() < deadline, "no shadow comparison");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let mut check = promtool()
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let output = check.wait_with_output().unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let exported = metric_names(&exposition);
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(deploy("grafana/pushgate.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    for (file, text) in [("alerts.yml", &rules), ("pushgate.json", &dashboard)] {
        let used = metric_names(text);
        assert!(!used.is_empty(), "{file} uses pushgate metrics");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics no node exports: {unknown:?}"
        );
    }
    node.shutdown().await;
}
