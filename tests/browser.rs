//! The JavaScript client (clients/js) in a real browser: Debian's Chromium,
//! driven by playwright-core (clients/js/test/browser-driver.mjs), against a
//! pushgate process this test owns and restarts when the driver asks.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::Process;

/// The whole browser run, restart included.
const BROWSER_PATIENCE: Duration = Duration::from_secs(180);

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// Runs `npm args` in the client's directory.
fn npm(args: &[&str]) {
    let output = Command::new("npm")
        .args(args)
        .current_dir(client_dir())
        .output()
        .expect("npm runs (Node.js 20 or newer is needed)");
    assert!(
        output.status.success(),
        "npm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Starts pushgate with `listen` (public, internal) and tenant `acme`.
fn start_node(dir: &Path, public: &str, internal: &str) -> (Process, String, String) {
    let config = dir.join("pushgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[listen]
public = "{public}"
internal = "{internal}"

[shutdown]
drain_window = "200ms"

[tenants.acme]
push_keys = ["acme-key"]
auth = "development"

[tenants.secure]
push_keys = ["secure-key"]
auth = "jwt"
[tenants.secure.jwt]
algorithm = "HS256"
secret = "browser-test-secret"
leeway_secs = 0
"#
        ),
    )
    .unwrap();
    support::serve(&config, "browser-node")
}

/// Stops pushgate with SIGTERM (a drain) and waits for it to exit.
fn drain(node: &mut Process) {
    let status = Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    support::eventually_blocking("pushgate exits after SIGTERM", support::PATIENCE, || {
        node.child.try_wait().unwrap().is_some()
    });
}

/// Checks that Chromium is there and builds the client; returns Chromium.
fn prepare() -> String {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium (scripts/test.sh does)"
    );
    if !client_dir().join("node_modules/playwright-core").exists() {
        npm(&["ci", "--no-audit", "--no-fund"]);
    }
    npm(&["run", "build"]);
    chromium
}

/// Runs the client's browser driver with `args` until it prints "ok"; each
/// "restart" it prints runs `restart` and is answered "restarted".
fn drive(chromium: &str, args: &[String], restart: impl FnMut()) {
    drive_script(
        chromium,
        &client_dir().join("test/browser-driver.mjs"),
        args,
        restart,
    );
}

/// [`drive`] with the driver `script`.
fn drive_script(chromium: &str, script: &Path, args: &[String], mut restart: impl FnMut()) {
    let mut driver = Process {
        child: Command::new("node")
            .arg(script)
            .args(args)
            .env("CHROMIUM", chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node runs the browser driver"),
    };
    let mut to_driver = driver.child.stdin.take().unwrap();
    let lines = support::stdout_lines(&mut driver.child);
    let deadline = std::time::Instant::now() + BROWSER_PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(err) => panic!(
                "the browser driver ended or hung ({err:?}); exit: {:?}",
                driver.child.try_wait()
            ),
        };
        match line.as_str() {
            "restart" => {
                restart();
                writeln!(to_driver, "restarted").unwrap();
            }
            "ok" => break,
            other => eprintln!("[driver] {other}"),
        }
    }
    let exit = driver.child.wait().unwrap();
    assert!(exit.success(), "the browser driver failed: {exit:?}");
}

