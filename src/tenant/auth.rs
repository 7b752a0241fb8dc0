//! Built-in authenticators: who a WebSocket client is, from its handshake.
//!
//! A tenant picks one in its configuration: `none` (nobody may connect),
//! `development` (the `user` query parameter, trusted blindly) or `jwt`
//! (a signed token, verified with the tenant's key). Keys are parsed once,
//! when the tenant is loaded, never per handshake.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::http::{HeaderMap, Uri, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::subscriptions::Grant;
use super::{Identity, TenantSettingsError};
use crate::config::{AuthMode, JwtConfig, TenantConfig};

/// The WebSocket subprotocol a browser offers, next to `bearer.<token>`, to
/// carry its token in `Sec-WebSocket-Protocol`; the server selects it.
pub const SUBPROTOCOL: &str = "pushgate.v1";
/// Prefix of the subprotocol entry that carries a token.
const BEARER_SUBPROTOCOL_PREFIX: &str = "bearer.";

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credentials, or credentials that do not verify: 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// The tenant accepts no clients: 403.
    #[error("{0}")]
    Refused(String),
}

/// A verified-token authenticator.
pub struct JwtAuthenticator {
    key: DecodingKey,
    validation: Validation,
    config: JwtConfig,
}

/// One tenant's authenticator.
pub enum Authenticator {
    Refuse,
    Development,
    Jwt(Box<JwtAuthenticator>),
}

/// What the handshake offered, for authenticators to read.
pub struct HandshakeView<'a> {
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

/// A successful authentication: the identity, and the subprotocol to
/// select in the 101 response (when the client offered one).
pub struct Admission {
    pub identity: Identity,
    pub subprotocol: Option<&'static str>,
}

impl Authenticator {
    /// Builds the authenticator `config` asks for; the error names the field.
    pub fn from_config(tenant: &str, config: &TenantConfig) -> Result<Self, TenantSettingsError> {
        match config.auth {
            AuthMode::None => Ok(Self::Refuse),
            AuthMode::Development => Ok(Self::Development),
            AuthMode::Jwt => {
                let jwt = config.jwt.clone().ok_or_else(|| TenantSettingsError {
                    field: format!("tenants.{tenant}"),
                    problem: format!("auth = \"jwt\" needs a [tenants.{tenant}.jwt] section"),
                })?;
                JwtAuthenticator::new(tenant, jwt).map(|a| Self::Jwt(Box::new(a)))
            }
        }
    }

    /// Verifies a fresh token a connection of `user` sent (a `refresh`
    /// command); returns when the connection must now end (`None`: never).
    pub fn refresh(&self, user: &str, token: &str) -> Result<Option<u64>, AuthError> {
        match self {
            Self::Jwt(jwt) => jwt.refresh(user, token),
            Self::Refuse | Self::Development => Err(AuthError::Refused(
                "this tenant's clients have no token to refresh".to_owned(),
            )),
        }
    }

    /// Establishes who the client of `handshake` is.
    pub fn authenticate(&self, handshake: &HandshakeView<'_>) -> Result<Admission, AuthError> {
        let subprotocol = selected_subprotocol(handshake.headers);
        let identity = match self {
            Self::Refuse => {
                return Err(AuthError::Refused(
                    "this tenant accepts no WebSocket clients: no authenticator is configured"
                        .to_owned(),
                ));
            }
            Self::Development => development_identity(handshake.uri)?,
            Self::Jwt(jwt) => jwt.identity(handshake)?,
        };
        Ok(Admission {
            identity,
            subprotocol,
        })
    }
}

fn query_params(uri: &Uri) -> Result<HashMap<String, String>, AuthError> {
    let query = uri.query().unwrap_or("");
    serde_urlencoded::from_str(query)
        .map_err(|err| AuthError::Unauthenticated(format!("malformed query: {err}")))
}

fn development_identity(uri: &Uri) -> Result<Identity, AuthError> {
    let mut params = query_params(uri)?;
    let user = params
        .remove("user")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| AuthError::Unauthenticated("the user query parameter is required".into()))?;
    // What every tenant's clients may send (see the edge): not metadata.
    params.remove("since");
    let topics = params
        .remove("topics")
        .map(|t| {
            t.split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(Identity {
        user,
        topics,
        metadata: params.into_iter().collect(),
        // It trusts any user id: restricting topics would protect nothing.
        grant: Grant::Anything,
        expires_at_secs: None,
    })
}

/// The subprotocol to select in the 101 response: [`SUBPROTOCOL`] when the
/// client offered it.
pub fn selected_subprotocol(headers: &HeaderMap) -> Option<&'static str> {
    offered_subprotocols(headers)
        .any(|p| p == SUBPROTOCOL)
        .then_some(SUBPROTOCOL)
}

fn offered_subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

