//! Tenants' WebAssembly plugins, built from source in plugins/ and uploaded
//! to a real node through the admin API.

mod support;

use serde_json::{Value, json};
use support::{TestNode, metric_value, plugin};

const SECRET: &str = "plugin-test-secret";

async fn node(store: &std::path::Path, extra: &str) -> TestNode {
    let mut config = support::config(&format!(
        r#"
[admin]
token = "{admin}"

[tenants.shop]
push_keys = ["shop-key"]
auth = "development"
[tenants.shop.plugin]
failure_policy = "open"
timeout = "100ms"
max_memory_bytes = 16777216
[tenants.shop.plugin.config]
secret = "{SECRET}"
words = "spoiler,secret plan"
mode = "drop"
metadata_claims = "lang"
{extra}
"#,
        admin = support::ADMIN_TOKEN,
    ));
    config.plugins.store_dir = Some(store.to_path_buf());
    TestNode::start_with(config).await
}

/// TOML for another development-auth tenant `name` (push key `<name>-key`)
/// with `plugin` settings.
fn tenant(name: &str, plugin: &str) -> String {
    format!(
        "[tenants.{name}]\npush_keys = [\"{name}-key\"]\nauth = \"development\"\n\
         [tenants.{name}.plugin]\n{plugin}"
    )
}

async fn admin(node: &TestNode, method: &str, path: &str) -> (u16, Value) {
    node.admin(method, path, None).await
}

async fn upload(node: &TestNode, tenant: &str, bytes: Vec<u8>) -> (u16, Value) {
    let path = format!("/admin/v1/tenants/{tenant}/plugins");
    node.admin("POST", &path, Some(bytes)).await
}

async fn install(node: &TestNode, tenant: &str, name: &str) -> String {
    let (status, body) = upload(node, tenant, plugin(name)).await;
    assert_eq!(status, 201, "{name}: {body}");
    body["version"].as_str().unwrap().to_owned()
}

fn hs256(claims: &Value) -> String {
    support::token(jsonwebtoken::Algorithm::HS256, SECRET, claims)
}

fn now() -> u64 {
    support::now_secs()
}

async fn handshake_status(node: &TestNode, path: &str) -> u16 {
    status_of(tokio_tungstenite::connect_async(format!("{}{path}", node.ws_base)).await)
}

/// The HTTP status a handshake got: 101 when it succeeded.
fn status_of<T>(handshake: Result<T, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match handshake {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("handshake failed oddly: {other}"),
    }
}

#[tokio::test]
async fn jwt_auth_admits_valid_tokens_and_refuses_forged_expired_or_missing_ones() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    let version = install(&node, "shop", "jwt_auth").await;
    let (_, list) = admin(&node, "GET", "/admin/v1/tenants/shop/plugins").await;
    assert_eq!(list["active"], version.as_str());
    assert_eq!(list["versions"][0]["hooks"], json!(["authenticate"]));

    let valid =
        hs256(&json!({"sub": "ann", "exp": now() + 600, "topics": ["deals"], "lang": "fr"}));
    let (socket, _) =
        tokio_tungstenite::connect_async(format!("{}/ws/shop?token={valid}", node.ws_base))
            .await
            .expect("a valid token is admitted");
    let mut ann = support::Client { socket };
    node.wait_for(|n| n.sessions().tenant_connections("shop") == 1)
        .await;
    node.push(
        "shop-key",
        json!({"topic": "deals", "data": "from the token's topics"}),
    )
    .await;
    assert_eq!(ann.next_data().await, "from the token's topics");
    let mut lang = None;
    node.node().sessions().for_each_of_user("shop", "ann", |c| {
        lang = c.metadata().get("lang").cloned();
    });
    assert_eq!(lang.as_deref(), Some("fr"));

    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "eve", "exp": now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret").unwrap(),
    )
    .unwrap();
    let expired = hs256(&json!({"sub": "eve", "exp": now() - 60}));
    for (what, path) in [
        ("forged", format!("/ws/shop?token={forged}")),
        ("expired", format!("/ws/shop?token={expired}")),
        ("missing", "/ws/shop?user=eve".to_owned()),
    ] {
        assert_eq!(handshake_status(&node, &path).await, 401, "{what}");
    }
    assert_eq!(node.node().sessions().tenant_connections("shop"), 1);
    node.shutdown().await;
}

#[tokio::test]
async fn a_plugin_admitted_connection_ends_at_its_expiry_unless_the_plugin_accepts_a_fresh_token() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    install(&node, "shop", "jwt_auth").await;
    let token = |sub: &str, lifetime: u64| hs256(&json!({"sub": sub, "exp": now() + lifetime}));
    let connect = |token: String| {
        let url = format!("{}/ws/shop?token={token}", node.ws_base);
        async move {
            let (socket, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("a valid token is admitted");
            support::Client { socket }
        }
    };

    // The plugin said when the token expires: closed then, with 4007.
    let mut expiring = connect(token("bob", 2)).await;
    assert_eq!(expiring.close_code().await, 4007);

    // A fresh token, checked by the plugin, keeps the connection open past
    // the first one's expiry; another user's token is refused.
    let first_expiry = now() + 2;
    let mut refreshed = connect(token("carol", 2)).await;
    refreshed
        .send_json(json!({"type": "refresh", "token": token("mallory", 600)}))
        .await;
    let refused = refreshed.next_json().await;
    assert_eq!(refused["code"], "refresh_refused", "{refused}");
    refreshed
        .send_json(json!({"type": "refresh", "token": "forged.token.here"}))
        .await;
    let refused = refreshed.next_json().await;
    assert_eq!(refused["code"], "refresh_refused", "{refused}");
    let fresh_exp = now() + 600;
    refreshed
        .send_json(
            json!({"type": "refresh", "token": hs256(&json!({"sub": "carol", "exp": fresh_exp}))}),
        )
        .await;
    let answer = refreshed.next_json().await;
    assert_eq!(answer["type"], "refreshed", "{answer}");
    assert_eq!(answer["expires_at"], fresh_exp, "{answer}");
    support::eventually(
        "the first token's exp has passed",
        support::PATIENCE,
        || now() > first_expiry + 1,
    )
    .await;
    node.push(
        "shop-key",
        json!({"users": ["carol"], "data": "still here"}),
    )
    .await;
    assert_eq!(refreshed.next_data().await, "still here");
    node.shutdown().await;
}

#[tokio::test]
async fn a_plugin_built_against_wit_0_1_0_still_authenticates() {
    // jwt-auth as built before 0.1.1 added `session-expires-at`: it imports
    // `host@0.1.0` and exports `authenticate@0.1.0`.
    let old = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/jwt-auth-wit-0.1.0.wasm"
    ))
    .unwrap();
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    let (status, body) = upload(&node, "shop", old).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["hooks"], json!(["authenticate"]), "{body}");
    let valid = hs256(&json!({"sub": "ann", "exp": now() + 600}));
    let (socket, _) =
        tokio_tungstenite::connect_async(format!("{}/ws/shop?token={valid}", node.ws_base))
            .await
            .expect("a valid token is admitted");
    let mut ann = support::Client { socket };
    let forged = hs256(&json!({"sub": "ann", "exp": now() - 60}));
    assert_eq!(
        handshake_status(&node, &format!("/ws/shop?token={forged}")).await,
        401
    );
    node.push("shop-key", json!({"users": ["ann"], "data": "hello"}))
        .await;
    assert_eq!(ann.next_data().await, "hello");
    node.shutdown().await;
}

