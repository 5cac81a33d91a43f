//! meshgate-config: one TOML file over embedded defaults, then `MESHGATE__SECTION__KEY`
//! environment overrides, validated into the typed [`Config`].
//!
//! Every problem is reported at once, each with its key path (`http.max_body_size`,
//! `auth.users[1].publish[0]`) or the environment variable that caused it: unknown keys (all of
//! them, not just the first), wrong TOML types (one per section or list element), and values
//! that do not convert or violate a rule.

mod amqp;
mod check;
mod convert;
mod env;
mod iso8601;
pub mod model;
mod raw;
pub mod triggers;

use std::fmt;
use std::path::Path;

pub use convert::jwt_spec;
pub use model::*;
use serde::de::DeserializeOwned;
use toml::{Table, Value};
pub use triggers::{TriggerConfig, parse_trigger};

/// The embedded defaults; every key a file may set appears here.
pub const DEFAULTS_TOML: &str = include_str!("defaults.toml");

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path (`http.listen`), or the environment variable, or the file for file errors.
    pub path: String,
    pub message: String,
}

/// Every problem found, in the order found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}", e.path, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects errors while loading.
#[derive(Debug, Default)]
pub(crate) struct Errors {
    list: Vec<ConfigError>,
    /// Key path → environment variable that set it, to name the variable in messages.
    env_paths: Vec<(String, String)>,
}

impl Errors {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let path = match self.env_paths.iter().find(|(p, _)| *p == path) {
            Some((_, var)) => format!("{var} ({path})"),
            None => path,
        };
        self.list.push(ConfigError {
            path,
            message: message.into(),
        });
    }
}

impl Default for Config {
    fn default() -> Self {
        // The embedded defaults are valid; a test proves it.
        load_str("", "defaults", Vec::new()).unwrap_or_else(|e| panic!("embedded defaults: {e}"))
    }
}

/// Loads `path` (or only the defaults when `None`) and applies `env` overrides; only variables
/// starting with `MESHGATE__` are looked at.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    match path {
        None => load_str("", "defaults", env),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => load_str(&text, &p.display().to_string(), env),
            Err(e) => Err(ConfigErrors(vec![ConfigError {
                path: p.display().to_string(),
                message: format!("cannot read the config file: {e}"),
            }])),
        },
    }
}

/// Like [`load`], with the file's text given directly (`file_name` is used in messages).
pub fn load_str(
    toml_text: &str,
    file_name: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    let mut errors = Errors::default();
    let mut table: Table = match DEFAULTS_TOML.parse() {
        Ok(t) => t,
        Err(e) => {
            errors.push("defaults", e.to_string());
            return Err(ConfigErrors(errors.list));
        }
    };
    match toml_text.parse::<Table>() {
        Ok(file) => merge(&mut table, file),
        Err(e) => {
            let message = e.message().to_owned();
            let at = e
                .span()
                .map(|s| line_col(toml_text, s.start))
                .map(|(l, c)| format!(" (line {l}, column {c})"))
                .unwrap_or_default();
            errors.push(file_name, format!("not valid TOML{at}: {message}"));
            return Err(ConfigErrors(errors.list));
        }
    }
    env::apply(&mut table, env, &mut errors);
    let config = convert::convert(&table, &mut errors);
    if errors.list.is_empty() {
        config.ok_or(ConfigErrors(errors.list))
    } else {
        Err(ConfigErrors(errors.list))
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

/// Deep-merges `over` into `base`: tables merge key by key, anything else is replaced.
fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Deserializes `value` (found at `path`) into `T`, reporting unknown keys and a type error.
pub(crate) fn section<T: DeserializeOwned>(
    value: &Value,
    path: &str,
    errors: &mut Errors,
) -> Option<T> {
    let mut unknown = Vec::new();
    let de = value.clone();
    let result: Result<T, _> = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        de,
        &mut |p: serde_ignored::Path<'_>| unknown.push(p.to_string()),
    ));
    for key in unknown {
        errors.push(join(path, &key), "unknown key");
    }
    match result {
        Ok(t) => Some(t),
        Err(e) => {
            let inner = e.path().to_string();
            let at = if inner == "." {
                path.to_owned()
            } else {
                join(path, &inner)
            };
            errors.push(at, e.into_inner().message().to_owned());
            None
        }
    }
}

pub(crate) fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_owned()
    } else if key.starts_with('[') {
        format!("{base}{key}")
    } else {
        format!("{base}.{key}")
    }
}

#[cfg(test)]
mod tests;
