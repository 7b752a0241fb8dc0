//! Pusher's signatures, all HMAC-SHA256 under the app's secret, in hex:
//! a channel subscription (`<socket_id>:<channel>[:<channel_data>]`), a
//! user's sign-in (`<socket_id>::user::<user_data>`), an HTTP API request
//! (`<METHOD>\n<path>\n<sorted query>`, with `body_md5` and a timestamp
//! within [`API_TIMESTAMP_WINDOW_SECS`]) and a webhook's body.

use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};

use crate::config::PusherConfig;

/// How far an API request's `auth_timestamp` may be from now (Pusher's
/// own 600 s): a captured request cannot be replayed later.
pub const API_TIMESTAMP_WINDOW_SECS: u64 = 600;

fn mac(secret: &str, text: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(text);
    mac
}

/// Hex HMAC-SHA256 of `text` under `secret`.
pub fn sign(secret: &str, text: &[u8]) -> String {
    hex::encode(mac(secret, text).finalize().into_bytes())
}

/// True if `given` is the hex signature of `text` (compared in constant
/// time).
fn verify(secret: &str, text: &[u8], given: &str) -> bool {
    match hex::decode(given) {
        Ok(given) => mac(secret, text).verify_slice(&given).is_ok(),
        Err(_) => false,
    }
}

/// Checks `auth` (`<key>:<signature>`) as the app's own signature of
/// `text`.
fn check_auth(app: &PusherConfig, text: &str, auth: &str) -> bool {
    match auth.split_once(':') {
        Some((key, signature)) => key == app.key && verify(&app.secret, text.as_bytes(), signature),
        None => false,
    }
}

/// Whether `auth` authorises `socket_id` to subscribe to `channel` (with
/// `channel_data` for a presence channel).
pub fn channel_authorised(
    app: &PusherConfig,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> bool {
    let text = match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    };
    check_auth(app, &text, auth)
}

/// Whether `auth` signs `user_data` in for `socket_id`.
pub fn user_authorised(app: &PusherConfig, socket_id: &str, user_data: &str, auth: &str) -> bool {
    check_auth(app, &format!("{socket_id}::user::{user_data}"), auth)
}

/// Why a signed API request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiAuthError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("unknown auth_key")]
    UnknownKey,
    #[error("auth_version must be 1.0")]
    Version,
    #[error("auth_timestamp is more than {API_TIMESTAMP_WINDOW_SECS} s from the server's time")]
    Stale,
    #[error("body_md5 is not the MD5 of the body")]
    BodyDigest,
    #[error("invalid signature: expected the HMAC-SHA256 hex digest of {0:?}")]
    Signature(String),
}

/// Checks a signed API request: `query` is the raw query string, `body`
/// what came with it, `now_secs` the server's time.
pub fn check_api_request(
    app: &PusherConfig,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    now_secs: u64,
) -> Result<(), ApiAuthError> {
    let mut params: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap_or_default();
    let position = params.iter().position(|(k, _)| k == "auth_signature");
    let signature = position
        .map(|i| params.remove(i).1)
        .ok_or(ApiAuthError::Missing("auth_signature"))?;
    let get = |name: &'static str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or(ApiAuthError::Missing(name))
    };
    if get("auth_key")? != app.key {
        return Err(ApiAuthError::UnknownKey);
    }
    if get("auth_version")? != "1.0" {
        return Err(ApiAuthError::Version);
    }
    let timestamp: u64 = get("auth_timestamp")?
        .parse()
        .map_err(|_| ApiAuthError::Stale)?;
    if timestamp.abs_diff(now_secs) > API_TIMESTAMP_WINDOW_SECS {
        return Err(ApiAuthError::Stale);
    }
    if !body.is_empty() && get("body_md5")? != hex::encode(Md5::digest(body)) {
        return Err(ApiAuthError::BodyDigest);
    }
    params.sort();
    let sorted: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let text = format!("{method}\n{path}\n{}", sorted.join("&"));
    if verify(&app.secret, text.as_bytes(), &signature) {
        Ok(())
    } else {
        Err(ApiAuthError::Signature(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> PusherConfig {
        PusherConfig {
            app_id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
            client_events: false,
            client_events_per_second: 10,
            webhook_url: None,
            recovery: false,
            activity_timeout: std::time::Duration::from_secs(120),
        }
    }

    /// The examples of Pusher's authentication documentation.
    #[test]
    fn the_documented_channel_signatures_are_accepted() {
        let app = app();
        assert!(channel_authorised(
            &app,
            "1234.1234",
            "private-foobar",
            None,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        ));
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        assert!(channel_authorised(
            &app,
            "1234.1234",
            "presence-foobar",
            Some(data),
            "278d425bdf160c739803:31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80"
        ));
        // Another socket, channel or key: refused.
        let auth = format!(
            "{}:{}",
            app.key,
            sign(&app.secret, b"1234.1234:private-foobar")
        );
        assert!(!channel_authorised(
            &app,
            "1234.1235",
            "private-foobar",
            None,
            &auth
        ));
        assert!(!channel_authorised(
            &app,
            "1234.1234",
            "private-other",
            None,
            &auth
        ));
        assert!(!channel_authorised(
            &app,
            "1234.1234",
            "private-foobar",
            None,
            &auth.replace("278d", "aaaa")
        ));
        assert!(!channel_authorised(
            &app,
            "1234.1234",
            "private-foobar",
            None,
            "nonsense"
        ));
    }

    /// The example of Pusher's HTTP API reference.
    #[test]
    fn the_documented_api_signature_is_accepted_and_a_stale_one_refused() {
        let app = app();
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let query = "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
                     &body_md5=ec365a775a4cd0599faeb73354201b6f\
                     &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c";
        let check = |now| check_api_request(&app, "POST", "/apps/3/events", query, body, now);
        assert_eq!(check(1353088179), Ok(()));
        assert_eq!(check(1353088179 + 601), Err(ApiAuthError::Stale));
        let other_body =
            check_api_request(&app, "POST", "/apps/3/events", query, b"{}", 1353088179);
        assert_eq!(other_body, Err(ApiAuthError::BodyDigest));
        let other_path = check_api_request(&app, "POST", "/apps/4/events", query, body, 1353088179);
        assert!(matches!(other_path, Err(ApiAuthError::Signature(_))));
    }
}
