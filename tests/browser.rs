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
"#
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env("PUSHGATE_LOG__FORMAT", "json")
        .stdout(Stdio::piped())
        .spawn()
        .expect("pushgate starts");
    let stdout = child.stdout.take().unwrap();
    let process = Process { child };
    let (public, internal) = support::listening_addresses(stdout, "browser-node");
    (process, public, internal)
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

#[test]
fn the_javascript_client_in_a_browser_reconnects_resumes_and_stays_out_after_a_logout() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium (scripts/test.sh does)"
    );
    if !client_dir().join("node_modules/playwright-core").exists() {
        npm(&["ci", "--no-audit", "--no-fund"]);
    }
    npm(&["run", "build"]);

    let dir = tempfile::tempdir().unwrap();
    let (mut node, public, internal) = start_node(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let mut driver = Process {
        child: Command::new("node")
            .arg(client_dir().join("test/browser-driver.mjs"))
            .arg(format!("ws://{public}"))
            .arg(format!("http://{internal}"))
            .env("CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node runs the browser driver"),
    };
    let mut to_driver = driver.child.stdin.take().unwrap();
    let stdout = driver.child.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
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
                drain(&mut node);
                // The same addresses: the page reconnects where it was.
                node = start_node(dir.path(), &public, &internal).0;
                writeln!(to_driver, "restarted").unwrap();
            }
            "ok" => break,
            other => eprintln!("[driver] {other}"),
        }
    }
    let exit = driver.child.wait().unwrap();
    assert!(exit.success(), "the browser driver failed: {exit:?}");
}