impl JwtAuthenticator {
    fn new(tenant: &str, config: JwtConfig) -> Result<Self, TenantSettingsError> {
        let wrong = |name: &str, problem: String| TenantSettingsError {
            field: format!("tenants.{tenant}.jwt.{name}"),
            problem,
        };
        let algorithm: Algorithm = config.algorithm.parse().map_err(|_| {
            wrong(
                "algorithm",
                format!("unknown algorithm {:?}", config.algorithm),
            )
        })?;
        let key = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let secret = config
                    .secret
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| wrong("secret", format!("required for {algorithm:?}")))?;
                DecodingKey::from_secret(secret.as_bytes())
                    .map_err(|e| wrong("secret", e.to_string()))?
            }
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::ES256
            | Algorithm::ES384 => {
                let pem = config.public_key_pem.as_deref().ok_or_else(|| {
                    wrong("public_key_pem", format!("required for {algorithm:?}"))
                })?;
                let parsed = if matches!(algorithm, Algorithm::ES256 | Algorithm::ES384) {
                    DecodingKey::from_ec_pem(pem.as_bytes())
                } else {
                    DecodingKey::from_rsa_pem(pem.as_bytes())
                };
                parsed
                    .map_err(|e| wrong("public_key_pem", format!("not a usable public key: {e}")))?
            }
            other => {
                return Err(wrong("algorithm", format!("{other:?} is not supported")));
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.leeway_secs;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        match &config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
        }
        Ok(Self {
            key,
            validation,
            config,
        })
    }

    /// The token: `Authorization: Bearer`, then a `bearer.<token>`
    /// subprotocol, then the query parameter.
    fn token(&self, handshake: &HandshakeView<'_>) -> Result<String, AuthError> {
        let from_header = handshake
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned());
        let from_subprotocol = || {
            offered_subprotocols(handshake.headers)
                .find_map(|p| p.strip_prefix(BEARER_SUBPROTOCOL_PREFIX))
                .map(str::to_owned)
        };
        let from_query = || -> Result<Option<String>, AuthError> {
            Ok(query_params(handshake.uri)?.remove(&self.config.query_param))
        };
        let from_cookie = || {
            let name = self.config.cookie.as_deref()?;
            handshake
                .headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(';'))
                .find_map(|pair| {
                    let (key, value) = pair.trim().split_once('=')?;
                    (key == name && !value.is_empty()).then(|| value.to_owned())
                })
        };
        match from_header.or_else(from_subprotocol) {
            Some(token) => Ok(token),
            None => match from_query()?.or_else(from_cookie) {
                Some(token) => Ok(token),
                None => Err(AuthError::Unauthenticated(format!(
                    "a token is required: Authorization: Bearer, a bearer.<token> subprotocol, \
                     the {} query parameter{}",
                    self.config.query_param,
                    self.config
                        .cookie
                        .as_deref()
                        .map(|c| format!(" or the {c} cookie"))
                        .unwrap_or_default()
                ))),
            },
        }
    }

    /// The verified claims of `token`.
    fn claims(&self, token: &str) -> Result<BTreeMap<String, Value>, AuthError> {
        Ok(
            jsonwebtoken::decode::<BTreeMap<String, Value>>(token, &self.key, &self.validation)
                .map_err(|err| AuthError::Unauthenticated(describe_jwt_error(err.kind())))?
                .claims,
        )
    }

    /// When a connection authenticated by `claims` must end: at `exp`, with
    /// the leeway the token was accepted under.
    /// Any JSON number is an `exp` (RFC 7519 allows fractions: floored).
    fn expires_at(&self, claims: &BTreeMap<String, Value>) -> Option<u64> {
        let exp = claims.get("exp")?;
        let secs = match exp.as_u64() {
            Some(secs) => secs,
            // Saturating: a negative or huge one becomes 0 or u64::MAX.
            None => exp.as_f64().filter(|secs| secs.is_finite())?.floor() as u64,
        };
        Some(secs.saturating_add(self.config.leeway_secs))
    }

    fn identity(&self, handshake: &HandshakeView<'_>) -> Result<Identity, AuthError> {
        let token = self.token(handshake)?;
        let claims = self.claims(&token)?;
        let user = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                AuthError::Unauthenticated(
                    "the token's sub claim must be a non-empty string".into(),
                )
            })?
            .to_owned();
        let topics = match claims.get(&self.config.topics_claim) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect(),
            Some(_) => {
                return Err(AuthError::Unauthenticated(format!(
                    "the token's {} claim must be an array of strings",
                    self.config.topics_claim
                )));
            }
        };
        let metadata = self
            .config
            .metadata_claims
            .iter()
            .filter_map(|name| {
                let value = claims.get(name)?;
                let text = value
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_owned);
                Some((name.clone(), text))
            })
            .collect();
        let (topics, grant) = Grant::from_entries(topics);
        Ok(Identity {
            user,
            topics,
            metadata,
            grant,
            expires_at_secs: self.expires_at(&claims),
        })
    }

    /// A fresh token sent on an open connection of `user`: verified like a
    /// handshake's, and for the same subject. Returns when the connection
    /// must now end.
    fn refresh(&self, user: &str, token: &str) -> Result<Option<u64>, AuthError> {
        let claims = self.claims(token)?;
        if claims.get("sub").and_then(Value::as_str) != Some(user) {
            return Err(AuthError::Unauthenticated(
                "the new token is for another user".to_owned(),
            ));
        }
        Ok(self.expires_at(&claims))
    }
}

