//! Phase 2 of a handshake, RFC 6455 §4.2.1: is the request a valid
//! version-13 WebSocket upgrade, and which key does it carry.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use base64::Engine as _;

use crate::edge::api_error::ApiError;

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Phase 2, RFC 6455 §4.2.1: returns the client's `Sec-WebSocket-Key` if
/// the request is a valid version-13 upgrade.
pub(in crate::edge) fn upgrade(headers: &HeaderMap) -> Result<HeaderValue, ApiError> {
    if !header_has_token(headers, header::UPGRADE, "websocket") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket only: send an Upgrade: websocket request",
        )
        .with_header(header::UPGRADE, "websocket"));
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err(ApiError::bad_request(
            "Connection header must include \"upgrade\"",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_version",
            "only WebSocket version 13 is supported",
        )
        .with_header(header::SEC_WEBSOCKET_VERSION, "13"));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::bad_request("Sec-WebSocket-Key header is missing"))?;
    let decoded_len = base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .map(|nonce| nonce.len());
    if decoded_len != Ok(16) {
        return Err(ApiError::bad_request(
            "Sec-WebSocket-Key must be 16 bytes encoded in base64",
        ));
    }
    Ok(key.clone())
}

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse;

    use super::*;

    fn upgrade_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        headers
    }

    #[test]
    fn a_valid_upgrade_passes() {
        assert!(upgrade(&upgrade_headers()).is_ok());
    }

    #[test]
    fn a_key_that_is_not_16_bytes_is_refused() {
        let mut headers = upgrade_headers();
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("c2hvcnQ="),
        );
        assert_eq!(
            upgrade(&headers).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn another_version_gets_426_naming_13() {
        let mut headers = upgrade_headers();
        headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        let response = upgrade(&headers).unwrap_err().into_response();
        assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(response.headers()[header::SEC_WEBSOCKET_VERSION], "13");
    }

    /// Outside input of phase 7: `since` and `topics=` close to valid, or
    /// arbitrary. A request taken holds only allowed topics, each once,
    /// within the connection's limit; never a panic.
    /// Outside input of the upgrade check: arbitrary header values.
    #[test]
    fn fuzz_upgrade_headers_are_checked_never_a_panic() {
        arbtest::arbtest(|u| {
            let mut headers = upgrade_headers();
            for name in [
                header::UPGRADE,
                header::CONNECTION,
                header::SEC_WEBSOCKET_VERSION,
                header::SEC_WEBSOCKET_KEY,
            ] {
                if u.arbitrary()? {
                    let value: &[u8] = u.arbitrary()?;
                    if let Ok(value) = HeaderValue::from_bytes(value) {
                        headers.insert(name, value);
                    }
                }
            }
            let _ = upgrade(&headers);
            Ok(())
        })
        .run();
    }
}
