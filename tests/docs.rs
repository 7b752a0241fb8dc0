//! The docs' shell examples, run as written so that none goes stale.
//!
//! Every ```` ```sh ```` block in README.md, docs/, plugins/README.md and
//! clients/js/README.md names, after `sh`, the example it belongs to
//! (```` ```sh tour ````); [`EXAMPLES`] says which test runs each one, and
//! `every_shell_example_is_run_by_a_test` fails on a block that names none
//! or an unknown one. Blocks run here run in `bash -euo pipefail` with only
//! these rewrites: `cargo run --release --` (and `cargo run --release`
//! alone) is this build's `pushgate`, which is also first on `PATH`; the
//! default addresses `127.0.0.1:8080`/`:8081` are the test node's (the
//! CLI's `--node` default too, through `PUSHGATE_NODE`); and
//! where an example builds a plugin crate, `target/` is a build cache kept
//! between runs. A block that starts a node or a client (`pushgate serve`,
//! `pushgate client`) runs in the background, as in a terminal of its own.

mod support;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use serde_json::Value;
use support::{PATIENCE, Process};

/// Each example a block may name, and the test that runs it
/// (`file::function` under tests/, or a script's line).
const EXAMPLES: &[(&str, &str)] = &[
    (
        "two-commands",
        "docs::the_two_commands_are_the_ones_ci_runs",
    ),
    ("tour", "docs::the_readme_tour_runs_as_written"),
    ("sse-tour", "docs::the_readme_tour_runs_as_written"),
    (
        "cover-review",
        "browser::the_cover_review_page_shows_a_verdict_in_every_tab_of_the_creator",
    ),
    (
        // Not run as written (its nodes listen on fixed ports): this test
        // starts three nodes on one broker the same way, on free ports.
        "cluster-on-one-machine",
        "cluster::changes_through_one_nodes_admin_api_reach_every_node",
    ),
    (
        "plugin",
        "docs::a_plugin_from_plugin_new_builds_tries_and_serves_as_written",
    ),
    (
        "js-plugin",
        "docs::the_javascript_plugin_example_builds_and_uploads",
    ),
    ("js-client", "scripts/test.sh: (cd clients/js && npm test"),
];

const DOCUMENTS: &[&str] = &[
    "README.md",
    "docs/clients.md",
    "docs/cluster.md",
    "docs/design.md",
    "docs/operations.md",
    "docs/plugins.md",
    "docs/push-api.md",
    "plugins/README.md",
    "clients/js/README.md",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One ```` ```sh ```` block.
struct Block {
    document: &'static str,
    line: usize,
    indent: usize,
    example: String,
    text: String,
}

fn shell_blocks() -> Vec<Block> {
    let mut blocks = Vec::new();
    for document in DOCUMENTS {
        let text = std::fs::read_to_string(root().join(document)).unwrap();
        // Inside a fenced block: the shell block being read, or `None` in
        // another language's.
        let mut inside: Option<Option<Block>> = None;
        for (index, line) in text.lines().enumerate() {
            // Blocks inside a list are indented.
            let trimmed = line.trim_start();
            match (&mut inside, trimmed.strip_prefix("```")) {
                (Some(block), Some(_)) => {
                    blocks.extend(block.take());
                    inside = None;
                }
                (Some(Some(block)), None) => {
                    // Without the fence's indent (a block inside a list).
                    let indent = block.indent.min(line.len() - trimmed.len());
                    block.text.push_str(&line[indent..]);
                    block.text.push('\n');
                }
                (Some(None), None) | (None, None) => {}
                (None, Some(info)) => {
                    let mut words = info.split_whitespace();
                    let shell = matches!(words.next(), Some("sh" | "bash" | "shell" | "console"));
                    inside = Some(shell.then(|| Block {
                        document,
                        line: index + 1,
                        indent: line.len() - trimmed.len(),
                        example: words.next().unwrap_or("").to_owned(),
                        text: String::new(),
                    }));
                }
            }
        }
        assert!(
            inside.is_none(),
            "{document}: a fenced block is never closed"
        );
    }
    blocks
}