#[tokio::test]
async fn keyword_filter_drops_or_masks_at_publish() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    install(&node, "shop", "keyword_filter").await;
    keyword_filter_behaviour(node, json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_keyword_filter_behaves_as_the_rust_one() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    // A JavaScript plugin carries its engine: more memory and time than a
    // Rust one (BENCHMARKS.md).
    let js_limits = json!({"max_memory_bytes": 67108864, "timeout": "2s"});
    let settings = json!({
        "push_keys": ["shop-key"], "auth": "development",
        "plugin": {"config": {"words": "spoiler,secret plan", "mode": "drop"}, "max_memory_bytes": 67108864, "timeout": "2s"}
    });
    let (status, answer) = node
        .admin(
            "PUT",
            "/admin/v1/tenants/shop",
            Some(settings.to_string().into_bytes()),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, body) = upload(&node, "shop", support::js_plugin("keyword-filter")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["hooks"], json!(["on-publish"]));
    // Its engine starts before the first message does (a warm instance).
    let deadline = std::time::Instant::now() + support::PATIENCE;
    loop {
        let (_, metrics) = node.get_text("/metrics").await;
        let pooled = metric_value(
            &metrics,
            "pushgate_plugin_pooled_memory_bytes",
            &["tenant=\"shop\""],
        );
        if pooled > 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never pre-warmed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    keyword_filter_behaviour(node, js_limits).await;
}

/// What both keyword filters must do, for tenant `shop` (words "spoiler",
/// "secret plan"); `limits` are plugin settings kept when the test changes
/// the configuration.
async fn keyword_filter_behaviour(node: TestNode, limits: Value) {
    let mut client = node.connect_user("shop", "reader").await;

    let (status, answer) = node
        .post(
            "/v1/push",
            Some("shop-key"),
            &json!({"users": ["reader"], "data": {"text": "a SPOILER!"}}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(
        answer["dropped"], "message contains a blocked word",
        "{answer}"
    );
    node.push(
        "shop-key",
        json!({"users": ["reader"], "data": {"text": "clean"}}),
    )
    .await;
    assert_eq!(
        client.next_data().await,
        json!({"text": "clean"}),
        "the dropped one never came"
    );

    // The tenant's plugin configuration changes without a new upload.
    let mut plugin = json!({"config": {"words": "spoiler", "mode": "mask"}});
    for (key, value) in limits.as_object().unwrap() {
        plugin[key] = value.clone();
    }
    let settings = json!({
        "push_keys": ["shop-key"], "auth": "development",
        "plugin": plugin
    });
    let response = node
        .http
        .put(format!("{}/admin/v1/tenants/shop", node.http_base))
        .bearer_auth(support::ADMIN_TOKEN)
        .json(&settings)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    node.push(
        "shop-key",
        json!({"users": ["reader"], "data": {"text": "a Spoiler here", "n": 1}}),
    )
    .await;
    assert_eq!(
        client.next_data().await,
        json!({"text": "a ******* here", "n": 1})
    );
    // Nested strings, several hits, keys untouched, other values as they are.
    node.push(
        "shop-key",
        json!({"users": ["reader"], "data": {"spoiler": ["SPOILER spoiler", {"deep": "xSpoilerx"}], "ok": true, "none": null}}),
    )
    .await;
    assert_eq!(
        client.next_data().await,
        json!({"spoiler": ["******* *******", {"deep": "x*******x"}], "ok": true, "none": null})
    );
    node.shutdown().await;
}

#[tokio::test]
async fn personalize_gives_each_recipient_their_language_and_drops_for_roles() {
    let store = tempfile::tempdir().unwrap();
    // Its own tenant: metrics are per process, and other tests use `shop`.
    let node = node(store.path(), &tenant("intl", "")).await;
    let (status, body) = upload(&node, "intl", plugin("personalize")).await;
    assert_eq!(status, 201, "{body}");
    personalize_behaviour(node, "intl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_personalize_behaves_as_the_rust_one() {
    let store = tempfile::tempdir().unwrap();
    // A JavaScript plugin carries its engine: more memory and time than a
    // Rust one (BENCHMARKS.md).
    let limits = "max_memory_bytes = 67108864\ntimeout = \"2s\"";
    let node = node(store.path(), &tenant("intl_js", limits)).await;
    let (status, body) = upload(&node, "intl_js", support::js_plugin("personalize")).await;
    assert_eq!(status, 201, "{body}");
    personalize_behaviour(node, "intl_js").await;
}

/// What the personalize plugin (either language) does, active for `tenant`.
async fn personalize_behaviour(node: TestNode, tenant: &str) {
    let key = format!("{tenant}-key");
    let mut amelie = node.connect(tenant, "user=amelie&lang=fr&role=staff").await;
    let mut bob = node.connect(tenant, "user=bob&lang=en&role=admin").await;
    node.wait_for(|n| n.sessions().tenant_connections(tenant) == 2)
        .await;

    let dropped_by_plugin = async || {
        let (_, metrics) = node.get_text("/metrics").await;
        metric_value(
            &metrics,
            "pushgate_messages_dropped_total",
            &[&format!("tenant=\"{tenant}\""), "reason=\"plugin\""],
        )
    };
    let dropped_before = dropped_by_plugin().await;
    let greeting =
        json!({"broadcast": true, "data": {"i18n": {"en": "Hello", "fr": "Bonjour"}, "n": 1}});
    node.push(&key, greeting).await;
    assert_eq!(amelie.next_data().await, json!({"text": "Bonjour", "n": 1}));
    assert_eq!(bob.next_data().await, json!({"text": "Hello", "n": 1}));

    let admins_only = json!({"broadcast": true, "data": {"visible_to": ["admin"], "i18n": {"en": "Payroll", "fr": "Paie"}}});
    node.push(&key, admins_only).await;
    node.push(&key, json!({"broadcast": true, "data": "for all"}))
        .await;
    assert_eq!(bob.next_data().await, json!({"text": "Payroll"}));
    assert_eq!(bob.next_data().await, "for all");
    assert_eq!(
        amelie.next_data().await,
        "for all",
        "staff never saw the admin message"
    );

    assert_eq!(dropped_by_plugin().await - dropped_before, 1.0);
    node.shutdown().await;
}

#[tokio::test]
async fn a_swap_while_a_client_receives_a_stream_loses_nothing_and_rollback_restores() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    let first = install(&node, "shop", "keyword_filter").await;
    let mut client = node.connect_user("shop", "streamer").await;

    let http = node.http.clone();
    let url = format!("{}/v1/push", node.http_base);
    let pusher = tokio::spawn(async move {
        for n in 0..300 {
            let response = http
                .post(&url)
                .bearer_auth("shop-key")
                .json(&json!({"users": ["streamer"], "data": {"n": n}}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
        }
    });
    // Swap to another version mid-stream.
    assert_eq!(client.next_data().await["n"], 0);
    let second = install(&node, "shop", "personalize").await;
    assert_ne!(first, second);
    for n in 1..300 {
        assert_eq!(client.next_data().await["n"], n, "message {n}");
    }
    pusher.await.unwrap();
    let (_, list) = admin(&node, "GET", "/admin/v1/tenants/shop/plugins").await;
    assert_eq!(list["active"], second.as_str());

    let (status, body) = admin(&node, "POST", "/admin/v1/tenants/shop/plugins/rollback").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], first.as_str());
    let (status, answer) = node
        .post(
            "/v1/push",
            Some("shop-key"),
            &json!({"users": ["streamer"], "data": "spoiler"}),
        )
        .await;
    assert_eq!(status, 202);
    assert!(
        answer["dropped"].is_string(),
        "the first version filters again: {answer}"
    );
    node.push(
        "shop-key",
        json!({"users": ["streamer"], "data": "still connected"}),
    )
    .await;
    assert_eq!(client.next_data().await, "still connected");
    node.shutdown().await;
}

#[tokio::test]
async fn bad_uploads_get_400_and_leave_the_active_version_serving() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "[plugins]\nmax_plugin_bytes = 200000").await;
    install(&node, "shop", "keyword_filter").await;
    let random: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random bytes", random, "not a valid WebAssembly component"),
        (
            "a core module",
            b"\0asm\x01\0\0\0".to_vec(),
            "core WebAssembly module",
        ),
        ("another world", plugin("wrong_world"), "exports none of"),
        ("wasi:filesystem", plugin("fs_reader"), "wasi:filesystem"),
        ("too large", vec![0u8; 300_000], "larger than"),
        ("empty", Vec::new(), "empty"),
    ];
    for (what, bytes, why) in cases {
        let (status, body) = upload(&node, "shop", bytes).await;
        assert_eq!(status, 400, "{what}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{what}: {message}");
    }
    let (status, _) = upload(&node, "nobody", plugin("keyword_filter")).await;
    assert_eq!(status, 404, "unknown tenant");
    let (_, list) = admin(&node, "GET", "/admin/v1/tenants/shop/plugins").await;
    assert_eq!(list["versions"].as_array().unwrap().len(), 1);
    let (_, answer) = node
        .post(
            "/v1/push",
            Some("shop-key"),
            &json!({"broadcast": true, "data": "spoiler"}),
        )
        .await;
    assert!(
        answer["dropped"].is_string(),
        "the filter still serves: {answer}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn misbehaving_plugins_are_stopped_counted_and_contained() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    install(&node, "shop", "misbehave").await;
    let mut shop_client = node.connect_user("shop", "victim").await;
    let mut other_tenant = node.connect_user("acme", "bystander").await;

    // Fail open: each failing filter call lets the message through.
    for (n, behaviour) in ["trap", "loop", "bomb"].into_iter().enumerate() {
        let started = std::time::Instant::now();
        node.push(
            "shop-key",
            json!({"users": ["victim"], "data": {"do": behaviour, "n": n}}),
        )
        .await;
        assert_eq!(shop_client.next_data().await["n"], n, "{behaviour}");
        assert!(
            started.elapsed() < support::PATIENCE,
            "{behaviour} was stopped"
        );
        node.push("acme-key", json!({"users": ["bystander"], "data": n}))
            .await;
        assert_eq!(other_tenant.next_data().await, n);
    }
    let (_, metrics) = node.get_text("/metrics").await;
    for outcome in ["trap", "timeout", "memory"] {
        let calls = metric_value(
            &metrics,
            "pushgate_plugin_calls_total",
            &[
                "tenant=\"shop\"",
                "hook=\"on-publish\"",
                &format!("outcome=\"{outcome}\""),
            ],
        );
        assert!(calls >= 1.0, "{outcome} counted ({calls})");
    }

    // Authentication fails closed.
    assert_eq!(
        handshake_status(&node, "/ws/shop?user=mallory&x=trap").await,
        503
    );

    // Failing again and again trips the plugin: it is skipped, not called.
    for n in 0..6 {
        node.push(
            "shop-key",
            json!({"users": ["victim"], "data": {"do": "trap", "n": 10 + n}}),
        )
        .await;
        assert_eq!(shop_client.next_data().await["n"], 10 + n);
    }
    let (_, metrics) = node.get_text("/metrics").await;
    let tripped = metric_value(
        &metrics,
        "pushgate_plugin_calls_total",
        &["tenant=\"shop\"", "outcome=\"tripped\""],
    );
    assert!(tripped >= 1.0, "tripped calls counted");
    node.shutdown().await;
}

#[tokio::test]
async fn a_closed_failure_policy_drops_what_a_failing_filter_saw() {
    let store = tempfile::tempdir().unwrap();
    let node = node(
        store.path(),
        &tenant("strict", "failure_policy = \"closed\""),
    )
    .await;
    install(&node, "strict", "misbehave").await;
    let mut client = node.connect_user("strict", "s").await;
    let (status, answer) = node
        .post(
            "/v1/push",
            Some("strict-key"),
            &json!({"users": ["s"], "data": "trap"}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(answer["dropped"], "the tenant's plugin failed");
    node.push("strict-key", json!({"users": ["s"], "data": "fine"}))
        .await;
    assert_eq!(client.next_data().await, "fine");
    node.shutdown().await;
}

#[tokio::test]
async fn plugins_persist_across_a_restart() {
    let store = tempfile::tempdir().unwrap();
    let node1 = node(store.path(), "").await;
    let version = install(&node1, "shop", "keyword_filter").await;
    node1.shutdown().await;

    let node2 = node(store.path(), "").await;
    let (_, list) = admin(&node2, "GET", "/admin/v1/tenants/shop/plugins").await;
    assert_eq!(list["active"], version.as_str());
    let (_, answer) = node2
        .post(
            "/v1/push",
            Some("shop-key"),
            &json!({"broadcast": true, "data": "spoiler"}),
        )
        .await;
    assert!(answer["dropped"].is_string(), "{answer}");

    let (status, _) = admin(
        &node2,
        "DELETE",
        &format!("/admin/v1/tenants/shop/plugins/{version}"),
    )
    .await;
    assert_eq!(status, 204);
    let (_, answer) = node2
        .post(
            "/v1/push",
            Some("shop-key"),
            &json!({"broadcast": true, "data": "spoiler"}),
        )
        .await;
    assert!(
        answer.get("dropped").is_none(),
        "no plugin any more: {answer}"
    );
    node2.shutdown().await;
}

#[tokio::test]
async fn a_slow_deliver_plugin_delays_only_its_own_tenant() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), &tenant("slow", "timeout = \"3s\"")).await;
    install(&node, "slow", "misbehave").await;
    let mut victim = node.connect_user("slow", "victim").await;
    let mut bystander = node.connect_user("acme", "bystander").await;
    let deliver_timeouts = async || {
        let (_, metrics) = node.get_text("/metrics").await;
        metric_value(
            &metrics,
            "pushgate_plugin_calls_total",
            &[
                "tenant=\"slow\"",
                "hook=\"on-deliver\"",
                "outcome=\"timeout\"",
            ],
        )
    };
    let before = deliver_timeouts().await;

    // Two messages that each keep the slow tenant's plugin busy for 3 s.
    for n in 0..2 {
        node.push(
            "slow-key",
            json!({"users": ["victim"], "data": {"do": "loop at-delivery", "n": n}}),
        )
        .await;
    }
    // Another tenant's message does not wait behind them.
    node.push(
        "acme-key",
        json!({"users": ["bystander"], "data": "not delayed"}),
    )
    .await;
    assert_eq!(bystander.next_data().await, "not delayed");
    assert_eq!(
        deliver_timeouts().await - before,
        0.0,
        "the bystander was served while the slow plugin was still on its first message"
    );
    // The slow tenant still gets its messages, in order, once the plugin
    // is stopped (failure policy: open).
    assert_eq!(victim.next_data().await["n"], 0);
    assert_eq!(victim.next_data().await["n"], 1);
    node.shutdown().await;
}