/// A refusal reason that helps the client's developer without helping an
/// attacker (no key material, no partial verification results).
fn describe_jwt_error(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "token expired".to_owned(),
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)".to_owned(),
        ErrorKind::InvalidSignature => "token signature does not verify".to_owned(),
        ErrorKind::InvalidAlgorithm => {
            "token signed with another algorithm than this tenant's".to_owned()
        }
        ErrorKind::InvalidAudience => "token audience is not this tenant's".to_owned(),
        ErrorKind::InvalidIssuer => "token issuer is not this tenant's".to_owned(),
        ErrorKind::MissingRequiredClaim(claim) => format!("token lacks the {claim} claim"),
        _ => "malformed token".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::http::HeaderValue;

    /// The JWT authenticator of tenant `t`: HS256 with `a-secret`, the token
    /// in `?token=`, topics and `lang` taken from the claims.
    fn hs256_authenticator() -> Authenticator {
        Authenticator::from_config(
            "t",
            &TenantConfig {
                auth: AuthMode::Jwt,
                jwt: Some(JwtConfig {
                    algorithm: "HS256".into(),
                    secret: Some("a-secret".into()),
                    public_key_pem: None,
                    issuer: None,
                    audience: None,
                    leeway_secs: 0,
                    query_param: "token".into(),
                    cookie: Some("session".into()),
                    topics_claim: "topics".into(),
                    metadata_claims: vec!["lang".into()],
                }),
                ..TenantConfig::default()
            },
        )
        .unwrap()
    }

    /// Outside input of authentication: the query, headers and a token.
    #[test]
    fn fuzz_handshakes_are_admitted_or_refused_never_a_panic() {
        let jwt = hs256_authenticator();
        arbtest::arbtest(|u| {
            let query: String = u.arbitrary()?;
            let path = format!("/ws/t?{}", query.replace(['#', ' '], ""));
            let Ok(uri) = path.parse::<Uri>() else {
                return Ok(());
            };
            let mut headers = HeaderMap::new();
            for name in [header::AUTHORIZATION, header::SEC_WEBSOCKET_PROTOCOL] {
                let value: &[u8] = u.arbitrary()?;
                if let Ok(value) = HeaderValue::from_bytes(value) {
                    headers.insert(name, value);
                }
            }
            let handshake = HandshakeView {
                uri: &uri,
                headers: &headers,
            };
            let _ = Authenticator::Development.authenticate(&handshake);
            let _ = jwt.authenticate(&handshake);
            let token: String = u.arbitrary()?;
            let _ = jwt.refresh("alice", &token);
            Ok(())
        })
        .run();
    }

    /// Claims a client chooses, in tokens signed with the tenant's secret:
    /// any `exp` (fractions, huge, negative, not a number), `sub`, topics and
    /// metadata of any shape are taken or refused, never a panic; a token
    /// taken expires no earlier than its `exp` allows and never in the past.
    #[test]
    fn fuzz_signed_claims_are_taken_or_refused_never_a_panic() {
        const WORDS: &[&str] = &["sub", "exp", "nbf", "topics", "lang", "news.*", "ann", ""];
        let jwt = hs256_authenticator();
        let now = crate::clock::now_micros() / 1_000_000;
        let admitted = std::cell::Cell::new(0);
        arbtest::arbtest(|u| {
            let mut claims = match crate::fuzzing::json_value(u, WORDS, 3)? {
                serde_json::Value::Object(map) => map,
                _ => serde_json::Map::new(),
            };
            if u.arbitrary()? {
                claims.insert("sub".into(), "ann".into());
            }
            match u.int_in_range(0..=4)? {
                0 => {}
                1 => {
                    let exp = now as f64 + u.int_in_range(-100..=100_000)? as f64 / 7.0;
                    claims.insert("exp".into(), serde_json::json!(exp));
                }
                2 => {
                    claims.insert("exp".into(), serde_json::json!(u.arbitrary::<f64>()?));
                }
                3 => {
                    claims.insert("exp".into(), serde_json::json!(u.arbitrary::<u64>()?));
                }
                _ => {
                    claims.insert("exp".into(), serde_json::json!(u.arbitrary::<i64>()?));
                }
            }
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(b"a-secret").unwrap(),
            )
            .unwrap();
            let uri: Uri = format!("/ws/t?token={token}").parse().unwrap();
            let headers = HeaderMap::new();
            let handshake = HandshakeView {
                uri: &uri,
                headers: &headers,
            };
            if let Ok(admission) = jwt.authenticate(&handshake) {
                admitted.set(admitted.get() + 1);
                if let Some(expires) = admission.identity.expires_at_secs {
                    assert!(
                        expires + 1 >= now,
                        "{claims:?} admitted, expired at {expires}"
                    );
                }
            }
            if let Ok(Some(expires)) = jwt.refresh("ann", &token) {
                assert!(
                    expires + 1 >= now,
                    "{claims:?} refreshed, expired at {expires}"
                );
            }
            Ok(())
        })
        .run();
        eprintln!("signed claims: {} tokens admitted", admitted.get());
    }
}
