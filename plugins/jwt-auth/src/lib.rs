//! Authenticates WebSocket clients with an HS256 JWT.
//!
//! The token comes from `Authorization: Bearer …` or the query parameter
//! `token`. Configuration: `secret` (required), `metadata_claims`
//! (comma-separated claims copied into session metadata). `sub` becomes the
//! user id, `topics` (array of strings) the initial topics; `exp` is
//! required and enforced: the connection ends at `exp` (4007) unless the
//! client refreshes its token. A missing, forged or expired token is refused
//! with 401.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use pushgate_plugin_sdk::serde_json::{self, Value};
use pushgate_plugin_sdk::{header, list, query_param, wit_bindgen};
use sha2::Sha256;

wit_bindgen::generate!({
    world: "authenticator",
    path: "../../wit",
    runtime_path: "pushgate_plugin_sdk::wit_bindgen::rt",
});

use exports::pushgate::plugin::authenticate::Guest;
use pushgate::plugin::host;
use pushgate::plugin::types::{Handshake, Identity, Rejection};

struct JwtAuth;

fn unauthorized(reason: &str) -> Rejection {
    Rejection {
        status: 401,
        reason: reason.to_owned(),
    }
}

/// Verifies `token` with `secret`; returns its claims.
fn verify(token: &str, secret: &str) -> Result<serde_json::Map<String, Value>, Rejection> {
    let mut parts = token.split('.');
    let (Some(head), Some(body), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unauthorized("malformed token"));
    };
    let header: Value = URL_SAFE_NO_PAD
        .decode(head)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or_else(|| unauthorized("malformed token"))?;
    if header["alg"] != "HS256" {
        return Err(unauthorized("token must be signed with HS256"));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| unauthorized("malformed token"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|_| unauthorized("authenticator misconfigured"))?;
    mac.update(head.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    // verify_slice compares in constant time.
    mac.verify_slice(&signature)
        .map_err(|_| unauthorized("token signature does not verify"))?;
    URL_SAFE_NO_PAD
        .decode(body)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| unauthorized("malformed token"))
}

impl Guest for JwtAuth {
    fn authenticate(request: Handshake) -> Result<Identity, Rejection> {
        let Some(secret) = host::config("secret") else {
            host::log(
                host::Level::Error,
                "no `secret` in the plugin configuration",
            );
            return Err(Rejection {
                status: 503,
                reason: "authenticator not configured".to_owned(),
            });
        };
        let from_header = header(&request.headers, "authorization", |h| (&h.name, &h.value))
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let token = from_header
            .or_else(|| query_param(&request.query, "token"))
            .ok_or_else(|| unauthorized("a token is required"))?;
        let claims = verify(&token, &secret)?;
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| unauthorized("token lacks the exp claim"))?;
        let expires_at_millis = exp.saturating_mul(1000);
        if expires_at_millis <= host::now_millis() {
            return Err(unauthorized("token expired"));
        }
        let user = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| unauthorized("token lacks the sub claim"))?
            .to_owned();
        let topics = claims
            .get("topics")
            .and_then(Value::as_array)
            .map(|t| {
                t.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let metadata = list(host::config("metadata_claims"))
            .into_iter()
            .filter_map(|name| {
                let value = claims.get(&name)?;
                Some((
                    name,
                    value
                        .as_str()
                        .map_or_else(|| value.to_string(), str::to_owned),
                ))
            })
            .collect();
        host::session_expires_at(expires_at_millis);
        Ok(Identity {
            user,
            topics,
            metadata,
        })
    }
}

export!(JwtAuth);
