//! `pushgate plugin new NAME`: writes the plugin starter, `plugins/template`
//! — a crate of its own outside the gateway's workspace, `wit-bindgen` and
//! `serde_json` from crates.io, built for `wasm32-wasip2` by default, with a
//! publish filter that is correct for any JSON to start from — renamed, with
//! the WIT package copied in. One starter: the test suite builds what this
//! writes, so the template cannot go stale.

use std::path::{Path, PathBuf};

use super::WIT_VERSION;

/// The WIT package this host speaks, as the new crate gets it.
const WIT: &str = include_str!("../../wit/pushgate-plugin.wit");
const CARGO_TOML: &str = include_str!("../../plugins/template/Cargo.toml");
const LIB_RS: &str = include_str!("../../plugins/template/src/lib.rs");
const CARGO_CONFIG: &str = include_str!("../../plugins/template/.cargo/config.toml");
/// The template's package name, replaced by the new crate's.
const TEMPLATE_NAME: &str = r#"name = "pushgate-plugin-template""#;

/// Why no crate was written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error("{0:?}: a plugin name is 1 to 64 characters of a-z, 0-9, '-' and '_'")]
    InvalidName(String),
    #[error("{} exists already", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
}

/// Writes the crate `name` into `dir` (which must not exist yet).
pub fn new_plugin(dir: &Path, name: &str) -> Result<(), ScaffoldError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        return Err(ScaffoldError::InvalidName(name.to_owned()));
    }
    if dir.exists() {
        return Err(ScaffoldError::Exists(dir.to_owned()));
    }
    let cargo_toml = CARGO_TOML
        .replace(TEMPLATE_NAME, &format!("name = {name:?}"))
        .replace(
            r#"description = "A pushgate plugin""#,
            &format!(
                r#"description = "A pushgate plugin (WIT package pushgate:plugin@{WIT_VERSION})""#
            ),
        );
    let readme = format!(
        "# {name}\n\nA pushgate plugin. Build it, try it, upload it:\n\n```sh\n\
         rustup target add wasm32-wasip2\n\
         cargo build --release          # target/wasm32-wasip2/release/{file}.wasm\n\
         pushgate plugin try target/wasm32-wasip2/release/{file}.wasm --hook on-publish --data '{{\"text\": \"hi\"}}'\n\
         pushgate plugin upload --admin-token … --tenant … target/wasm32-wasip2/release/{file}.wasm\n```\n\n\
         The interface is `wit/pushgate-plugin.wit` (pushgate:plugin@{WIT_VERSION}).\n",
        file = name.replace('-', "_"),
    );
    let files: [(&str, &str); 5] = [
        ("Cargo.toml", &cargo_toml),
        ("README.md", &readme),
        ("src/lib.rs", LIB_RS),
        ("wit/pushgate-plugin.wit", WIT),
        (".cargo/config.toml", CARGO_CONFIG),
    ];
    for (path, text) in files {
        let path = dir.join(path);
        let write = |path: &Path| {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, text)
        };
        write(&path).map_err(|cause| ScaffoldError::Write { path, cause })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_crate_is_the_template_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let crate_dir = dir.path().join("shout");
        new_plugin(&crate_dir, "shout").unwrap();
        let cargo_toml = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
        assert!(cargo_toml.contains("name = \"shout\""), "{cargo_toml}");
        assert!(!cargo_toml.contains("template"), "{cargo_toml}");
        assert!(cargo_toml.contains(WIT_VERSION), "{cargo_toml}");
    }
}
