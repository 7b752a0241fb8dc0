//! The configuration as it may be shown (by `check-config` and the admin
//! API): push keys as fingerprints, every secret and every plugin setting's
//! value replaced by [`REDACTED`].

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Config, TenantConfig};

/// What stands where a secret was.
pub const REDACTED: &str = "<redacted>";

/// A short, non-reversible name for a push key, for listings and logs
/// (keys themselves are never shown or logged).
pub fn key_fingerprint(key: &str) -> String {
    Sha256::digest(key.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl TenantConfig {
    /// The tenant's settings without secrets. A plugin setting may hold
    /// one (a JWT secret, an API key): its key is shown, not its value.
    pub fn redacted(&self) -> Value {
        let mut view = serde_json::to_value(self).unwrap_or(Value::Null);
        let fingerprints: Vec<String> = self.push_keys.iter().map(|k| key_fingerprint(k)).collect();
        view["push_keys"] = json!(fingerprints);
        if let Some(secret) = view.pointer_mut("/jwt/secret")
            && !secret.is_null()
        {
            *secret = json!(REDACTED);
        }
        for path in ["/webhooks/secret", "/pusher/secret"] {
            if let Some(secret) = view.pointer_mut(path) {
                *secret = json!(REDACTED);
            }
        }
        if let Some(Value::Object(settings)) = view.pointer_mut("/plugin/config") {
            for value in settings.values_mut() {
                *value = json!(REDACTED);
            }
        }
        view
    }
}

impl Config {
    /// The whole configuration without secrets.
    pub fn redacted(&self) -> Value {
        let mut view = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(token) = view.pointer_mut("/admin/token")
            && !token.is_null()
        {
            *token = json!(REDACTED);
        }
        for (name, tenant) in &self.tenants {
            view["tenants"][name] = tenant.redacted();
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_secret_is_shown() {
        let config = Config::from_toml(
            "[admin]\ntoken = \"admin-secret\"\n\
             [tenants.t]\npush_keys = [\"push-secret\"]\nauth = \"jwt\"\n\
             [tenants.t.jwt]\nalgorithm = \"HS256\"\nsecret = \"jwt-secret\"\n\
             [tenants.t.plugin.config]\napi_key = \"plugin-secret\"",
        )
        .unwrap();
        let shown = config.redacted().to_string();
        for secret in ["admin-secret", "push-secret", "jwt-secret", "plugin-secret"] {
            assert!(!shown.contains(secret), "{secret} shown: {shown}");
        }
        assert!(shown.contains("api_key"), "setting names stay: {shown}");
        assert!(shown.contains(&key_fingerprint("push-secret")));
    }
}
