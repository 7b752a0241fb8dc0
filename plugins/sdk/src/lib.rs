//! Helpers for writing pushgate plugins.
//!
//! A plugin crate generates its bindings from pushgate's WIT package for the
//! world that names the hooks it implements, then implements them:
//!
//! ```ignore
//! pushgate_plugin_sdk::wit_bindgen::generate!({
//!     world: "publish-filter",
//!     path: "../../wit",
//!     runtime_path: "pushgate_plugin_sdk::wit_bindgen::rt",
//! });
//! ```
//!
//! Worlds: `authenticator` (authenticate), `publish-filter` (on-publish),
//! `deliver-filter` (on-deliver), `plugin` (all three). See
//! `plugins/README.md` and `plugins/template`.

pub use serde_json;
pub use wit_bindgen;

/// The value of query parameter `name` in `query` (without `?`),
/// percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The value of header `name` (case-insensitive) in `(name, value)` pairs.
pub fn header<'a, H>(
    headers: &'a [H],
    name: &str,
    parts: impl Fn(&'a H) -> (&'a str, &'a str),
) -> Option<&'a str> {
    headers
        .iter()
        .map(parts)
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
}

/// The value for `key` in session metadata.
pub fn metadata<'a>(metadata: &'a [(String, String)], key: &str) -> Option<&'a str> {
    metadata
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A comma-separated configuration value as a list (empty items dropped).
pub fn list(value: Option<String>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_param("a=1&token=x%2By", "token").as_deref(),
            Some("x+y")
        );
        assert_eq!(query_param("a=1", "token"), None);
    }

    #[test]
    fn lists_drop_empty_items() {
        assert_eq!(list(Some(" a, ,b ".into())), vec!["a", "b"]);
    }
}