#[tokio::test]
async fn a_drain_waits_for_messages_still_with_a_deliver_plugin() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), &tenant("lagging", "timeout = \"1s\"")).await;
    install(&node, "lagging", "misbehave").await;
    let mut client = node.connect_user("lagging", "patient").await;
    // Accepted (202) while the plugin will hold it for a second.
    node.push(
        "lagging-key",
        json!({"users": ["patient"], "data": {"do": "loop at-delivery"}}),
    )
    .await;
    let (status, _) = admin(&node, "POST", "/admin/v1/drain").await;
    assert_eq!(status, 202);
    assert_eq!(
        client.next_data().await["do"],
        "loop at-delivery",
        "delivered before the close"
    );
    assert_eq!(client.close_code().await, 1012);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_spends_only_its_own_tenants_share_of_the_node() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), &tenant("slow", "timeout = \"2s\"")).await;
    install(&node, "slow", "misbehave").await;
    let mut bystander = node.connect_user("acme", "bystander").await;

    // Four batches of three messages whose every on-publish call runs
    // until the 2 s timeout, at once.
    let mut batches: futures_util::stream::FuturesUnordered<_> = (0..4)
        .map(|n| {
            let http = node.http.clone();
            let url = format!("{}/v1/push/batch", node.http_base);
            tokio::spawn(async move {
                let message = json!({"broadcast": true, "data": {"do": "loop", "batch": n}});
                let response = http
                    .post(url)
                    .bearer_auth("slow-key")
                    .json(&json!({"messages": [message, message, message]}))
                    .send()
                    .await
                    .unwrap();
                let retry_after = response.headers().get("retry-after").cloned();
                (response.status().as_u16(), retry_after)
            })
        })
        .collect();
    // The tenant's share (two calls at once) is in use: the other batches
    // are refused at once, with a time to retry.
    let mut refused = 0;
    let mut answered = Vec::new();
    while let Some(batch) = futures_util::StreamExt::next(&mut batches).await {
        let (status, retry_after) = batch.unwrap();
        if status == 503 {
            refused += 1;
            assert!(retry_after.is_some(), "503 says when to retry");
            if refused == 2 {
                // Two batches still hold the plugin: another tenant's push
                // goes through meanwhile.
                let started = std::time::Instant::now();
                node.push(
                    "acme-key",
                    json!({"users": ["bystander"], "data": "on time"}),
                )
                .await;
                assert_eq!(bystander.next_data().await, "on time");
                let took = started.elapsed();
                eprintln!("another tenant's push reached its client in {took:?}");
                assert!(
                    took < std::time::Duration::from_secs(1),
                    "another tenant waited {took:?} for a slow plugin"
                );
            }
        } else {
            answered.push(status);
        }
    }
    assert_eq!(refused, 2, "two batches over the share: {answered:?}");
    assert_eq!(
        answered,
        [202, 202],
        "failing open, the others are published"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_tenant_removed_and_created_again_keeps_none_of_its_plugins() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    let settings = |auth: &str| {
        json!({"push_keys": ["again-key"], "auth": auth})
            .to_string()
            .into_bytes()
    };
    let (status, _) = node
        .admin("PUT", "/admin/v1/tenants/again", Some(settings("none")))
        .await;
    assert_eq!(status, 201);
    install(&node, "again", "misbehave").await;
    assert_eq!(
        handshake_status(&node, "/ws/again?user=x").await,
        101,
        "the plugin admits x"
    );

    let (status, _) = node.admin("DELETE", "/admin/v1/tenants/again", None).await;
    assert_eq!(status, 204);
    assert!(
        !store.path().join("again").exists(),
        "the removed tenant's plugins are deleted from the store"
    );
    let (status, _) = node
        .admin("PUT", "/admin/v1/tenants/again", Some(settings("none")))
        .await;
    assert_eq!(status, 201);
    assert_eq!(
        handshake_status(&node, "/ws/again?user=x").await,
        403,
        "auth = \"none\" admits nobody: no plugin of the old tenant serves"
    );
    let (status, listed) = admin(&node, "GET", "/admin/v1/tenants/again/plugins").await;
    assert_eq!((status, &listed["versions"]), (200, &json!([])));
    node.shutdown().await;
}

