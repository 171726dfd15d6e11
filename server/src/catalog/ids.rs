//! What both catalog stores issue the same way: uids, versions, times, token names.

use rand::Rng;

use crate::error::{Error, Result};

/// Now, as records keep times: UTC, RFC 3339, milliseconds.
pub(super) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Milliseconds since the Unix epoch (0 before it), as the servers table keeps time.
pub(super) fn unix_millis(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A new 16-character base62 stem, shared by all versions of a key.
pub(super) fn new_stem() -> String {
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..16)
        .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
        .collect()
}

/// A version's uid: the stem, then the 4-digit counter (`0000` for version 1).
pub(super) fn uid(stem: &str, counter: u32) -> String {
    format!("{stem}{counter:04}")
}

/// The stem and number of the next version of `key`, from its newest record (`latest`, as
/// `(uid, version)`) and the highest version ever issued for it (`issued`, as `(stem,
/// version)`): versions only grow, past deleted ones too, so a uid is never issued twice.
pub(super) fn next_version(
    key: &str,
    latest: Option<(String, u32)>,
    issued: Option<(String, u32)>,
) -> Result<(String, u32)> {
    let latest = latest.map(|(uid, v)| (uid.get(..16).unwrap_or(&uid).to_string(), v));
    let (stem, last) = match (latest, issued) {
        (Some(a), Some(b)) => {
            if a.1 >= b.1 {
                a
            } else {
                b
            }
        }
        (Some(one), None) | (None, Some(one)) => one,
        (None, None) => (new_stem(), 0),
    };
    let version = last
        .checked_add(1)
        .ok_or_else(|| Error::invalid(format!("'{key}' has no versions left")))?;
    Ok((stem, version))
}

/// Token names are the user name of basic auth: printable, no ':', at most 128 characters.
pub(super) fn check_token_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control() || c == ':') {
        return Err(Error::invalid(format!(
            "invalid token name {name:?}: expected 1 to 128 printable characters without ':'"
        )));
    }
    Ok(())
}
