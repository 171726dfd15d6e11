//! Bearer tokens: what `artiflight token create` makes and what the catalog keeps (a hash, never
//! the token). Checking a presented token is the service's (`service::auth`).
//!
//! Tokens are 256 random bits, so a fast hash is as strong as a slow one here: nobody can guess
//! their way to a preimage, and hashing every request with BLAKE3 costs nanoseconds. The catalog
//! only ever sees the hash, so a copy of `catalog.sqlite` lets nobody in.
//!
//! ```
//! use artiflight_server::token::Token;
//! use artiflight_server::catalog::Role;
//! let token = Token::generate();
//! assert!(token.secret().starts_with("afl_"));
//! assert_eq!(Token::hash_of(token.secret()), token.hash());
//! assert!(Role::Write.allows(Role::Read) && !Role::Read.allows(Role::Write));
//! ```

use rand::Rng;

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
