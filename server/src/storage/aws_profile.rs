//! AWS shared profiles (`~/.aws/credentials`, `~/.aws/config`), which object_store does not read.
//!
//! The environment wins: a profile only fills what `AWS_*` variables leave unset, as the AWS CLI
//! does. Without either, object_store goes on to its own chain (web identity, instance metadata).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a profile sets.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Profile {
    pub(crate) access_key_id: Option<String>,
    pub(crate) secret_access_key: Option<String>,
    pub(crate) session_token: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) endpoint_url: Option<String>,
}

/// The profile named by `AWS_PROFILE` (else `default`), from the files the AWS variables name
/// (else under `~/.aws`). `None` when no file has it.
pub(crate) fn from_env() -> Option<Profile> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let home = var("HOME").map(PathBuf::from);
    let credentials = var("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".aws/credentials")));
    let config = var("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".aws/config")));
    let named = var("AWS_PROFILE");
    let name = named.clone().unwrap_or_else(|| "default".into());
    let profile = load(credentials.as_deref(), config.as_deref(), &name);
    if profile.is_none() && named.is_some() {
        // The AWS CLI fails here; object_store would go on to other credentials unasked.
        tracing::warn!(profile = %name, "AWS_PROFILE names a profile that no AWS file has");
    }
    if let Some(p) = &profile
        && p.access_key_id.is_none()
        && named.is_some()
    {
        tracing::warn!(
            profile = %name,
            "the profile has no static keys (role_arn, sso and credential_process are not read)"
        );
    }
    profile
}

/// Reads profile `name` from a credentials file and a config file (where it is `[profile NAME]`,
/// or `[default]`).
pub(crate) fn load(
    credentials: Option<&Path>,
    config: Option<&Path>,
    name: &str,
) -> Option<Profile> {
    let read = |p: Option<&Path>| p.and_then(|p| std::fs::read_to_string(p).ok());
    let creds = read(credentials).map(|text| sections(&text));
    let conf = read(config).map(|text| sections(&text));
    let from_creds = creds.as_ref().and_then(|s| s.get(name));
    let config_name = if name == "default" {
        "default".to_string()
    } else {
        format!("profile {name}")
    };
    // `[profile default]` is accepted for the default profile too, as the AWS CLI does.
    let from_conf = conf.as_ref().and_then(|s| {
        s.get(&config_name)
            .or_else(|| s.get(&format!("profile {name}")))
    });
    if from_creds.is_none() && from_conf.is_none() {
        return None;
    }
    let get = |key: &str| {
        from_creds
            .and_then(|s| s.get(key))
            .or_else(|| from_conf.and_then(|s| s.get(key)))
            .cloned()
    };
    Some(Profile {
        access_key_id: get("aws_access_key_id"),
        secret_access_key: get("aws_secret_access_key"),
        session_token: get("aws_session_token"),
        region: get("region"),
        endpoint_url: get("endpoint_url"),
    })
}

type Sections = HashMap<String, HashMap<String, String>>;

/// An INI file's sections: `[name]` headers, `key = value` lines, `#` and `;` comments.
fn sections(text: &str) -> Sections {
    let mut out = Sections::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let header = header.split_whitespace().collect::<Vec<_>>().join(" ");
            out.entry(header.clone()).or_default();
            current = Some(header);
            continue;
        }
        if let (Some(section), Some((key, value))) = (&current, line.split_once('='))
            && let Some(entries) = out.get_mut(section)
        {
            entries.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_from_both_files() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let creds = dir.path().join("credentials");
        let config = dir.path().join("config");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key=sdefault\n\n\
             # a comment\n[lab]\naws_access_key_id = AKLAB\naws_secret_access_key = slab\n\
             aws_session_token = tlab\n",
        )?;
        std::fs::write(
            &config,
            "[default]\nregion = eu-west-1\n[profile  lab]\nregion = us-east-2\n\
             endpoint_url = http://127.0.0.1:9000\n",
        )?;
        let lab = load(Some(&creds), Some(&config), "lab");
        assert_eq!(
            lab,
            Some(Profile {
                access_key_id: Some("AKLAB".into()),
                secret_access_key: Some("slab".into()),
                session_token: Some("tlab".into()),
                region: Some("us-east-2".into()),
                endpoint_url: Some("http://127.0.0.1:9000".into()),
            })
        );
        let default = load(Some(&creds), Some(&config), "default").unwrap_or_default();
        assert_eq!(default.access_key_id.as_deref(), Some("AKDEFAULT"));
        assert_eq!(default.region.as_deref(), Some("eu-west-1"));
        assert_eq!(load(Some(&creds), Some(&config), "nope"), None);
        assert_eq!(load(None, None, "default"), None);
        Ok(())
    }
}