/// The blocks of `example`, in the order the documents list them.
fn example(name: &str) -> Vec<String> {
    let blocks: Vec<String> = shell_blocks()
        .into_iter()
        .filter(|block| block.example == name)
        .map(|block| block.text)
        .collect();
    assert!(!blocks.is_empty(), "no block names the example {name}");
    blocks
}

#[test]
fn every_shell_example_is_run_by_a_test() {
    let blocks = shell_blocks();
    assert!(blocks.len() >= 8, "the docs' blocks were found");
    for block in &blocks {
        assert!(
            EXAMPLES.iter().any(|(name, _)| *name == block.example),
            "{}:{}: a ```sh block must name its example, one of {:?} (or a new one \
             with a test that runs it), not {:?}",
            block.document,
            block.line,
            EXAMPLES.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            block.example,
        );
    }
    for (name, runner) in EXAMPLES {
        assert!(
            blocks.iter().any(|block| block.example == *name),
            "no block names {name} any more: remove it from EXAMPLES"
        );
        if let Some((script, line)) = runner.split_once(": ") {
            let script = std::fs::read_to_string(root().join(script)).unwrap();
            assert!(script.contains(line), "{runner} is not in its script");
        } else {
            let (file, function) = runner.split_once("::").unwrap();
            let source = std::fs::read_to_string(root().join(format!("tests/{file}.rs"))).unwrap();
            assert!(
                source.contains(&format!("fn {function}(")),
                "{name} is said to be run by {runner}, which does not exist"
            );
        }
    }
}

/// The commands of a block: comment lines and comments after a command
/// left out, continued lines joined.
fn commands(block: &str) -> Vec<String> {
    block
        .replace("\\\n", " ")
        .lines()
        .map(|line| line.split(" #").next().unwrap().trim().to_owned())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
}

#[test]
fn the_two_commands_are_the_ones_ci_runs() {
    let [block] = &example("two-commands")[..] else {
        panic!("one block of two commands")
    };
    assert_eq!(
        commands(block),
        ["cargo run --release", "scripts/test.sh"],
        "the README's two commands"
    );
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    assert!(
        ci.contains("bash scripts/test.sh"),
        "CI runs the test command"
    );
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("default-run = \"pushgate\""),
        "`cargo run` runs the gateway"
    );
}

/// The node and clients an example's blocks start, and what it runs.
struct Session {
    /// Where the blocks run, with `pushgate` first on `PATH`.
    dir: tempfile::TempDir,
    bin: PathBuf,
    env: Vec<(String, String)>,
    node: Option<(Process, String, String)>,
    clients: Vec<Terminal>,
}

/// A background block (a client): what it prints, line by line.
struct Terminal {
    process: Process,
    stdin: Option<std::process::ChildStdin>,
    printed: mpsc::Receiver<String>,
}

impl Terminal {
    fn type_line(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }

    /// The next line it prints that parses as JSON with this `type`
    /// (after `data: ` for an event stream).
    fn next_of_type(&mut self, kind: &str) -> Value {
        loop {
            let line = self
                .printed
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|_| panic!("the client prints a {kind} frame"));
            let json = line.strip_prefix("data: ").unwrap_or(&line);
            if let Ok(frame) = serde_json::from_str::<Value>(json)
                && frame["type"] == kind
            {
                return frame;
            }
        }
    }
}

