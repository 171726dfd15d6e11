//! Bearer tokens: what `artiflight token create` makes, what the catalog keeps (a hash, never the
//! token), and the [`Authenticator`] that checks a presented token against them.
//!
//! Tokens are 256 random bits, so a fast hash is as strong as a slow one here: nobody can guess
//! their way to a preimage, and hashing every request with BLAKE3 costs nanoseconds. The catalog
//! only ever sees the hash, so a copy of `catalog.sqlite` lets nobody in.
//!
//! ```
//! use artiflight_server::auth::{Role, Token};
//! let token = Token::generate();
//! assert!(token.secret().starts_with("afl_"));
//! assert_eq!(Token::hash_of(token.secret()), token.hash());
//! assert!(Role::Write.allows(Role::Read) && !Role::Read.allows(Role::Write));
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, TokenRecord};
use crate::error::{Error, Result};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// List, describe and read.
    Read,
    /// Also DoPut, register, create collections, delete and add columns.
    Write,
}

impl Role {
    /// Whether a holder of `self` may do what `needed` allows.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }

    /// The role's name, as `--role` and the catalog spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            other => Err(Error::invalid(format!(
                "unknown role '{other}': expected 'read' or 'write'"
            ))),
        }
    }
}

/// A new token: the secret, shown once, and the hash the catalog keeps.
pub struct Token {
    secret: String,
}

impl Token {
    /// A fresh random token, `afl_` and 43 base62 characters (256 bits).
    pub fn generate() -> Self {
        const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut rng = rand::rng();
        let body: String = (0..43)
            .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
            .collect();
        Self {
            secret: format!("afl_{body}"),
        }
    }

    /// The token itself: shown once, never stored.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// What the catalog stores for this token.
    pub fn hash(&self) -> String {
        Self::hash_of(&self.secret)
    }

    /// The hash the catalog stores for `secret`.
    pub fn hash_of(secret: &str) -> String {
        blake3::hash(secret.as_bytes()).to_hex().to_string()
    }
}

/// Who is calling: a token's name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's name: the user name in basic auth.
    pub name: String,
    pub role: Role,
}

/// How long known tokens are trusted before the catalog is asked again: a revoked token stops
/// working within this time, also when another process (the CLI) revoked it.
const REFRESH: Duration = Duration::from_secs(1);

/// Checks presented tokens against the catalog's hashes, re-reading them every [`REFRESH`].
pub struct Authenticator {
    catalog: Catalog,
    known: Mutex<Option<(Instant, HashMap<String, Identity>)>>,
}

impl Authenticator {
    /// An authenticator over the tokens in `catalog`; nothing is read until the first call.
    pub fn new(catalog: Catalog) -> Self {
        Self {
            catalog,
            known: Mutex::new(None),
        }
    }

    /// The identity of `secret`, or UNAUTHENTICATED.
    pub async fn verify(&self, secret: &str) -> Result<Identity> {
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
                let tokens = self.catalog.run(|c| c.tokens()).await?;
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