#[test]
fn the_javascript_client_in_a_browser_reconnects_resumes_and_stays_out_after_a_logout() {
    let chromium = prepare();
    let dir = tempfile::tempdir().unwrap();
    let (mut node, public, internal) = start_node(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let args = [format!("ws://{public}"), format!("http://{internal}")];
    drive(&chromium, &args, || {
        drain(&mut node);
        // The same addresses: the page reconnects where it was.
        node = start_node(dir.path(), &public, &internal).0;
    });
}

/// Behind a proxy that refuses WebSocket, the client falls back to
/// Server-Sent Events, receives the user's and the topic's messages,
/// resumes across a node restart with nothing missed, and moves to
/// WebSocket once the proxy lets it through.
#[test]
fn the_javascript_client_falls_back_to_server_sent_events_and_returns_to_websocket() {
    let chromium = prepare();
    let dir = tempfile::tempdir().unwrap();
    let (mut node, public, internal) = start_node(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let args = [
        "sse-fallback".to_owned(),
        format!("ws://{public}"),
        format!("http://{internal}"),
    ];
    drive(&chromium, &args, || {
        drain(&mut node);
        node = start_node(dir.path(), &public, &internal).0;
    });
}

/// The example service's binary, built with the tests (`--all-targets`)
/// or now.
fn cover_review_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir.join("examples/cover-review");
    if !binary.exists() {
        let status = Command::new(option_env!("CARGO").unwrap_or("cargo"))
            .args(["build", "--example", "cover-review"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building examples/cover-review failed");
    }
    binary
}

#[test]
fn the_cover_review_page_shows_a_verdict_in_every_tab_of_the_creator() {
    let chromium = prepare();
    let dir = tempfile::tempdir().unwrap();
    let (_node, public, internal) = start_node(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let mut service = Process {
        child: Command::new(cover_review_binary())
            .args(["--listen", "127.0.0.1:0", "--push-key", "acme-key"])
            .arg("--pushgate")
            .arg(format!("http://{internal}"))
            .arg("--websocket")
            .arg(format!("ws://{public}/ws/acme"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("the cover-review service starts"),
    };
    let mut first = String::new();
    BufReader::new(service.child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let page = first
        .trim()
        .rsplit(' ')
        .next()
        .expect("the service says where it listens")
        .to_owned();
    // A sharp, square, well-exposed cover.
    let cover = image::RgbImage::from_fn(800, 800, |x, y| {
        if ((x / 16) + (y / 16)) % 2 == 0 {
            image::Rgb([230, 170, 40])
        } else {
            image::Rgb([20, 60, 120])
        }
    });
    let image = dir.path().join("cover.png");
    cover.save(&image).unwrap();
    let args = ["cover-review".to_owned(), page, image.display().to_string()];
    drive(&chromium, &args, || panic!("no restart in this scenario"));
    service.kill();
}

/// The console in a real browser: a tenant admin signs in, uploads a
/// plugin built from source, tries it, runs a 10 % canary of a second one
/// whose calls move under real pushes, a shadow with a differing sample,
/// promotes and rolls back, reads the audit trail with its key's name,
/// disconnects a user and replaces the push keys; another tenant answers
/// 403; an operator makes a viewer key and the viewer only reads. Nothing
/// is loaded from another origin. Screenshots go to
/// `target/console-screenshots/`.
#[test]
fn the_console_lets_a_tenant_admin_steer_its_plugins_and_an_operator_its_keys() {
    let chromium = prepare();
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("keyword_filter.wasm");
    let second = dir.path().join("misbehave.wasm");
    std::fs::write(&first, support::plugin("keyword_filter")).unwrap();
    std::fs::write(&second, support::plugin("misbehave")).unwrap();
    let config = dir.path().join("pushgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[listen]
public = "127.0.0.1:0"
internal = "127.0.0.1:0"

[admin]
token = "{operator}"
figures_every = "1s"

[tenants.shop]
push_keys = ["shop-key"]
auth = "development"
[tenants.shop.plugin.config]
words = "bad"
mode = "mask"

[tenants.other]
push_keys = ["other-key"]
auth = "development"
"#,
            operator = support::ADMIN_TOKEN
        ),
    )
    .unwrap();
    let (_node, public, internal) = support::serve(&config, "console-node");
    let internal = format!("http://{internal}");
    let made = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(support::admin(
            &internal,
            "POST",
            "/admin/v1/keys",
            Some(br#"{"name": "shop-lead", "role": "tenant-admin", "tenant": "shop"}"#.to_vec()),
        ));
    assert_eq!(made.0, 201, "{}", made.1);
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    let args = [
        internal,
        format!("ws://{public}"),
        made.1["key"].as_str().unwrap().to_owned(),
        support::ADMIN_TOKEN.to_owned(),
        first.display().to_string(),
        second.display().to_string(),
        shots.display().to_string(),
    ];
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/driver.mjs");
    drive_script(&chromium, &script, &args, || {
        panic!("no restart in this scenario")
    });
}

/// The console is served from the binary as written, within its size
/// budget, with a policy that forbids inline and foreign scripts.
#[tokio::test]
async fn the_console_is_small_and_allows_scripts_from_its_own_origin_only() {
    let node = support::TestNode::start("").await;
    let mut total = 0;
    for file in ["", "console.js", "console.css"] {
        let response = reqwest::get(format!("{}/console/{file}", node.http_base))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{file}");
        let policy = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(policy.contains("script-src 'self'") && !policy.contains("unsafe-inline"));
        assert!(policy.contains("default-src 'none'"));
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        total += response.bytes().await.unwrap().len();
    }
    assert!(total <= 300 * 1024, "the console is {total} bytes");
    let page = reqwest::get(format!("{}/console/", node.http_base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "nothing inline"
    );
    let missing = reqwest::get(format!("{}/console/nothing.js", node.http_base))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}