/// The status of a handshake to `path` from the loopback address `from`
/// (any 127.x.y.z works on Linux): another client machine, as far as the
/// node can tell.
async fn handshake_status_from(node: &TestNode, from: [u8; 4], path: &str) -> u16 {
    let server = node.node().public_addr();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((from, 0)))
        .expect("a loopback source address");
    let stream = socket.connect(server).await.expect("the node accepts");
    let url = format!("ws://{server}{path}");
    status_of(tokio_tungstenite::client_async(url, stream).await)
}

#[tokio::test]
async fn handshakes_that_make_authenticate_fail_cost_their_address_not_the_tenant() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    install(&node, "shop", "misbehave").await;

    // One address makes the plugin trap, again and again: it fails closed
    // for that client, then the address is refused before the plugin runs.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(handshake_status_from(&node, [127, 0, 0, 1], "/ws/shop?user=m&x=trap").await);
    }
    assert_eq!(&statuses[..3], [503, 503, 503], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");

    // Another client of the tenant still authenticates through the plugin,
    // and the tenant's filter still runs.
    assert_eq!(
        handshake_status_from(&node, [127, 0, 0, 2], "/ws/shop?user=ann").await,
        101
    );
    node.push(
        "shop-key",
        json!({"users": ["ann"], "data": "still filtered"}),
    )
    .await;
    let (_, metrics) = node.get_text("/metrics").await;
    let filtered = metric_value(
        &metrics,
        "pushgate_plugin_calls_total",
        &["tenant=\"shop\"", "hook=\"on-publish\"", "outcome=\"ok\""],
    );
    assert!(filtered >= 1.0, "on-publish still runs ({filtered})");
    let tripped = metric_value(
        &metrics,
        "pushgate_plugin_calls_total",
        &["tenant=\"shop\"", "outcome=\"tripped\""],
    );
    assert_eq!(tripped, 0.0, "nothing of the plugin was switched off");
    node.shutdown().await;
}

#[tokio::test]
async fn refreshes_that_make_authenticate_fail_cost_their_address_too() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    install(&node, "shop", "misbehave").await;
    // From 127.0.0.1: a connection whose fresh tokens make the plugin trap.
    let mut client = node.connect_user("shop", "m").await;
    let mut messages = Vec::new();
    for _ in 0..6 {
        client
            .send_json(json!({"type": "refresh", "token": "trap"}))
            .await;
        let answer = client.next_json().await;
        assert_eq!(answer["code"], "refresh_refused", "{answer}");
        messages.push(answer["message"].as_str().unwrap().to_owned());
    }
    assert!(
        messages[3..].iter().all(|m| m.contains("too many failed")),
        "refused before the plugin runs: {messages:?}"
    );
    // Its address is throttled for handshakes too; another is not.
    assert_eq!(
        handshake_status_from(&node, [127, 0, 0, 1], "/ws/shop?user=x").await,
        429
    );
    assert_eq!(
        handshake_status_from(&node, [127, 0, 0, 2], "/ws/shop?user=ann").await,
        101
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_plugin_is_held_to_every_bound_on_what_it_hands_back() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    install(&node, "shop", "misbehave").await;
    let mut victim = node.connect_user("shop", "victim").await;

    // Replacements over the tenant's max_message_bytes are bad output: the
    // failure policy (open here) delivers the message unchanged.
    for (n, behaviour) in ["huge", "huge at-delivery", "chatty"]
        .into_iter()
        .enumerate()
    {
        node.push(
            "shop-key",
            json!({"users": ["victim"], "data": {"do": behaviour, "n": n}}),
        )
        .await;
        assert_eq!(
            victim.next_data().await,
            json!({"do": behaviour, "n": n}),
            "{behaviour}"
        );
    }
    let (_, metrics) = node.get_text("/metrics").await;
    for hook in ["on-publish", "on-deliver"] {
        let bad = metric_value(
            &metrics,
            "pushgate_plugin_calls_total",
            &[
                "tenant=\"shop\"",
                &format!("hook=\"{hook}\""),
                "outcome=\"bad_output\"",
            ],
        );
        assert!(bad >= 1.0, "{hook}: oversized output counted ({bad})");
    }
    // A thousand log lines in one call: sixteen are written, the rest
    // counted as dropped.
    let dropped = metric_value(
        &metrics,
        "pushgate_plugin_logs_dropped_total",
        &["tenant=\"shop\""],
    );
    assert!(dropped >= 900.0, "log lines dropped: {dropped}");

    // A 10 KB rejection reason reaches the client cut to 256 bytes.
    match tokio_tungstenite::connect_async(format!("{}/ws/shop?user=x&long-reason", node.ws_base))
        .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 401);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            let reason = body["error"]["message"].as_str().unwrap();
            assert!(reason.len() <= 256, "{} bytes", reason.len());
        }
        other => panic!("a rejection was expected: {other:?}"),
    }
    // Ten thousand metadata entries are not an identity.
    assert_eq!(
        handshake_status(&node, "/ws/shop?user=x&meta-flood").await,
        503
    );
    // Nor a hundred thousand topics: a connection holds what subscribe
    // allows, no more.
    assert_eq!(
        handshake_status(&node, "/ws/shop?user=x&topic-flood").await,
        403
    );
    let mut still = node.connect_user("shop", "still").await;
    node.push("shop-key", json!({"users": ["still"], "data": "fine"}))
        .await;
    assert_eq!(still.next_data().await, "fine");
    node.shutdown().await;
}