impl Session {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_pushgate"), bin.join("pushgate")).unwrap();
        Session {
            dir,
            bin,
            env: Vec::new(),
            node: None,
            clients: Vec::new(),
        }
    }

    fn rewrite(&self, block: &str) -> String {
        // `cargo run --release --example …` is another program.
        let mut text = block
            .replace("cargo run --release --example", "cargo-example")
            .replace("cargo run --release --", "pushgate")
            .replace("cargo run --release", "pushgate")
            .replace("cargo-example", "cargo run --release --example");
        if let Some((_, public, internal)) = &self.node {
            text = text
                .replace("127.0.0.1:8080", public)
                .replace("127.0.0.1:8081", internal);
        }
        text
    }

    fn bash(&self, block: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .args(["-euo", "pipefail", "-c"])
            .arg(self.rewrite(block))
            .current_dir(self.dir.path())
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env_remove("CARGO_TARGET_DIR");
        for (variable, _) in std::env::vars() {
            if variable.starts_with("PUSHGATE_") || variable == "RUST_LOG" {
                command.env_remove(variable);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs a block as a terminal would: a node or a client in the
    /// background, anything else to its end (it must succeed); returns what
    /// a foreground block printed.
    fn run(&mut self, block: &str) -> String {
        let command = commands(block);
        let first = command.first().map(String::as_str).unwrap_or("");
        let first = self.rewrite(&format!("{first}\n"));
        if first.trim() == "pushgate" || first.starts_with("pushgate serve") {
            self.start_node(block);
            String::new()
        } else if first.starts_with("pushgate client") {
            self.start_client(block);
            String::new()
        } else if first.starts_with("curl -N") {
            // A stream that never ends: a terminal of its own.
            let terminal = self.start_terminal(block);
            self.clients.push(terminal);
            String::new()
        } else {
            let output = self.bash(block).output().unwrap();
            assert!(
                output.status.success(),
                "this block failed:\n{block}\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
    }

    /// A node: listening on free ports whatever the block's configuration.
    fn start_node(&mut self, block: &str) {
        let mut child = self
            .bash(&format!("exec {}", commands(block).join("\n")))
            .env("PUSHGATE_LISTEN__PUBLIC", "127.0.0.1:0")
            .env("PUSHGATE_LISTEN__INTERNAL", "127.0.0.1:0")
            .env("PUSHGATE_LOG__FORMAT", "json")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let process = Process { child };
        let (public, internal) = support::listening_addresses(stdout, "docs");
        // The CLI's `--node` default, 127.0.0.1:8081, is the test node too.
        self.env
            .push(("PUSHGATE_NODE".into(), format!("http://{internal}")));
        self.node = Some((process, public, internal));
    }

    fn start_client(&mut self, block: &str) {
        let mut terminal = self.start_terminal(block);
        // Typed first, as the tour says: the pong proves the connection is
        // registered before anything is pushed to it.
        terminal.type_line(r#"{"type":"ping"}"#);
        terminal.next_of_type("pong");
        self.clients.push(terminal);
    }

    /// Runs a block in the background: what it prints, line by line.
    fn start_terminal(&mut self, block: &str) -> Terminal {
        let mut child: Child = self
            .bash(&format!("exec {}", commands(block).join("\n")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines, printed) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = lines.send(line);
            }
        });
        let stdin = child.stdin.take();
        Terminal {
            process: Process { child },
            stdin,
            printed,
        }
    }
}

/// The `data` of each `-d '…'` body in a block, in order.
fn pushed_data(block: &str) -> Vec<Value> {
    block
        .split(" -d '")
        .skip(1)
        .map(|rest| {
            let body: Value = serde_json::from_str(rest.split('\'').next().unwrap()).unwrap();
            body["data"].clone()
        })
        .collect()
}

#[test]
fn the_readme_tour_runs_as_written() {
    let mut session = Session::new();
    // The first of the two commands.
    session.run("cargo run --release\n");
    let mut pushed = Vec::new();
    for block in example("tour") {
        let printed = session.run(&block);
        // curl prints each answer without a line break.
        for answer in serde_json::Deserializer::from_str(&printed).into_iter::<Value>() {
            let answer = answer.unwrap();
            assert!(answer["id"].is_string(), "{answer}");
        }
        pushed.extend(pushed_data(&block));
    }
    assert_eq!(
        pushed.len(),
        3,
        "the tour pushes to alice, news and all: {pushed:?}"
    );
    let client = &mut session.clients[0];
    for data in pushed {
        assert_eq!(client.next_of_type("message")["data"], data);
    }
    // The client ends when its input does.
    client.stdin.take();
    let ended = client.process.child.wait().unwrap();
    assert!(ended.success(), "{ended}");

    // The event stream: its hello, then the next push to alice.
    let [block] = &example("sse-tour")[..] else {
        panic!("one block")
    };
    session.run(block);
    let stream = session.clients.last_mut().unwrap();
    stream.next_of_type("hello");
    let answer = session.run(
        "curl -s -X POST http://127.0.0.1:8081/v1/push -H 'Authorization: Bearer demo-key' \\\n  \
         -d '{\"users\": [\"alice\"], \"data\": {\"text\": \"over SSE\"}}'\n",
    );
    assert!(answer.contains("\"id\""), "{answer}");
    let stream = session.clients.last_mut().unwrap();
    assert_eq!(
        stream.next_of_type("message")["data"],
        serde_json::json!({"text": "over SSE"})
    );
}

/// The plugin walk-through: `plugin new`, build, try, then a node with the
/// configuration the walk-through shows, a client, the upload and a push.
#[test]
fn a_plugin_from_plugin_new_builds_tries_and_serves_as_written() {
    let mut session = Session::new();
    // The crate's build shares a cache between runs: `target/` of the
    // blocks is this folder.
    let cache = root().join("plugins/target/docs-examples");
    session
        .env
        .push(("CARGO_TARGET_DIR".into(), cache.display().to_string()));
    let documents = std::fs::read_to_string(root().join("plugins/README.md")).unwrap();
    let shop_toml = documents
        .split("```toml shop.toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("plugins/README.md shows shop.toml");
    std::fs::write(session.dir.path().join("shop.toml"), shop_toml).unwrap();

    let mut printed = Vec::new();
    for block in example("plugin") {
        let block = block.replace(
            " target/wasm32-wasip2/",
            &format!(" {}/wasm32-wasip2/", cache.display()),
        );
        printed.push(session.run(&block));
    }
    let tried = printed
        .iter()
        .find(|output| output.contains("outcome"))
        .expect("a block tries the plugin");
    // After what `plugin new` printed: the report, as JSON.
    let report = &tried[tried.find("\n{").expect("a JSON report") + 1..];
    let tried: Value = serde_json::from_str(report).unwrap();
    assert_eq!(
        tried["outcome"],
        serde_json::json!({"verdict": "replace", "data": {"text": "HI"}}),
        "{tried}"
    );
    assert!(session.node.is_some() && session.clients.len() == 1);
    let frame = session.clients[0].next_of_type("message");
    assert_eq!(frame["data"]["text"], "HELLO", "{frame}");
}

#[test]
fn the_javascript_plugin_example_builds_and_uploads() {
    let mut session = Session::new();
    // A copy of this repository's plugins/js (its packages linked, not
    // copied) where the example makes its folder.
    let js = session.dir.path().join("plugins/js");
    std::fs::create_dir_all(&js).unwrap();
    let real = root().join("plugins/js");
    for file in ["build.mjs", "package.json"] {
        std::fs::copy(real.join(file), js.join(file)).unwrap();
    }
    let copy = Command::new("cp")
        .args(["-r"])
        .arg(real.join("keyword-filter"))
        .arg(js.join("keyword-filter"))
        .status()
        .unwrap();
    assert!(copy.success());
    std::os::unix::fs::symlink(root().join("wit"), session.dir.path().join("wit")).unwrap();
    if !real.join("node_modules").exists() {
        support::js_plugin("keyword-filter");
    }
    std::os::unix::fs::symlink(real.join("node_modules"), js.join("node_modules")).unwrap();

    let token = "docs-admin-token";
    session.env.push(("ADMIN_TOKEN".into(), token.into()));
    session
        .env
        .push(("PUSHGATE_ADMIN__TOKEN".into(), token.into()));
    session.run("cargo run --release\n");
    let [block] = &example("js-plugin")[..] else {
        panic!("one block")
    };
    // `npm ci` has run for the real folder: the copy links its packages.
    let block = block.replace("npm ci && ", "");
    let printed = session.run(&block);
    let uploaded: Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    assert!(uploaded["version"].is_string(), "{printed}");
}
