//! Credentials at the gRPC edge: the `authorization` header of every call, and Flight's Handshake
//! with basic auth, which answers with the bearer token to use from then on.

use std::sync::Arc;

use base64::Engine;
use prost::Message;
use tonic::metadata::MetadataMap;

use crate::auth::{Authenticator, Identity, Role};
use crate::error::{Error, Result};

/// Who may do what: nobody is checked when auth is off.
#[derive(Clone)]
pub(super) struct Gate {
    authenticator: Option<Arc<Authenticator>>,
}

/// Credentials as a client presents them.
enum Credentials {
    Bearer(String),
    Basic { name: String, secret: String },
}

impl Gate {
    pub(super) fn new(authenticator: Option<Authenticator>) -> Self {
        Self {
            authenticator: authenticator.map(Arc::new),
        }
    }

    /// The caller's identity (`None` with auth off), or UNAUTHENTICATED; PERMISSION_DENIED when
    /// its role does not allow `needed`.
    pub(super) async fn check(
        &self,
        metadata: &MetadataMap,
        needed: Role,
        what: &str,
    ) -> Result<Option<Identity>> {
        let Some(authenticator) = &self.authenticator else {
            return Ok(None);
        };
        let credentials = credentials(metadata)?.ok_or_else(|| {
            Error::Unauthenticated(
                "this server requires a token: send 'authorization: Bearer TOKEN', or handshake \
                 with basic auth (user = token name, password = token)"
                    .into(),
            )
        })?;
        let identity = verify(authenticator, credentials).await?;
        if !identity.role.allows(needed) {
            return Err(Error::PermissionDenied(format!(
                "token '{}' may only read; {what} needs a write token",
                identity.name
            )));
        }
        Ok(Some(identity))
    }

    /// A Handshake: basic auth in the `authorization` header or in the payload (Flight's
    /// `BasicAuth` message), or a bearer token. Answers with the bearer token to send on every
    /// call; with auth off there is nothing to check and nothing to answer.
    pub(super) async fn handshake(
        &self,
        metadata: &MetadataMap,
        payload: &[u8],
    ) -> Result<Option<String>> {
        let Some(authenticator) = &self.authenticator else {
            return Ok(None);
        };
        let from_payload = arrow_flight::BasicAuth::decode(payload)
            .ok()
            .filter(|b| !b.username.is_empty() || !b.password.is_empty())
            .map(|b| Credentials::Basic {
                name: b.username,
                secret: b.password,
            });
        let credentials = match credentials(metadata)? {
            Some(c) => c,
            None => from_payload.ok_or_else(|| {
                Error::Unauthenticated(
                    "handshake without credentials: send basic auth (user = token name, \
                     password = token) or a bearer token"
                        .into(),
                )
            })?,
        };
        let secret = match &credentials {
            Credentials::Bearer(secret) | Credentials::Basic { secret, .. } => secret.clone(),
        };
        verify(authenticator, credentials).await?;
        Ok(Some(secret))
    }
}

async fn verify(authenticator: &Authenticator, credentials: Credentials) -> Result<Identity> {
    match credentials {
        Credentials::Bearer(secret) => authenticator.verify(&secret).await,
        Credentials::Basic { name, secret } => {
            let identity = authenticator.verify(&secret).await?;
            if identity.name != name {
                return Err(Error::Unauthenticated(format!(
                    "wrong user '{name}' for this token: the user is the token's name"
                )));
            }
            Ok(identity)
        }
    }
}

/// The credentials in the `authorization` header, if there is one.
fn credentials(metadata: &MetadataMap) -> Result<Option<Credentials>> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let malformed =
        || Error::Unauthenticated("malformed authorization header: expected 'Bearer TOKEN'".into());
    let value = value.to_str().map_err(|_| malformed())?.trim();
    let (scheme, rest) = value.split_once(' ').ok_or_else(malformed)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Some(Credentials::Bearer(rest.to_string())));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(malformed)?;
        let (name, secret) = decoded.split_once(':').ok_or_else(malformed)?;
        return Ok(Some(Credentials::Basic {
            name: name.to_string(),
            secret: secret.to_string(),
        }));
    }
    Err(malformed())
}
