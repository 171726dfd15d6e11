//! The JSON command a client sends in a Flight descriptor (docs/PROTOCOL.md section 3).

use serde::{Deserialize, Serialize};

use crate::catalog::RecordFilter;
use crate::error::{Error, Result};

pub use crate::formats::Layout;

/// What to read: an artifact, collection or query set, optionally one element, filtered,
/// projected and limited.
///
/// ```
/// use artiflight_server::query::Command;
/// let cmd = Command::from_json(br#"{"key": "sharded_parquet", "filter": "louvain = 3", "limit": 5}"#).unwrap();
/// assert_eq!(cmd.key.as_deref(), Some("sharded_parquet"));
/// assert!(Command::from_json(br#"{"key": "x", "colums": ["a"]}"#).is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A uid, to read a version other than the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// A record filter: the union of every matching artifact, in key order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<RecordFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub element: Vec<String>,
    /// A SQL boolean expression (DataFusion's dialect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub var_filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub var_names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obs_range: Option<[u64; 2]>,
    /// Rows of `obs` by position: half-open `[start, stop)` ranges, ascending and apart, so a
    /// mask computed on the client travels as its runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obs_ranges: Option<Vec<[u64; 2]>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
}

impl Command {
    /// Parses and validates a command descriptor's bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Error::invalid(format!("command is not UTF-8: {e}")))?;
        let command: Command = serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("invalid command JSON: {e}")))?;
        command.validate()?;
        Ok(command)
    }

    /// A command for a path descriptor: `[KEY, element...]`.
    pub fn from_path(path: &[String]) -> Result<Self> {
        let (key, element) = path
            .split_first()
            .ok_or_else(|| Error::invalid("empty path descriptor: expected [KEY, ...]"))?;
        let command = Command {
            key: Some(key.clone()),
            element: element.to_vec(),
            ..Default::default()
        };
        command.validate()?;
        Ok(command)
    }

    fn validate(&self) -> Result<()> {
        match (&self.key, &self.query) {
            (Some(_), Some(_)) => Err(Error::invalid(
                "a command takes either 'key' or 'query', not both",
            )),
            (None, None) => Err(Error::invalid("a command needs 'key' or 'query'")),
            (None, Some(_)) if self.version.is_some() => {
                Err(Error::invalid("'version' needs 'key', not 'query'"))
            }
            (Some(key), None) if key.is_empty() => Err(Error::invalid("'key' is empty")),
            _ => Ok(()),
        }?;
        if let Some([start, stop]) = self.obs_range
            && start > stop
        {
            return Err(Error::invalid(format!(
                "obs_range [{start}, {stop}) is empty or reversed"
            )));
        }
        if let Some(ranges) = &self.obs_ranges {
            check_ranges(ranges)?;
        }
        Ok(())
    }

    /// The command as compact JSON, for tickets.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The part of the command that formats see: the element and its selection.
    pub fn request(&self) -> crate::formats::ReadRequest {
        crate::formats::ReadRequest {
            element: self.element.clone(),
            filter: self.filter.clone(),
            columns: self.columns.clone(),
            var_filter: self.var_filter.clone(),
            var_names: self.var_names.clone(),
            obs_range: self.obs_range,
            obs_ranges: self.obs_ranges.clone(),
            layout: self.layout,
        }
    }
}

/// `obs_ranges` must be non-empty ranges in ascending order that do not overlap, so that the
/// server never sorts or merges them (runs that touch are accepted).
fn check_ranges(ranges: &[[u64; 2]]) -> Result<()> {
    let mut end = None;
    for (i, &[start, stop]) in ranges.iter().enumerate() {
        if start >= stop {
            return Err(Error::invalid(format!(
                "obs_ranges[{i}] [{start}, {stop}) is empty or reversed"
            )));
        }
        if end.is_some_and(|end| start < end) {
            return Err(Error::invalid(format!(
                "obs_ranges[{i}] [{start}, {stop}) starts before the range before it ends: \
                 ranges must be ascending and must not overlap"
            )));
        }
        end = Some(stop);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_it_does_not_know() {
        for bad in [
            &b"{}"[..],
            b"[]",
            b"null",
            b"{\"key\": 3}",
            b"{\"key\": \"a\", \"limit\": -1}",
            b"{\"key\": \"a\", \"query\": {}}",
            b"{\"key\": \"a\", \"unknown\": 1}",
            b"{\"query\": {\"nope\": 1}}",
            b"\xff\xfe",
            b"{\"key\": \"a\", \"obs_ranges\": [[3, 3]]}",
            b"{\"key\": \"a\", \"obs_ranges\": [[5, 9], [2, 4]]}",
            b"{\"key\": \"a\", \"obs_ranges\": [[0, 5], [4, 6]]}",
            b"{\"key\": \"a\", \"obs_ranges\": [[0, 4, 6]]}",
        ] {
            assert!(
                Command::from_json(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn round_trips() -> Result<()> {
        let cmd = Command::from_json(br#"{"key":"a","filter":"x > 1","columns":["x"],"limit":3}"#)?;
        assert_eq!(Command::from_json(cmd.to_json().as_bytes())?, cmd);
        Ok(())
    }
}
