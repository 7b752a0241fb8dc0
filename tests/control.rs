//! Teams own their tenants: keys with roles on every admin route, the
//! control state kept across restarts (also a `kill -9` in a burst of
//! changes), a damaged state file refused, and the audit trail.

mod support;

use serde_json::json;
use support::{ADMIN_TOKEN, PATIENCE, Process, TestNode};

use support::admin_as as call;

/// Makes a key through the admin API (with the operator token); returns
/// its id and secret.
async fn make_key(base: &str, name: &str, role: &str, tenant: Option<&str>) -> (String, String) {
    let body = json!({"name": name, "role": role, "tenant": tenant});
    let (status, answer) = call(
        base,
        ADMIN_TOKEN,
        "POST",
        "/admin/v1/keys",
        Some(body.to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assert!(answer["key"].as_str().unwrap().starts_with("pgk_"));
    (
        answer["id"].as_str().unwrap().to_owned(),
        answer["key"].as_str().unwrap().to_owned(),
    )
}

fn admin_config(extra: &str) -> pushgate::Config {
    support::config(&format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n{extra}"))
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Need {
    /// Every key (answers are scoped).
    Any,
    Operator,
    Manage,
    Read,
}

#[tokio::test]
async fn every_admin_route_answers_each_role_as_the_roles_table_says() {
    let node = TestNode::start_with(admin_config("")).await;
    let base = node.http_base.clone();
    let (_, tenant_admin) = make_key(&base, "acme-team", "tenant-admin", Some("acme")).await;
    let (_, viewer) = make_key(&base, "acme-readers", "viewer", Some("acme")).await;
    let (_, operator) = make_key(&base, "ops", "operator", None).await;
    let version = "a".repeat(64);
    let bad = || Some(b"{not json".to_vec());
    // Every route of the admin API; `{t}` is the tenant asked about. The
    // operator's calls are made harmless (an unknown tenant, a bad body):
    // only the answer's kind (allowed or 403) is checked.
    let routes: Vec<(&str, String, Option<Vec<u8>>, Need)> = vec![
        ("GET", "/admin/v1/tenants".into(), None, Need::Any),
        ("GET", "/admin/v1/tenants/{t}".into(), None, Need::Read),
        ("PUT", "/admin/v1/tenants/{t}".into(), bad(), Need::Operator),
        (
            "DELETE",
            "/admin/v1/tenants/{t}".into(),
            None,
            Need::Operator,
        ),
        (
            "PUT",
            "/admin/v1/tenants/{t}/push-keys".into(),
            bad(),
            Need::Manage,
        ),
        (
            "GET",
            "/admin/v1/tenants/{t}/plugins".into(),
            None,
            Need::Read,
        ),
        (
            "POST",
            "/admin/v1/tenants/{t}/plugins".into(),
            Some(Vec::new()),
            Need::Manage,
        ),
        (
            "POST",
            "/admin/v1/tenants/{t}/plugins/rollback".into(),
            None,
            Need::Manage,
        ),
        (
            "DELETE",
            format!("/admin/v1/tenants/{{t}}/plugins/{version}"),
            None,
            Need::Manage,
        ),
        (
            "POST",
            format!("/admin/v1/tenants/{{t}}/plugins/{version}/activate"),
            None,
            Need::Manage,
        ),
        (
            "POST",
            format!("/admin/v1/tenants/{{t}}/plugins/{version}/canary"),
            bad(),
            Need::Manage,
        ),
        (
            "DELETE",
            "/admin/v1/tenants/{t}/plugins/canary".into(),
            None,
            Need::Manage,
        ),
        (
            "POST",
            format!("/admin/v1/tenants/{{t}}/plugins/{version}/shadow"),
            None,
            Need::Manage,
        ),
        (
            "GET",
            "/admin/v1/tenants/{t}/plugins/shadow".into(),
            None,
            Need::Read,
        ),
        (
            "DELETE",
            "/admin/v1/tenants/{t}/plugins/shadow".into(),
            None,
            Need::Manage,
        ),
        (
            "POST",
            "/admin/v1/tenants/{t}/presence".into(),
            bad(),
            Need::Read,
        ),
        (
            "POST",
            "/admin/v1/tenants/{t}/disconnect".into(),
            bad(),
            Need::Manage,
        ),
        (
            "POST",
            "/admin/v1/tenants/{t}/subscriptions".into(),
            bad(),
            Need::Manage,
        ),
        ("GET", "/admin/v1/keys".into(), None, Need::Any),
        ("POST", "/admin/v1/keys".into(), bad(), Need::Operator),
        (
            "DELETE",
            "/admin/v1/keys/nosuchkey".into(),
            None,
            Need::Operator,
        ),
        ("GET", "/admin/v1/audit?tenant={t}".into(), None, Need::Read),
        ("POST", "/admin/v1/drain".into(), None, Need::Operator),
    ];
    for (method, path, body, need) in &routes {
        // A key nobody made: 401 everywhere.
        let (status, _) = call(
            &base,
            "pgk_unknown",
            method,
            &path.replace("{t}", "acme"),
            body.clone(),
        )
        .await;
        assert_eq!(status, 401, "{method} {path} with an unknown key");
        for (role, key) in [
            ("tenant-admin", &tenant_admin),
            ("viewer", &viewer),
            ("operator", &operator),
        ] {
            for tenant in ["acme", "globex"] {
                let own = tenant == "acme";
                let allowed = match need {
                    Need::Any => true,
                    Need::Operator => role == "operator",
                    Need::Manage => role == "operator" || (role == "tenant-admin" && own),
                    Need::Read => role == "operator" || own,
                };
                if allowed
                    && (*path == "/admin/v1/drain"
                        || *need == Need::Operator && role == "operator" && method == &"DELETE")
                {
                    // Harmless only on a tenant or key that does not exist.
                    let (status, _) = call(
                        &base,
                        key,
                        method,
                        &path.replace("{t}", "nosuch"),
                        body.clone(),
                    )
                    .await;
                    if *path != "/admin/v1/drain" {
                        assert_eq!(status, 404, "{role} {method} {path}");
                    }
                    continue;
                }
                let (status, answer) = call(
                    &base,
                    key,
                    method,
                    &path.replace("{t}", tenant),
                    body.clone(),
                )
                .await;
                if allowed {
                    assert!(
                        status != 401 && status != 403,
                        "{role} {method} {path} on {tenant}: {status} {answer}"
                    );
                } else {
                    assert_eq!(status, 403, "{role} {method} {path} on {tenant}: {answer}");
                    let message = answer["error"]["message"].as_str().unwrap();
                    let needed = match need {
                        Need::Operator => "operator role",
                        Need::Manage => "tenant-admin role",
                        _ => "viewer role",
                    };
                    assert!(
                        message.contains(needed),
                        "{role} {method} {path}: {message}"
                    );
                }
            }
        }
    }
    // Answers are scoped: a tenant's key lists its own tenant and keys.
    let (_, listed) = call(&base, &viewer, "GET", "/admin/v1/tenants", None).await;
    let names: Vec<&str> = listed["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme"]);
    let (_, keys) = call(&base, &tenant_admin, "GET", "/admin/v1/keys", None).await;
    assert!(
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["tenant"] == "acme"),
        "{keys}"
    );
    assert!(
        !keys.to_string().contains("pgk_"),
        "no key is ever shown again: {keys}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_tenant_admin_runs_its_plugin_rollout_and_a_revoked_key_is_refused() {
    let node = TestNode::start_with(admin_config("")).await;
    let base = node.http_base.clone();
    let (key_id, shop) = make_key(&base, "acme-team", "tenant-admin", Some("acme")).await;
    let upload = |key: String, component: Vec<u8>, activate: bool| {
        let base = base.clone();
        async move {
            let path = format!("/admin/v1/tenants/acme/plugins?activate={activate}");
            call(&base, &key, "POST", &path, Some(component)).await
        }
    };
    let (status, first) = upload(shop.clone(), support::plugin("keyword_filter"), true).await;
    assert_eq!(status, 201, "{first}");
    let (status, second) = upload(shop.clone(), support::plugin("personalize"), false).await;
    assert_eq!(status, 201, "{second}");
    let second = second["version"].as_str().unwrap().to_owned();
    let (status, answer) = call(
        &base,
        &shop,
        "POST",
        &format!("/admin/v1/tenants/acme/plugins/{second}/canary"),
        Some(br#"{"percent": 10}"#.to_vec()),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) = call(
        &base,
        &shop,
        "POST",
        &format!("/admin/v1/tenants/acme/plugins/{second}/activate"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, answer) = call(
        &base,
        &shop,
        "POST",
        "/admin/v1/tenants/acme/plugins/rollback",
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["version"], first["version"]);
    // Never its own limits, never another tenant.
    let (status, _) = call(
        &base,
        &shop,
        "PUT",
        "/admin/v1/tenants/acme",
        Some(br#"{"auth":"development","max_connections":1}"#.to_vec()),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = upload(shop.clone(), support::plugin("keyword_filter"), true).await;
    assert_eq!(status, 201);
    let (status, _) = call(
        &base,
        &shop,
        "POST",
        "/admin/v1/tenants/globex/plugins",
        Some(support::plugin("keyword_filter")),
    )
    .await;
    assert_eq!(status, 403);

    // The audit trail: every change with the key that made it, newest
    // first; the tenant's key reads its own tenant's.
    let (status, audit) = call(&base, &shop, "GET", "/admin/v1/audit?limit=100", None).await;
    assert_eq!(status, 200);
    let entries = audit["entries"].as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .filter(|e| e["outcome"] == "applied")
        .map(|e| e["change"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions[..5],
        [
            "plugin_installed",
            "plugin_rolled_back",
            "plugin_activated",
            "plugin_canary",
            "plugin_installed"
        ],
        "{audit}"
    );
    assert!(entries.iter().all(|e| e["tenant"] == "acme"), "{audit}");
    let installed = entries
        .iter()
        .find(|e| e["change"]["action"] == "plugin_installed")
        .unwrap();
    assert_eq!(installed["key_id"], key_id.as_str());
    assert_eq!(installed["key_name"], "acme-team");
    assert_eq!(installed["route"], "POST /admin/v1/tenants/{name}/plugins");
    assert!(
        installed["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1"),
        "{installed}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["outcome"] == "denied" && e["route"] == "PUT /admin/v1/tenants/{name}"),
        "{audit}"
    );
    let (_, other) = call(&base, &shop, "GET", "/admin/v1/audit?tenant=globex", None).await;
    assert_eq!(other["error"]["code"], "forbidden");

    // Revoked: refused from then on.
    let (status, _) = call(
        &base,
        ADMIN_TOKEN,
        "DELETE",
        &format!("/admin/v1/keys/{key_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(&base, &shop, "GET", "/admin/v1/tenants/acme", None).await;
    assert_eq!(status, 401);
    node.shutdown().await;
}

#[tokio::test]
async fn what_the_admin_api_changed_is_there_after_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let config = || {
        let mut config = admin_config("");
        config.state.dir = state.path().to_path_buf();
        config
    };
    let node = TestNode::start_with(config()).await;
    let shop = json!({"push_keys": ["shop-key"], "auth": "development"});
    let (status, answer) = node
        .admin(
            "PUT",
            "/admin/v1/tenants/shop",
            Some(shop.to_string().into_bytes()),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let (_, key) = make_key(&node.http_base, "shop-team", "tenant-admin", Some("shop")).await;
    let (status, _) = call(
        &node.http_base,
        &key,
        "PUT",
        "/admin/v1/tenants/shop/push-keys",
        Some(br#"{"push_keys": ["shop-key-2"]}"#.to_vec()),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = node.admin("DELETE", "/admin/v1/tenants/globex", None).await;
    assert_eq!(status, 204);
    node.shutdown().await;

    let node = TestNode::start_with(config()).await;
    let (status, _) = node.admin("GET", "/admin/v1/tenants/shop", None).await;
    assert_eq!(status, 200);
    let (status, _) = node.admin("GET", "/admin/v1/tenants/globex", None).await;
    assert_eq!(
        status, 404,
        "removed through the API, still in the file: stays removed"
    );
    let mut client = node.connect_user("shop", "ann").await;
    node.push("shop-key-2", json!({"users": ["ann"], "data": "kept"}))
        .await;
    assert_eq!(client.next_data().await, json!("kept"));
    let (status, _) = node
        .post(
            "/v1/push",
            Some("shop-key"),
            &json!({"users": ["ann"], "data": 1}),
        )
        .await;
    assert_eq!(status, 401, "the replaced push key stays replaced");
    let (status, _) = call(&node.http_base, &key, "GET", "/admin/v1/tenants/shop", None).await;
    assert_eq!(status, 200, "the key survives");
    let (_, audit) = node.admin("GET", "/admin/v1/audit?tenant=shop", None).await;
    assert!(audit["entries"].as_array().unwrap().len() >= 3, "{audit}");
    node.shutdown().await;
}

/// Starts the binary on `dir`'s configuration.
fn start_binary(dir: &std::path::Path) -> (Process, String) {
    let (process, _public, internal) = support::serve(&dir.join("pushgate.toml"), "node");
    (process, format!("http://{internal}"))
}

#[tokio::test]
async fn a_node_killed_in_a_burst_of_changes_comes_back_with_every_acknowledged_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pushgate.toml"),
        format!(
            "[listen]\npublic = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\n\
             [admin]\ntoken = \"{ADMIN_TOKEN}\"\n"
        ),
    )
    .unwrap();
    let (mut process, base) = start_binary(dir.path());
    // 200 changes, one after the other; the node is killed after the
    // 100th answer, while the next ones are on their way.
    let (acknowledged_tx, mut acknowledged) = tokio::sync::mpsc::unbounded_channel();
    let burst = {
        let base = base.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                let body = json!({"push_keys": [format!("key-{i}")], "auth": "development"});
                let (status, _) = support::admin(
                    &base,
                    "PUT",
                    &format!("/admin/v1/tenants/t{i}"),
                    Some(body.to_string().into_bytes()),
                )
                .await;
                if status != 201 {
                    break;
                }
                let _ = acknowledged_tx.send(i);
            }
        })
    };
    let mut last = None;
    while let Some(i) = acknowledged.recv().await {
        last = Some(i);
        if i == 100 {
            process.kill();
        }
    }
    let _ = burst.await;
    let last = last.expect("changes were acknowledged");
    assert!(last >= 100);

    let (_process, base) = start_binary(dir.path());
    let (status, listed) = support::admin(&base, "GET", "/admin/v1/tenants", None).await;
    assert_eq!(status, 200);
    let mut present: Vec<usize> = listed["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap()[1..].parse().unwrap())
        .collect();
    present.sort();
    // Every acknowledged change, and in order: a prefix of the burst.
    assert!(
        present.len() > last,
        "{} present, {last} acknowledged",
        present.len()
    );
    assert_eq!(present, (0..present.len()).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_damaged_state_file_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pushgate.toml"),
        "[listen]\npublic = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\n[tenants.shop]\nauth = \"development\"\n",
    )
    .unwrap();
    {
        let (_process, base) = start_binary(dir.path());
        let (status, _) = support::admin(&base, "GET", "/healthz", None).await;
        assert_eq!(status, 200);
    }
    let start = || async {
        let output = tokio::time::timeout(
            PATIENCE,
            tokio::process::Command::new(env!("CARGO_BIN_EXE_pushgate"))
                .args(["serve", "--config", "pushgate.toml"])
                .current_dir(dir.path())
                .env_remove("PUSHGATE_STATE__DIR")
                .output(),
        )
        .await
        .expect("the node gives up in time")
        .unwrap();
        assert!(!output.status.success());
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    };
    let data = dir.path().join("pushgate-data");
    let state = data.join("state.json");
    let bytes = std::fs::read(&state).expect("the node wrote its state");
    std::fs::write(&state, &bytes[..bytes.len() / 2]).unwrap();
    let said = start().await;
    assert!(
        said.contains("pushgate-data/state.json") && said.contains("damaged"),
        "{said}"
    );

    // A tenant's plugin rollout file, likewise.
    std::fs::write(&state, &bytes).unwrap();
    let rollout = data.join("plugins").join("shop").join("state.json");
    std::fs::create_dir_all(rollout.parent().unwrap()).unwrap();
    std::fs::write(&rollout, b"{\"active\": ").unwrap();
    let said = start().await;
    assert!(
        said.contains("plugins/shop/state.json") && said.contains("damaged"),
        "{said}"
    );
}

#[tokio::test]
async fn a_backup_restores_tenants_keys_and_plugins_on_a_fresh_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let write_config = |state: &str| {
        std::fs::write(
            dir.path().join("pushgate.toml"),
            format!(
                "[listen]\npublic = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\n\
                 [admin]\ntoken = \"{ADMIN_TOKEN}\"\n[state]\ndir = \"{state}\"\n"
            ),
        )
        .unwrap();
    };
    write_config("first");
    let pushgate = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pushgate"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("PUSHGATE_STATE__DIR")
            .output()
            .unwrap()
    };
    let (mut process, base) = start_binary(dir.path());
    let shop = json!({"push_keys": ["shop-key"], "auth": "development"});
    let (status, _) = support::admin(
        &base,
        "PUT",
        "/admin/v1/tenants/shop",
        Some(shop.to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201);
    let (status, plugin) = support::admin(
        &base,
        "POST",
        "/admin/v1/tenants/shop/plugins",
        Some(support::plugin("keyword_filter")),
    )
    .await;
    assert_eq!(status, 201, "{plugin}");
    let (_, key) = make_key(&base, "shop-team", "viewer", Some("shop")).await;

    // Exported while the node runs; an import is refused while it runs.
    let exported = pushgate(&[
        "state",
        "export",
        "--config",
        "pushgate.toml",
        "--output",
        "backup.json",
    ]);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let refused = pushgate(&[
        "state",
        "import",
        "--config",
        "pushgate.toml",
        "backup.json",
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("in use by another running node"));
    let backup = std::fs::read_to_string(dir.path().join("backup.json")).unwrap();
    assert!(!backup.contains("pgk_"), "a key is kept as its hash only");
    process.kill();

    // Restored into an empty state directory, served by a new node.
    write_config("second");
    let imported = pushgate(&[
        "state",
        "import",
        "--config",
        "pushgate.toml",
        "backup.json",
    ]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let (_process, base) = start_binary(dir.path());
    let (status, plugins) =
        support::admin(&base, "GET", "/admin/v1/tenants/shop/plugins", None).await;
    assert_eq!(status, 200);
    assert_eq!(plugins["active"], plugin["version"], "{plugins}");
    let (status, _) = call(&base, &key, "GET", "/admin/v1/tenants/shop", None).await;
    assert_eq!(status, 200, "the viewer key is restored");
    let (status, _) = reqwest::Client::new()
        .post(format!("{base}/v1/push"))
        .bearer_auth("shop-key")
        .json(&json!({"broadcast": true, "data": "restored"}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 202);
}
