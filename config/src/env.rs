//! `MESHGATE__SECTION__KEY=value` overrides. Names are lower-cased; `__` separates levels; a
//! number selects an element of an array of tables (`MESHGATE__AUTH__USERS__0__PASSWORD`).
//! The value is read as the type of the key it replaces (integer, boolean, array, string), so a
//! password `123` stays a string.

use toml::{Table, Value};

use crate::Errors;

const PREFIX: &str = "MESHGATE__";

/// Keys of a user table (or `auth.anonymous`) that hold lists and have no default value (for
/// users created by environment variables, and the deny lists).
const LIST_KEYS: [&str; 6] = [
    "tokens",
    "publish",
    "subscribe",
    "deny_publish",
    "deny_subscribe",
    "client_id_prefixes",
];

/// Keys the defaults do not have that are booleans (a user's `certificate`).
const BOOL_KEYS: [&str; 1] = ["certificate"];

/// Why a variable cannot be applied; the text is the config error's message (the variable's
/// name is added by [`Errors::push`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum EnvError {
    #[error("no key given")]
    NoKey,
    #[error("unknown key {0}")]
    UnknownKey(String),
    #[error("{path}: the list has {len} element(s); set index {len} first")]
    IndexGap { path: String, len: usize },
    /// The value does not fit the key it replaces.
    #[error("{path}: {problem}")]
    Value { path: String, problem: ValueError },
    /// A list for a key the defaults do not have (a user's `tokens`, say).
    #[error(transparent)]
    List(ValueError),
}

/// Why a value is not of the type of the key it replaces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum ValueError {
    #[error("not a TOML array: {0}")]
    NotTomlArray(String),
    #[error("not a TOML array")]
    NoArray,
    #[error("expected an integer, got `{0}`")]
    Integer(String),
    #[error("expected a number, got `{0}`")]
    Number(String),
    #[error("expected true or false, got `{0}`")]
    Boolean(String),
}

pub(crate) fn apply(
    table: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Errors,
) {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .collect();
    // Deterministic order: array elements are created in index order.
    vars.sort();
    for (var, value) in vars {
        let segments: Vec<String> = var[PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if segments.iter().any(String::is_empty) {
            errors.push(var, "empty key segment (use __ only between key names)");
            continue;
        }
        match set(table, &segments, &value) {
            Ok(path) => errors.env_paths.push((path, var)),
            Err(e) => errors.push(var, e.to_string()),
        }
    }
}

fn display_path(segments: &[String]) -> String {
    let mut out = String::new();
    for s in segments {
        if s.parse::<usize>().is_ok() {
            out.push_str(&format!("[{s}]"));
        } else {
            out = crate::join(&out, s);
        }
    }
    out
}

/// Sets the value at `segments`; returns the key path it set.
fn set(table: &mut Table, segments: &[String], raw: &str) -> Result<String, EnvError> {
    let path = display_path(segments);
    let mut root = Value::Table(std::mem::take(table));
    let result = set_in(&mut root, segments, raw, &path);
    if let Value::Table(t) = root {
        *table = t;
    }
    result.map(|()| path)
}

fn set_in(node: &mut Value, segments: &[String], raw: &str, path: &str) -> Result<(), EnvError> {
    let Some((seg, rest)) = segments.split_first() else {
        return Err(EnvError::NoKey);
    };
    let unknown = || EnvError::UnknownKey(path.to_owned());
    let child: &mut Value = match node {
        Value::Table(t) => {
            if rest.is_empty() {
                let new = match t.get(seg.as_str()) {
                    Some(existing) => typed(existing, raw).map_err(|problem| EnvError::Value {
                        path: path.to_owned(),
                        problem,
                    })?,
                    None if LIST_KEYS.contains(&seg.as_str()) => {
                        list(raw).map_err(EnvError::List)?
                    }
                    None if BOOL_KEYS.contains(&seg.as_str()) => typed(&Value::Boolean(false), raw)
                        .map_err(|problem| EnvError::Value {
                            path: path.to_owned(),
                            problem,
                        })?,
                    // Not in the defaults: a string; deserialization reports it if unknown.
                    None => Value::String(raw.to_owned()),
                };
                t.insert(seg.clone(), new);
                return Ok(());
            }
            if !t.contains_key(seg.as_str()) {
                if seg == "users" {
                    t.insert(seg.clone(), Value::Array(Vec::new()));
                } else {
                    return Err(unknown());
                }
            }
            t.get_mut(seg.as_str()).ok_or_else(unknown)?
        }
        Value::Array(items) => {
            let idx: usize = seg.parse().map_err(|_| unknown())?;
            if idx > items.len() {
                return Err(EnvError::IndexGap {
                    path: path.to_owned(),
                    len: items.len(),
                });
            }
            if idx == items.len() {
                items.push(Value::Table(Table::new()));
            }
            if rest.is_empty() {
                items[idx] = Value::String(raw.to_owned());
                return Ok(());
            }
            &mut items[idx]
        }
        _ => return Err(unknown()),
    };
    set_in(child, rest, raw, path)
}

fn list(raw: &str) -> Result<Value, ValueError> {
    let trimmed = raw.trim();
    if trimmed.starts_with('[') {
        let t: Table = format!("v = {trimmed}")
            .parse()
            .map_err(|e: toml::de::Error| ValueError::NotTomlArray(e.message().to_owned()))?;
        return t.get("v").cloned().ok_or(ValueError::NoArray);
    }
    Ok(Value::Array(
        trimmed
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.to_owned()))
            .collect(),
    ))
}

fn typed(existing: &Value, raw: &str) -> Result<Value, ValueError> {
    Ok(match existing {
        Value::Integer(_) => Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| ValueError::Integer(raw.to_owned()))?,
        ),
        Value::Float(_) => Value::Float(
            raw.trim()
                .parse()
                .map_err(|_| ValueError::Number(raw.to_owned()))?,
        ),
        Value::Boolean(_) => match raw.trim() {
            "true" => Value::Boolean(true),
            "false" => Value::Boolean(false),
            _ => return Err(ValueError::Boolean(raw.to_owned())),
        },
        Value::Array(_) => list(raw)?,
        _ => Value::String(raw.to_owned()),
    })
}
