//! Credentials at the gRPC edge: the `authorization` header of every call, and Flight's Handshake
//! with basic auth, which answers with the bearer token to use from then on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use prost::Message;
use tonic::metadata::MetadataMap;

use crate::catalog::{Catalog, Role, TokenRecord};
use crate::error::{Error, Result};
use crate::token::Token;

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
        permit(&identity, needed, what)?;
        Ok(Some(identity))
    }

    /// Checks a call that needs `needed`. The edge ([`CheckedFirst`]) verified the token before
    /// the body was read and passed its `Identity` along in the request's extensions: then only
    /// the role is checked here. A call that did not pass the edge is verified in full.
    pub(super) async fn authorize(
        &self,
        metadata: &MetadataMap,
        verified: Option<&Identity>,
        needed: Role,
        what: &str,
    ) -> Result<()> {
        match (&self.authenticator, verified) {
            (None, _) => Ok(()),
            (Some(_), Some(identity)) => permit(identity, needed, what),
            (Some(_), None) => self.check(metadata, needed, what).await.map(|_| ()),
        }
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

/// The Flight service behind a credentials check made from the request's headers alone, before
/// its body is read: with auth on, a client without a valid token gets UNAUTHENTICATED without
/// the server decoding (or buffering) anything it sent. Roles are checked by each call, from the
/// `Identity` this puts in the request's extensions.
#[derive(Clone)]
pub(super) struct CheckedFirst<S> {
    inner: S,
    gate: Gate,
    /// Counts every call by RPC, refused ones included.
    metrics: std::sync::Arc<super::metrics::Metrics>,
}

impl<S> CheckedFirst<S> {
    pub(super) fn new(
        inner: S,
        gate: Gate,
        metrics: std::sync::Arc<super::metrics::Metrics>,
    ) -> Self {
        Self {
            inner,
            gate,
            metrics,
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for CheckedFirst<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for CheckedFirst<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<std::result::Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: tonic::codegen::http::Request<B>) -> Self::Future {
        // The service that was polled ready serves this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        self.metrics.call(request.uri().path());
        Box::pin(async move {
            let handshake = request.uri().path().ends_with("/Handshake");
            if !handshake && gate.authenticator.is_some() {
                let metadata = MetadataMap::from_headers(request.headers().clone());
                match gate.check(&metadata, Role::Read, "this call").await {
                    // The call checks only the role: the token is not verified twice.
                    Ok(Some(identity)) => {
                        request.extensions_mut().insert(identity);
                    }
                    Ok(None) => {}
                    Err(e) => return Ok(tonic::Status::from(e).into_http()),
                }
            }
            inner.call(request).await
        })
    }
}

/// PERMISSION_DENIED unless `identity`'s role allows `needed`.
fn permit(identity: &Identity, needed: Role, what: &str) -> Result<()> {
    if identity.role.allows(needed) {
        return Ok(());
    }
    Err(Error::PermissionDenied(format!(
        "token '{}' may only read; {what} needs a write token",
        identity.name
    )))
}

/// Who is calling: a token's name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Identity {
    /// The token's name: the user name in basic auth.
    pub(super) name: String,
    pub(super) role: Role,
}

/// How long known tokens are trusted before the catalog is asked again: a revoked token stops
/// working within this time, also when another process (the CLI) revoked it.
const REFRESH: Duration = Duration::from_secs(1);

/// Checks presented tokens against the catalog's hashes, re-reading them every [`REFRESH`].
pub(super) struct Authenticator {
    catalog: Catalog,
    known: Mutex<Option<(Instant, HashMap<String, Identity>)>>,
}

impl Authenticator {
    /// An authenticator over the tokens in `catalog`; nothing is read until the first call.
    pub(super) fn new(catalog: Catalog) -> Self {
        Self {
            catalog,
            known: Mutex::new(None),
        }
    }

    /// The identity of `secret`, or UNAUTHENTICATED.
    pub(super) async fn verify(&self, secret: &str) -> Result<Identity> {
        let hash = Token::hash_of(secret);
        let fresh = {
            let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            match known.as_ref() {
                Some((at, tokens)) if at.elapsed() < REFRESH => Some(tokens.get(&hash).cloned()),
                _ => None,
            }
        };
        let found = match fresh {
            Some(found) => found,
            None => {
                let tokens = self.catalog.tokens().await?;
                let tokens: HashMap<String, Identity> = tokens
                    .into_iter()
                    .map(|t: TokenRecord| {
                        (
                            t.hash,
                            Identity {
                                name: t.name,
                                role: t.role,
                            },
                        )
                    })
                    .collect();
                let found = tokens.get(&hash).cloned();
                *self.known.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), tokens));
                found
            }
        };
        found.ok_or_else(|| Error::Unauthenticated("invalid or revoked token".into()))
    }
}