#[tokio::test]
async fn messages_keep_their_order_when_the_deliver_plugin_goes_while_some_wait() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    let version = install(&node, "shop", "misbehave").await;
    let mut reader = node.connect_user("shop", "reader").await;

    // Each of these holds the tenant's lane for its 100 ms timeout.
    for n in 0..5 {
        node.push(
            "shop-key",
            json!({"users": ["reader"], "data": {"do": "loop at-delivery", "n": n}}),
        )
        .await;
    }
    // The plugin goes while they wait; what comes next waits behind them.
    let (status, _) = admin(
        &node,
        "DELETE",
        &format!("/admin/v1/tenants/shop/plugins/{version}"),
    )
    .await;
    assert_eq!(status, 204);
    for n in 5..10 {
        node.push("shop-key", json!({"users": ["reader"], "data": {"n": n}}))
            .await;
    }
    for n in 0..10 {
        assert_eq!(reader.next_data().await["n"], n, "in order");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn messages_past_a_full_deliver_lane_keep_their_order() {
    let store = tempfile::tempdir().unwrap();
    let node = node(
        store.path(),
        &tenant("lined", "timeout = \"100ms\"\nmax_waiting_messages = 2"),
    )
    .await;
    install(&node, "lined", "misbehave").await;
    let mut reader = node.connect_user("lined", "reader").await;

    // Each holds the lane for its 100 ms timeout: two wait for the plugin,
    // the others behind them, for the failure policy (open: delivered).
    for n in 0..10 {
        node.push(
            "lined-key",
            json!({"users": ["reader"], "data": {"do": "loop at-delivery", "n": n}}),
        )
        .await;
    }
    for n in 0..10 {
        assert_eq!(reader.next_data().await["n"], n, "in order");
    }
    let (_, metrics) = node.get_text("/metrics").await;
    let skipped = metric_value(
        &metrics,
        "pushgate_plugin_calls_total",
        &["tenant=\"lined\"", "outcome=\"backlog\""],
    );
    assert!(
        skipped >= 1.0,
        "messages past the lane's room counted ({skipped})"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_instances_hold_no_more_memory_than_one_instance_may() {
    let store = tempfile::tempdir().unwrap();
    let limit = 12 << 20;
    let node = node(
        store.path(),
        &tenant(
            "hoarder",
            &format!("timeout = \"2s\"\nmax_memory_bytes = {limit}\nmax_concurrent_calls = 2"),
        ),
    )
    .await;
    install(&node, "hoarder", "misbehave").await;
    // Two calls at once: two instances, each keeping 8 MiB for good.
    let hoard = |n: u32| {
        node.push(
            "hoarder-key",
            json!({"users": ["u"], "data": {"do": "hoard", "n": n}}),
        )
    };
    tokio::join!(hoard(0), hoard(1));
    let (_, metrics) = node.get_text("/metrics").await;
    let pooled = metric_value(
        &metrics,
        "pushgate_plugin_pooled_memory_bytes",
        &["tenant=\"hoarder\""],
    );
    assert!(
        metrics.contains("pushgate_plugin_pooled_memory_bytes{"),
        "the pooled memory is shown"
    );
    assert!(
        pooled <= limit as f64,
        "the warm instances hold {pooled} bytes, more than one instance may ({limit})"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_its_plugin_is_still_deciding_when_a_drain_begins_gets_no_connection() {
    let store = tempfile::tempdir().unwrap();
    let node = node(
        store.path(),
        &tenant("late", "timeout = \"3s\"\nmax_concurrent_calls = 1"),
    )
    .await;
    install(&node, "late", "misbehave").await;
    // Ann's handshake takes the plugin 1.5 s; tried again while Bob's
    // handshakes below hold the tenant's one plugin slot (503, busy).
    let url = format!("{}/ws/late?user=ann&dawdle", node.ws_base);
    let deciding = tokio::spawn(async move {
        loop {
            match tokio_tungstenite::connect_async(&url).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(response))
                    if response.status() == 503 =>
                {
                    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[]))
                        .into_owned();
                    if body.contains("draining") {
                        return body;
                    }
                }
                other => panic!("not refused for the drain: {other:?}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    // The slot is taken (503) once Ann's handshake is with the plugin;
    // Bob's handshakes that got in before are kept open.
    let mut earlier = Vec::new();
    let deadline = std::time::Instant::now() + support::PATIENCE;
    loop {
        let url = format!("{}/ws/late?user=bob", node.ws_base);
        match tokio_tungstenite::connect_async(url).await {
            Ok((socket, _)) => earlier.push(support::Client { socket }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response))
                if response.status() == 503 =>
            {
                break;
            }
            Err(other) => panic!("handshake failed oddly: {other}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dawdling handshake never reached the plugin"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    let (status, _) = admin(&node, "POST", "/admin/v1/drain").await;
    assert_eq!(status, 202);
    // Admitted by the plugin after the drain began: refused, not connected.
    let refusal = deciding.await.unwrap();
    assert!(refusal.contains("draining"), "{refusal}");
    for mut client in earlier {
        assert_eq!(client.close_code().await, 1012);
    }
    node.wait_for(|n| n.sessions().connection_count() == 0)
        .await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_plugin_that_grows_a_table_past_its_bound_is_stopped() {
    let store = tempfile::tempdir().unwrap();
    let node = node(
        store.path(),
        &tenant("tables", "failure_policy = \"closed\"\ntimeout = \"2s\""),
    )
    .await;
    let (status, body) = upload(
        &node,
        "tables",
        support::wat_plugin("table-grower", "publish-filter"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let mut client = node.connect_user("tables", "t").await;
    let push = |data: String| {
        let node = &node;
        async move {
            let body = json!({"users": ["t"], "data": data});
            node.post("/v1/push", Some("tables-key"), &body).await
        }
    };
    // 6 bytes of JSON: 6,000 elements, within the bound of 20,000.
    let (status, answer) = push("fine".into()).await;
    assert_eq!((status, answer.get("dropped")), (202, None), "{answer}");
    assert_eq!(client.next_data().await, "fine");
    // 32 bytes: 32,000 more elements. Stopped; the closed policy drops it.
    let (status, answer) = push("x".repeat(30)).await;
    assert_eq!(status, 202);
    assert_eq!(answer["dropped"], "the tenant's plugin failed", "{answer}");
    let (_, metrics) = node.get_text("/metrics").await;
    let refused = metric_value(
        &metrics,
        "pushgate_plugin_calls_total",
        &[
            "tenant=\"tables\"",
            "hook=\"on-publish\"",
            "outcome=\"memory\"",
        ],
    );
    assert_eq!(refused, 1.0, "counted as a memory failure");
    // The failed instance is gone: a fresh one grows from nothing again.
    let (status, answer) = push("again".into()).await;
    assert_eq!((status, answer.get("dropped")), (202, None), "{answer}");
    assert_eq!(client.next_data().await, "again");
    node.shutdown().await;
}

/// `component` inside one that also makes `extra` instances of an empty
/// core module and exports the interface `export` of it: a plugin that
/// makes more core instances than a Rust build does. The outer component
/// imports what the inner one does (the same types and import sections,
/// copied) and passes it on.
fn with_core_instances(component: &[u8], extra: u32, export: &str) -> Vec<u8> {
    use wasm_encoder::{
        Alias, Component, ComponentAliasSection, ComponentExportKind, ComponentExportSection,
        ComponentInstanceSection, ComponentSectionId, InstanceSection, Module, ModuleArg,
        ModuleSection, RawSection,
    };
    use wasmparser::{Parser, Payload};
    let mut outer = Component::new();
    let mut imports = Vec::new();
    for payload in Parser::new(0).parse_all(component) {
        let (id, range) = match payload.unwrap() {
            Payload::Version { .. } | Payload::CustomSection(_) => continue,
            Payload::ComponentTypeSection(types) => (ComponentSectionId::Type, types.range()),
            Payload::ComponentImportSection(section) => {
                for import in section.clone() {
                    imports.push(import.unwrap().name.name.to_owned());
                }
                (ComponentSectionId::Import, section.range())
            }
            _ => break,
        };
        outer.section(&RawSection {
            id: id as u8,
            data: &component[range.start as usize..range.end as usize],
        });
    }
    // The imports are instances 0.., in order.
    let passed: Vec<(&str, ComponentExportKind, u32)> = imports
        .iter()
        .enumerate()
        .map(|(index, name)| (name.as_str(), ComponentExportKind::Instance, index as u32))
        .collect();
    outer.section(&RawSection {
        id: ComponentSectionId::Component as u8,
        data: component,
    });
    outer.section(&ModuleSection(&Module::new()));
    let mut core = InstanceSection::new();
    for _ in 0..extra {
        core.instantiate(0, Vec::<(&str, ModuleArg)>::new());
    }
    outer.section(&core);
    let mut instances = ComponentInstanceSection::new();
    instances.instantiate(0, passed);
    outer.section(&instances);
    let mut aliases = ComponentAliasSection::new();
    aliases.alias(Alias::InstanceExport {
        instance: imports.len() as u32,
        kind: ComponentExportKind::Instance,
        name: export,
    });
    outer.section(&aliases);
    let mut exports = ComponentExportSection::new();
    exports.export(
        export,
        ComponentExportKind::Instance,
        imports.len() as u32 + 1,
        None,
    );
    outer.section(&exports);
    outer.finish()
}

#[tokio::test]
async fn a_plugin_that_makes_more_core_instances_than_allowed_is_refused_at_upload() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    let filter = support::wat_plugin("table-grower", "publish-filter");
    let export = format!(
        "pushgate:plugin/on-publish@{}",
        pushgate::plugin::WIT_VERSION
    );
    // The filter is one core instance: three more reach the bound of four.
    let (status, body) = upload(&node, "shop", with_core_instances(&filter, 3, &export)).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = upload(&node, "shop", with_core_instances(&filter, 4, &export)).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("cannot be instantiated") && message.contains("instance"),
        "{message}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn missed_messages_go_through_the_deliver_plugin_like_live_ones() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), &tenant("away", "")).await;
    install(&node, "away", "personalize").await;
    let query = "user=amelie&lang=fr&role=staff";
    let mut amelie = node.connect("away", query).await;
    node.wait_for(|n| n.sessions().tenant_connections("away") == 1)
        .await;
    node.push("away-key", json!({"users": ["amelie"], "data": "seen"}))
        .await;
    let seen = amelie.next_json().await;
    let since = seen["pos"].as_str().expect("a position").to_owned();
    drop(amelie);
    node.wait_for(|n| n.sessions().tenant_connections("away") == 0)
        .await;

    for data in [
        json!({"i18n": {"en": "Hello", "fr": "Bonjour"}}),
        json!({"visible_to": ["admin"], "i18n": {"en": "Payroll", "fr": "Paie"}}),
        json!("for all"),
    ] {
        node.push("away-key", json!({"broadcast": true, "data": data}))
            .await;
    }
    let mut amelie = node
        .connect("away", &format!("{query}&since={since}"))
        .await;
    // In her language; the admins' message not at all. (Those this node
    // had not delivered yet when she came back arrive live, after
    // `recovered`.)
    let mut received = Vec::new();
    let mut recovered = None;
    while received.len() < 2 {
        let frame = amelie.next_json().await;
        match frame["type"].as_str() {
            Some("message") => received.push(frame["data"].clone()),
            Some("recovered") => recovered = Some(frame),
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert_eq!(received, [json!({"text": "Bonjour"}), json!("for all")]);
    let recovered = match recovered {
        Some(frame) => frame,
        None => amelie.next_json().await,
    };
    assert_eq!(recovered["type"], "recovered", "{recovered}");
    assert_eq!(recovered["complete"], true);
    node.shutdown().await;
}

#[tokio::test]
async fn versions_are_named_by_any_unique_prefix_as_logs_show_them() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), "").await;
    let first = install(&node, "shop", "keyword_filter").await;
    let second = install(&node, "shop", "pass_through").await;
    let (_, list) = admin(&node, "GET", "/admin/v1/tenants/shop/plugins").await;
    assert_eq!(list["active"], second.as_str());

    // The 12 hex digits logs and metrics show.
    let path = format!("/admin/v1/tenants/shop/plugins/{}/activate", &first[..12]);
    let (status, answer) = admin(&node, "POST", &path).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["version"], first.as_str(), "the whole version");
    let (_, list) = admin(&node, "GET", "/admin/v1/tenants/shop/plugins").await;
    assert_eq!(list["active"], first.as_str());

    for (prefix, expected) in [("abc", 400), ("ABCDEF12", 400), ("0000000000ff", 404)] {
        let path = format!("/admin/v1/tenants/shop/plugins/{prefix}/activate");
        let (status, answer) = admin(&node, "POST", &path).await;
        assert_eq!(status, expected, "{prefix}: {answer}");
    }
    let path = format!("/admin/v1/tenants/shop/plugins/{}", &second[..8]);
    let (status, _) = admin(&node, "DELETE", &path).await;
    assert_eq!(status, 204);
    let (_, list) = admin(&node, "GET", "/admin/v1/tenants/shop/plugins").await;
    assert_eq!(list["versions"].as_array().unwrap().len(), 1, "{list}");
    node.shutdown().await;
}

#[tokio::test]
async fn unusable_output_is_counted_once_per_call_and_trips_the_hook() {
    let store = tempfile::tempdir().unwrap();
    let node = node(
        store.path(),
        &tenant("garbled", "failure_policy = \"open\""),
    )
    .await;
    install(&node, "garbled", "misbehave").await;
    let outcome = async |outcome: &str| {
        let (_, metrics) = node.get_text("/metrics").await;
        metric_value(
            &metrics,
            "pushgate_plugin_calls_total",
            &[
                "tenant=\"garbled\"",
                "hook=\"on-publish\"",
                &format!("outcome=\"{outcome}\""),
            ],
        )
    };
    for n in 0..7 {
        let (status, _) = node
            .post(
                "/v1/push",
                Some("garbled-key"),
                &json!({"broadcast": true, "data": {"do": "huge", "n": n}}),
            )
            .await;
        assert_eq!(status, 202, "the open policy publishes it unchanged");
    }
    // Each of the first five calls counted once, as bad output, not also
    // as ok; then the hook is tripped and skipped.
    assert_eq!(outcome("ok").await, 0.0);
    assert_eq!(outcome("bad_output").await, 5.0);
    assert_eq!(outcome("tripped").await, 2.0);
    node.shutdown().await;
}

/// Uploads `name` for `tenant` without activating it; its version.
async fn install_inactive(node: &TestNode, tenant: &str, name: &str) -> String {
    let path = format!("/admin/v1/tenants/{tenant}/plugins?activate=false");
    let (status, body) = node.admin("POST", &path, Some(plugin(name))).await;
    assert_eq!(status, 201, "{name}: {body}");
    body["version"].as_str().unwrap().to_owned()
}

/// Waits until the tenant's shadow report on `node` satisfies `condition`.
async fn shadow_report_until(
    node: &TestNode,
    tenant: &str,
    what: &str,
    condition: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/admin/v1/tenants/{tenant}/plugins/shadow");
    let deadline = std::time::Instant::now() + support::PATIENCE;
    loop {
        let (status, report) = admin(node, "GET", &path).await;
        if status == 200 && condition(&report) {
            return report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not reached ({status} {report})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_version_is_compared_off_the_delivery_path_and_never_changes_what_clients_get() {
    let store = tempfile::tempdir().unwrap();
    let shadowed = tenant(
        "shadowed",
        "[tenants.shadowed.plugin.config]\nwords = \"spoiler\"\nmode = \"drop\"",
    );
    let node = node(store.path(), &shadowed).await;
    // The active version passes everything; the shadow drops spoilers.
    let active = install(&node, "shadowed", "misbehave").await;
    let filter = install_inactive(&node, "shadowed", "keyword_filter").await;
    let shadow_path = format!(
        "/admin/v1/tenants/shadowed/plugins/{}/shadow",
        &filter[..12]
    );
    let (status, answer) = admin(&node, "POST", &shadow_path).await;
    assert_eq!(
        (status, answer["version"].as_str()),
        (200, Some(filter.as_str())),
        "{answer}"
    );
    let (_, list) = admin(&node, "GET", "/admin/v1/tenants/shadowed/plugins").await;
    assert_eq!(
        (list["active"].as_str(), list["shadow"].as_str()),
        (Some(active.as_str()), Some(filter.as_str()))
    );

    let mut reader = node.connect_user("shadowed", "reader").await;
    let texts = [
        "a spoiler",
        "clean",
        "another SPOILER",
        "fine",
        "spoiler again",
    ];
    for text in texts {
        node.push(
            "shadowed-key",
            json!({"users": ["reader"], "data": {"text": text}}),
        )
        .await;
    }
    // Clients get exactly what the active version decided: all of it.
    for text in texts {
        assert_eq!(reader.next_data().await, json!({ "text": text }));
    }
    let report = shadow_report_until(&node, "shadowed", "five comparisons", |r| {
        r["calls"]["on-publish"]["same"] == 2 && r["calls"]["on-publish"]["different"] == 3
    })
    .await;
    assert_eq!(
        report["differences"]["on-publish"],
        json!({"pass_to_drop": 3}),
        "{report}"
    );
    let samples = report["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3, "{report}");
    assert_eq!(
        samples[0]["input"]["data"], r#"{"text":"a spoiler"}"#,
        "{report}"
    );
    assert_eq!(samples[0]["input"]["target"], json!({"users": ["reader"]}));
    assert_eq!(
        (&samples[0]["active"], &samples[0]["shadow"]),
        (&json!({"verdict": "pass"}), &json!({"verdict": "drop"}))
    );
    let metrics = node.get_text("/metrics").await.1;
    let labels = ["tenant=\"shadowed\"", "hook=\"on-publish\""];
    assert_eq!(
        metric_value(
            &metrics,
            "pushgate_plugin_shadow_diff_total",
            &[labels[0], labels[1], "kind=\"pass_to_drop\""]
        ),
        3.0
    );

    // Samples can keep no data: only its size and a hash.
    let settings = json!({
        "push_keys": ["shadowed-key"], "auth": "development",
        "plugin": {"config": {"words": "spoiler", "mode": "drop"}, "shadow": {"redact_samples": true}}
    });
    let (status, answer) = admin_put(&node, "/admin/v1/tenants/shadowed", &settings).await;
    assert_eq!(status, 200, "{answer}");
    node.push(
        "shadowed-key",
        json!({"users": ["reader"], "data": {"text": "secret spoiler"}}),
    )
    .await;
    assert_eq!(reader.next_data().await, json!({"text": "secret spoiler"}));
    let report = shadow_report_until(&node, "shadowed", "the fourth sample", |r| {
        r["samples"].as_array().is_some_and(|s| s.len() == 4)
    })
    .await;
    let redacted = report["samples"][3]["input"]["data"].as_str().unwrap();
    assert!(
        redacted.starts_with("<25 bytes, sha256 ") && !redacted.contains("secret"),
        "{redacted}"
    );
    assert!(
        !report["samples"][3]["input"]["target"]
            .to_string()
            .contains("reader"),
        "{report}"
    );

    // A shadow that fails is counted and changes nothing: the filter is
    // active now, and the shadow traps on `trap`.
    let (status, _) = admin(
        &node,
        "POST",
        &format!("/admin/v1/tenants/shadowed/plugins/{filter}/activate"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, answer) = admin(
        &node,
        "POST",
        &format!("/admin/v1/tenants/shadowed/plugins/{active}/shadow"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    node.push(
        "shadowed-key",
        json!({"users": ["reader"], "data": {"text": "a trap"}}),
    )
    .await;
    assert_eq!(reader.next_data().await, json!({"text": "a trap"}));
    shadow_report_until(&node, "shadowed", "the shadow's failure counted", |r| {
        r["calls"]["on-publish"]["shadow_failed"] == 1
    })
    .await;

    // Bad requests: the active version cannot be its own shadow; no such
    // version; then the shadow ends.
    let (status, answer) = admin(
        &node,
        "POST",
        &format!("/admin/v1/tenants/shadowed/plugins/{filter}/shadow"),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{answer}"
    );
    let (status, _) = admin(
        &node,
        "POST",
        "/admin/v1/tenants/shadowed/plugins/abcdef123456/shadow",
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = admin(&node, "DELETE", "/admin/v1/tenants/shadowed/plugins/shadow").await;
    assert_eq!(status, 204);
    let (status, _) = admin(&node, "GET", "/admin/v1/tenants/shadowed/plugins/shadow").await;
    assert_eq!(status, 404);
    node.shutdown().await;
}

async fn admin_put(node: &TestNode, path: &str, body: &Value) -> (u16, Value) {
    node.admin("PUT", path, Some(body.to_string().into_bytes()))
        .await
}

/// Connects `users` to `tenant`, pushes each a spoiler, and returns those
/// whose copy came masked (served by the masking canary).
async fn masked_users(
    node: &TestNode,
    tenant: &str,
    users: &[String],
) -> std::collections::BTreeSet<String> {
    let mut clients = Vec::new();
    for user in users {
        clients.push(node.connect_user(tenant, user).await);
    }
    for chunk in users.chunks(100) {
        let messages: Vec<Value> = chunk
            .iter()
            .map(|user| json!({"users": [user], "data": {"text": "spoiler"}}))
            .collect();
        let (status, answer) = node
            .post(
                "/v1/push/batch",
                Some(&format!("{tenant}-key")),
                &json!({ "messages": messages }),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    let mut masked = std::collections::BTreeSet::new();
    for (user, client) in users.iter().zip(&mut clients) {
        match client.next_data().await["text"].as_str().unwrap() {
            "*******" => {
                masked.insert(user.clone());
            }
            "spoiler" => {}
            other => panic!("{user} got {other}"),
        }
    }
    for client in clients {
        drop(client);
    }
    node.wait_for(|n| n.sessions().tenant_connections(tenant) == 0)
        .await;
    masked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_serves_a_stable_share_of_users_that_grows_with_its_percentage() {
    let store = tempfile::tempdir().unwrap();
    let canaried = tenant(
        "canaried",
        "[tenants.canaried.plugin.config]\nwords = \"spoiler\"\nmode = \"mask\"",
    );
    let node = node(store.path(), &canaried).await;
    let active = install(&node, "canaried", "misbehave").await;
    let canary = install_inactive(&node, "canaried", "keyword_filter").await;
    let canary_path = format!("/admin/v1/tenants/canaried/plugins/{canary}/canary");

    // Refused: no share, a share over 100, the active version as canary.
    for body in [
        json!({"percent": 0}),
        json!({"percent": 101}),
        json!({"share": 5}),
    ] {
        let (status, answer) = node
            .admin("POST", &canary_path, Some(body.to_string().into_bytes()))
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
    }
    let active_canary = format!("/admin/v1/tenants/canaried/plugins/{active}/canary");
    let (status, _) = node
        .admin("POST", &active_canary, Some(br#"{"percent": 10}"#.to_vec()))
        .await;
    assert_eq!(status, 409);

    let (status, answer) = node
        .admin("POST", &canary_path, Some(br#"{"percent": 10}"#.to_vec()))
        .await;
    assert_eq!(
        (status, &answer["canary_percent"]),
        (200, &json!(10)),
        "{answer}"
    );
    let users: Vec<String> = (0..300).map(|n| format!("user-{n}")).collect();
    let at_10 = masked_users(&node, "canaried", &users).await;
    assert!(
        (9..=60).contains(&at_10.len()),
        "{} of 300 users in a 10 % canary",
        at_10.len()
    );
    // The same users again, on new connections.
    assert_eq!(masked_users(&node, "canaried", &users).await, at_10);

    // Raised: the users it served stay in it.
    let (status, _) = node
        .admin("POST", &canary_path, Some(br#"{"percent": 40}"#.to_vec()))
        .await;
    assert_eq!(status, 200);
    let at_40 = masked_users(&node, "canaried", &users).await;
    assert!(
        (80..=160).contains(&at_40.len()),
        "{} of 300 users in a 40 % canary",
        at_40.len()
    );
    assert!(at_40.is_superset(&at_10));
    let metrics = node.get_text("/metrics").await.1;
    assert_eq!(
        metric_value(
            &metrics,
            "pushgate_plugin_canary_percent",
            &["tenant=\"canaried\""]
        ),
        40.0
    );

    // Ended: the active version serves everyone.
    let (status, _) = admin(&node, "DELETE", "/admin/v1/tenants/canaried/plugins/canary").await;
    assert_eq!(status, 204);
    assert!(
        masked_users(&node, "canaried", &users[..50])
            .await
            .is_empty()
    );
    let (status, _) = admin(&node, "DELETE", "/admin/v1/tenants/canaried/plugins/canary").await;
    assert_eq!(status, 404);

    // Promoted: activating the canary's version ends the canary.
    node.admin("POST", &canary_path, Some(br#"{"percent": 5}"#.to_vec()))
        .await;
    let (status, _) = admin(
        &node,
        "POST",
        &format!("/admin/v1/tenants/canaried/plugins/{canary}/activate"),
    )
    .await;
    assert_eq!(status, 200);
    let (_, list) = admin(&node, "GET", "/admin/v1/tenants/canaried/plugins").await;
    assert_eq!(
        (list["active"].as_str(), &list["canary"]),
        (Some(canary.as_str()), &Value::Null),
        "{list}"
    );
    assert_eq!(
        masked_users(&node, "canaried", &users[..20]).await.len(),
        20
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_deliver_plugin_is_compared_per_recipient() {
    let store = tempfile::tempdir().unwrap();
    let node = node(store.path(), &tenant("intl_shadow", "")).await;
    // The active version passes everything; the shadow personalises.
    install(&node, "intl_shadow", "pass_through").await;
    let shadow = install_inactive(&node, "intl_shadow", "personalize").await;
    let path = format!("/admin/v1/tenants/intl_shadow/plugins/{shadow}/shadow");
    assert_eq!(admin(&node, "POST", &path).await.0, 200);
    let mut amelie = node
        .connect("intl_shadow", "user=amelie&lang=fr&role=staff")
        .await;
    let mut bob = node.connect("intl_shadow", "user=bob&role=admin").await;
    node.wait_for(|n| n.sessions().tenant_connections("intl_shadow") == 2)
        .await;

    let greeting = json!({"i18n": {"en": "Hello", "fr": "Bonjour"}});
    let admins_only = json!({"visible_to": ["admin"]});
    for data in [&greeting, &admins_only] {
        node.push("intl_shadow-key", json!({"broadcast": true, "data": data}))
            .await;
    }
    for client in [&mut amelie, &mut bob] {
        assert_eq!(client.next_data().await, greeting);
        assert_eq!(client.next_data().await, admins_only);
    }
    let report = shadow_report_until(&node, "intl_shadow", "four comparisons", |r| {
        r["calls"]["on-deliver"]["different"] == 3 && r["calls"]["on-deliver"]["same"] == 1
    })
    .await;
    assert_eq!(
        report["differences"]["on-deliver"],
        json!({"replaced_differently": 2, "pass_to_drop": 1}),
        "{report}"
    );
    let dropped = report["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "pass_to_drop")
        .expect("a sample of the drop");
    assert_eq!(dropped["input"]["recipient"], "amelie", "{report}");
    node.shutdown().await;
}

#[tokio::test]
async fn a_resume_through_a_slow_plugin_holds_up_no_live_delivery() {
    let store = tempfile::tempdir().unwrap();
    let slow = tenant("slow", "timeout = \"4s\"\nmax_concurrent_calls = 4");
    let node = node(store.path(), &slow).await;
    install(&node, "slow", "misbehave").await;
    // Ann sees one message, leaves, and misses three that take the
    // plugin 1.5 s each to deliver.
    let mut ann = node.connect_user("slow", "ann").await;
    node.push("slow-key", json!({"users": ["ann"], "data": "first"}))
        .await;
    let first = ann.next_json().await;
    let seen = first["pos"].as_str().unwrap().to_owned();
    drop(ann);
    node.wait_for(|n| n.sessions().tenant_connections("slow") == 0)
        .await;
    for n in 0..3 {
        node.push(
            "slow-key",
            json!({"users": ["ann"], "data": format!("dawdle at-delivery {n}")}),
        )
        .await;
    }
    let mut watcher = node.connect_user("slow", "watcher").await;

    // Ann resumes: her three go through the plugin (4.5 s) ...
    let resuming = {
        let url = format!("{}/ws/slow?user=ann&since={seen}", node.ws_base);
        tokio::spawn(resume_until_recovered(url))
    };
    node.wait_for(|n| n.sessions().tenant_connections("slow") == 2)
        .await;
    // ... while a message for another client of the tenant is delivered
    // at once, not behind her replay.
    node.push("slow-key", json!({"users": ["watcher"], "data": "live"}))
        .await;
    assert_eq!(watcher.next_data().await, "live");
    assert!(
        !resuming.is_finished(),
        "the live message waited for the resume's replay"
    );
    let recovered = resuming.await.unwrap();
    assert_eq!(recovered["replayed"], 3, "{recovered}");
    node.shutdown().await;
}

/// Resumes of one tenant run side by side within its plugin share: five
/// clients each missing a message the plugin takes 1.5 s to deliver, with
/// eight slots, are all recovered in about 1.5 s — not one after another
/// (4.5, 9, 13.5 … s, when a tenant's resumes queued behind one lock).
/// Connects to `url` (a handshake with `since`) and reads until the
/// `recovered` frame, which it returns.
async fn resume_until_recovered(url: String) -> Value {
    let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut client = support::Client { socket };
    loop {
        let frame = client.next_json().await;
        if frame["type"] == "recovered" {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_of_one_tenant_run_side_by_side_within_its_plugin_share() {
    let store = tempfile::tempdir().unwrap();
    let slow = tenant("slow", "timeout = \"4s\"\nmax_concurrent_calls = 8");
    let node = node(store.path(), &slow).await;
    install(&node, "slow", "misbehave").await;
    let users: Vec<String> = (0..5).map(|n| format!("u{n}")).collect();
    let mut seen = Vec::new();
    let mut clients = Vec::new();
    for user in &users {
        let mut client = node.connect_user("slow", user).await;
        node.push("slow-key", json!({"users": [user], "data": "first"}))
            .await;
        seen.push(client.next_json().await["pos"].as_str().unwrap().to_owned());
        clients.push(client);
    }
    drop(clients);
    node.wait_for(|n| n.sessions().tenant_connections("slow") == 0)
        .await;
    for user in &users {
        node.push(
            "slow-key",
            json!({"users": [user], "data": "dawdle at-delivery"}),
        )
        .await;
    }
    let started = std::time::Instant::now();
    let resumes: Vec<_> = users
        .iter()
        .zip(&seen)
        .map(|(user, seen)| {
            let url = format!("{}/ws/slow?user={user}&since={seen}", node.ws_base);
            tokio::spawn(resume_until_recovered(url))
        })
        .collect();
    for resume in resumes {
        assert_eq!(resume.await.unwrap()["replayed"], 1);
    }
    // One after another would take five plugin calls of 1.5 s each.
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_millis(7_500),
        "five resumes took {took:?}: they waited for each other"
    );
    node.shutdown().await;
}
