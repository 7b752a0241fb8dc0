//! Test harness: starts real nodes on loopback ports chosen by the OS and
//! talks to them with real WebSocket and HTTP clients, so that each test
//! reads as a short story.
#![allow(dead_code)]

use std::time::Duration;

pub mod rocketmq;

use futures_util::{SinkExt, StreamExt};
use pushgate::{Config, Node};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Generous bound for anything that should happen "soon" on a loaded
/// 2-core machine. Tests wait for conditions, never for fixed times.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The admin token of every node the tests start.
pub const ADMIN_TOKEN: &str = "admin-test-token";

/// How often a waiting test looks again.
const POLL: Duration = Duration::from_millis(20);

/// Waits until `condition` holds, for at most `patience`; fails the test
/// naming `what` otherwise.
pub async fn eventually(what: &str, patience: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + patience;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not reached in {patience:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for code outside the async runtime (starting processes).
pub fn eventually_blocking(what: &str, patience: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + patience;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not reached in {patience:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// A process killed by its PID when the test ends, however it ends.
pub struct Process {
    pub child: std::process::Child,
}

impl Process {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One admin API call (with [`ADMIN_TOKEN`]) to the node whose internal
/// listener is `http_base`: the status and the JSON answer (`null` if none).
pub async fn admin(
    http_base: &str,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    admin_as(http_base, ADMIN_TOKEN, method, path, body).await
}

/// [`admin`] with admin key `key`.
pub async fn admin_as(
    http_base: &str,
    key: &str,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method.parse().unwrap(), format!("{http_base}{path}"))
        .bearer_auth(key)
        .timeout(Duration::from_secs(60));
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.expect("the admin API answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Seconds since the Unix epoch, for token claims.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWT of `claims`, signed with `algorithm` and `key` (a shared secret
/// for HS algorithms, a PEM private key for ES ones).
pub fn token(algorithm: jsonwebtoken::Algorithm, key: &str, claims: &Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let key = match algorithm {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(key.as_bytes()).unwrap()
        }
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(key.as_bytes()).unwrap(),
        other => panic!("no test keys for {other:?}"),
    };
    jsonwebtoken::encode(&Header::new(algorithm), claims, &key).unwrap()
}

/// Base configuration: both listeners on loopback port 0, tenant `acme`
/// (key `acme-key`) and tenant `globex` (key `globex-key`), both with the
/// development authenticator. `extra` is TOML appended to it.
pub fn config(extra: &str) -> Config {
    let text = format!(
        r#"
[listen]
public = "127.0.0.1:0"
internal = "127.0.0.1:0"

[shutdown]
drain_window = "50ms"

[tenants.acme]
push_keys = ["acme-key"]
auth = "development"

[tenants.globex]
push_keys = ["globex-key"]
auth = "development"
{extra}
"#
    );
    Config::from_toml(&text).expect("test configuration is valid")
}

/// A node running in this test process.
pub struct TestNode {
    pub node: Option<Node>,
    /// The node's state directory, when the test did not choose one:
    /// removed with the node.
    pub state: Option<tempfile::TempDir>,
    pub ws_base: String,
    pub http_base: String,
    pub http: reqwest::Client,
}

impl TestNode {
    pub async fn start(extra: &str) -> Self {
        Self::start_with(config(extra)).await
    }

    pub async fn start_with(mut config: Config) -> Self {
        let state = (config.state.dir == std::path::Path::new(pushgate::config::DEFAULT_STATE_DIR))
            .then(|| tempfile::tempdir().expect("a temporary state directory"));
        if let Some(dir) = &state {
            config.state.dir = dir.path().to_path_buf();
        }
        let node = Node::start(config).await.expect("node starts");
        Self {
            state,
            ws_base: format!("ws://{}", node.public_addr()),
            http_base: format!("http://{}", node.internal_addr()),
            node: Some(node),
            http: reqwest::Client::new(),
        }
    }

    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("node is running")
    }

    /// Connects a WebSocket client to `/ws/{tenant}?{query}`.
    pub async fn connect(&self, tenant: &str, query: &str) -> Client {
        connect_url(format!("{}/ws/{tenant}?{query}", self.ws_base)).await
    }

    /// Connects and waits until the node has registered the connection.
    pub async fn connect_user(&self, tenant: &str, user: &str) -> Client {
        let before = self.node().sessions().tenant_connections(tenant);
        let client = self.connect(tenant, &format!("user={user}")).await;
        self.wait_for(|n| n.sessions().tenant_connections(tenant) > before)
            .await;
        client
    }

    /// POSTs `body` to `path` on the internal listener with push key `key`.
    pub async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.http_base))
            .json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("push request");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Pushes and asserts the 202; returns the message id.
    pub async fn push(&self, key: &str, body: Value) -> String {
        let (status, answer) = self.post("/v1/push", Some(key), &body).await;
        assert_eq!(status, 202, "push answered {answer}");
        answer["id"].as_str().expect("id in answer").to_owned()
    }

    /// GETs a path of the internal listener as text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.http_base))
            .send()
            .await
            .expect("GET");
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Waits until `condition` holds on the node.
    pub async fn wait_for(&self, condition: impl Fn(&Node) -> bool) {
        eventually("the condition on the node", PATIENCE, || {
            condition(self.node())
        })
        .await;
    }

    /// One admin API call to this node (see [`admin`]).
    pub async fn admin(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> (u16, Value) {
        admin(&self.http_base, method, path, body).await
    }

    pub async fn shutdown(mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown().await;
        }
    }
}

/// Starts the `pushgate` binary with the configuration file `config`
/// (nothing from this process's PUSHGATE_* or RUST_LOG variables; JSON
/// logs): the process, killed when dropped, and its public and internal
/// addresses.
pub fn serve(config: &std::path::Path, label: &str) -> (Process, String, String) {
    let (process, public, internal, _) = serve_keeping_log(config, label);
    (process, public, internal)
}

/// What a node logged, line by line (JSON), as it logs it.
pub type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// [`serve`], keeping every line the node logs.
pub fn serve_keeping_log(config: &std::path::Path, label: &str) -> (Process, String, String, Log) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pushgate"));
    for (variable, _) in std::env::vars() {
        if variable.starts_with("PUSHGATE_") || variable == "RUST_LOG" {
            command.env_remove(variable);
        }
    }
    // In the configuration's folder: a relative state directory (the
    // default) is the test's own.
    let config = config
        .canonicalize()
        .expect("the configuration file exists");
    let mut child = command
        .current_dir(config.parent().expect("a file has a folder"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("PUSHGATE_LOG__FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("pushgate starts");
    let stdout = child.stdout.take().unwrap();
    let process = Process { child };
    let log = Log::default();
    let (public, internal) = read_log(stdout, label, Some(log.clone()));
    (process, public, internal, log)
}

/// Reads a node's JSON log from `stdout` until both listener addresses were
/// logged, and returns them. Goes on reading in the background, so that the
/// node never blocks on its log; with `PUSHGATE_TEST_LOGS` set, echoes each
/// line to stderr behind `[label]`.
pub fn listening_addresses(stdout: std::process::ChildStdout, label: &str) -> (String, String) {
    read_log(stdout, label, None)
}

/// [`listening_addresses`], keeping every line in `kept` if given.
fn read_log(stdout: std::process::ChildStdout, label: &str, kept: Option<Log>) -> (String, String) {
    use std::io::BufRead;
    let (found_tx, found_rx) = std::sync::mpsc::channel();
    let label = label.to_owned();
    std::thread::spawn(move || {
        let echo = std::env::var_os("PUSHGATE_TEST_LOGS").is_some();
        let mut public = None;
        let mut internal = None;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if echo {
                eprintln!("[{label}] {line}");
            }
            if let Some(kept) = &kept {
                kept.lock().unwrap().push(line.clone());
            }
            let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(addr) = entry["fields"]["public_addr"].as_str() {
                public = Some(addr.to_owned());
            }
            if let Some(addr) = entry["fields"]["internal_addr"].as_str() {
                internal = Some(addr.to_owned());
            }
            if let (Some(p), Some(i)) = (&public, &internal) {
                let _ = found_tx.send((p.clone(), i.clone()));
                public = None;
            }
        }
    });
    found_rx
        .recv_timeout(PATIENCE)
        .expect("the node logs its listening addresses")
}

/// A value of a metric in Prometheus text, summed over the series whose
/// labels contain every one of `labels` (`name="value"` pairs).
pub fn metric_value(exposition: &str, name: &str, labels: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(name)
                && matches!(line.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter(|line| labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Connects a WebSocket client to `url` (the upgrade must succeed).
pub async fn connect_url(url: String) -> Client {
    let (socket, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
        .expect("handshake succeeds");
    Client { socket }
}

/// The lines `child` prints on its standard output, as they come (a
/// thread reads them; the channel ends with the output).
pub fn stdout_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("the child's stdout is piped");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    lines
}

/// A WebSocket client.
pub struct Client {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq)]
pub enum Ending {
    Closed(u16, String),
    ClosedWithoutFrame,
}

impl Client {
    /// The next JSON text frame (protocol pings are skipped).
    pub async fn next_json(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(PATIENCE, self.socket.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .expect("valid frame");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON frame"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next `message` frame's `data`.
    pub async fn next_data(&mut self) -> Value {
        let frame = self.next_json().await;
        assert_eq!(frame["type"], "message", "{frame}");
        frame["data"].clone()
    }

    pub async fn send_json(&mut self, value: Value) {
        self.socket
            .send(Message::text(value.to_string()))
            .await
            .expect("send");
    }

    /// Reads until the server closes; returns the close code and reason.
    /// Message frames before the close are skipped.
    pub async fn ending(&mut self) -> Ending {
        loop {
            let next = tokio::time::timeout(PATIENCE, self.socket.next())
                .await
                .expect("the server closes in time");
            match next {
                Some(Ok(Message::Close(Some(frame)))) => {
                    // Read on, as a well-behaved client does, so that the
                    // close reply goes out.
                    let _ = tokio::time::timeout(PATIENCE, self.socket.next()).await;
                    return Ending::Closed(u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                    return Ending::ClosedWithoutFrame;
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads until closed and returns the close code (panics without one).
    pub async fn close_code(&mut self) -> u16 {
        match self.ending().await {
            Ending::Closed(code, _) => code,
            Ending::ClosedWithoutFrame => panic!("closed without a close frame"),
        }
    }
}

/// A close code as tungstenite names it, for readable assertions.
pub fn code(code: CloseCode) -> u16 {
    code.into()
}

/// A raw TCP client that speaks just enough HTTP and WebSocket by hand to
/// send what a well-behaved library never would.
pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    pub async fn connect(addr: &str) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.expect("TCP connect"),
        }
    }

    /// Sends a valid upgrade request for `path` and reads the 101 response.
    pub async fn upgrade(addr: &str, path: &str) -> Self {
        let mut client = Self::connect(addr).await;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        client.stream.write_all(request.as_bytes()).await.unwrap();
        let head = client.read_head().await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        client
    }

    /// Reads an HTTP response head (up to the blank line).
    pub async fn read_head(&mut self) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut byte))
                .await
                .expect("response in time")
                .expect("read");
            if n == 0 {
                break;
            }
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        // The server may close before it has read everything we send.
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads server frames until a close frame; returns its code. Server
    /// frames are never masked.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            let mut header = [0u8; 2];
            let read = tokio::time::timeout(PATIENCE, self.stream.read_exact(&mut header))
                .await
                .expect("a frame in time");
            if read.is_err() {
                return None;
            }
            let opcode = header[0] & 0x0f;
            let mut len = u64::from(header[1] & 0x7f);
            if len == 126 {
                len = u64::from(self.stream.read_u16().await.ok()?);
            } else if len == 127 {
                len = self.stream.read_u64().await.ok()?;
            }
            let mut payload = vec![0u8; len as usize];
            self.stream.read_exact(&mut payload).await.ok()?;
            if opcode == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    }

    /// True if the server closes the TCP connection within `PATIENCE`.
    pub async fn is_closed_by_server(&mut self) -> bool {
        let mut sink = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }
}

/// A client frame: `first` is the FIN/RSV/opcode byte; masked unless told.
pub fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// The component built from `plugins/<crate>` (e.g. `keyword_filter`),
/// built from source once per test process.
pub fn plugin(name: &str) -> Vec<u8> {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
        let target = plugins.join("target");
        let output = std::process::Command::new(option_env!("CARGO").unwrap_or("cargo"))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--manifest-path",
            ])
            .arg(plugins.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .expect("cargo runs");
        assert!(
            output.status.success(),
            "building the plugins failed (is the wasm32-wasip2 target installed? \
             scripts/test.sh installs it):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        target.join("wasm32-wasip2").join("release")
    });
    std::fs::read(dir.join(format!("{name}.wasm"))).expect("the plugin was built")
}

/// A test plugin written in WebAssembly text
/// (`plugins/testing/<name>/plugin.wat`), built into a component of
/// `world` of the WIT package in `wit/`: for what a Rust guest cannot do.
pub fn wat_plugin(name: &str, world: &str) -> Vec<u8> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = root.join("plugins/testing").join(name).join("plugin.wat");
    let mut module = wat::parse_file(&source).expect("the plugin's text assembles");
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve
        .push_path(root.join("wit"))
        .expect("the WIT package parses");
    let world = resolve
        .select_world(&[package], Some(world))
        .expect("the world exists");
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .expect("the world's types embed");
    wit_component::ComponentEncoder::default()
        .module(&module)
        .expect("the module fits the world")
        .validate(true)
        .encode()
        .expect("the component encodes")
}

/// A JavaScript plugin of `plugins/js/<name>`, built from source with
/// componentize-js (npm; a few seconds).
pub fn js_plugin(name: &str) -> Vec<u8> {
    static BUILT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _building = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/js");
    let run = |program: &str, args: &[&str]| {
        let output = std::process::Command::new(program)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|err| panic!("{program} runs (Node.js 20 or newer): {err}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    if !dir
        .join("node_modules/@bytecodealliance/componentize-js")
        .exists()
    {
        run("npm", &["ci", "--no-audit", "--no-fund"]);
    }
    let wasm = dir.join("target").join(format!("{name}.wasm"));
    run("node", &["build.mjs", name]);
    std::fs::read(&wasm).expect("the plugin was built")
}
