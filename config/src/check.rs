//! Checked conversions of single values (durations, counts, sizes) that every section's
//! converter uses: [`crate::convert`] and [`crate::amqp`] both depend on this file, and it on
//! neither of them.

use std::time::Duration;

use crate::Errors;

pub(crate) fn duration(v: &str, path: &str, errors: &mut Errors) -> Duration {
    match humantime::parse_duration(v.trim()) {
        Ok(d) => d,
        Err(e) => {
            errors.push(
                path,
                format!("`{v}` is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"1m\""),
            );
            Duration::ZERO
        }
    }
}

pub(crate) fn positive(v: i64, path: &str, errors: &mut Errors) -> usize {
    if v <= 0 {
        errors.push(path, format!("must be at least 1, got {v}"));
        return 1;
    }
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Why a size setting is not a size; the text is the config error's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SizeError {
    #[error("`{0}` is not a size; write e.g. 65536, \"64KiB\", \"1MiB\", \"1MB\"")]
    NotASize(String),
    #[error("unknown size unit `{unit}` in `{text}`; use B, KiB, MiB, GiB, kB, MB or GB")]
    UnknownUnit { unit: String, text: String },
    #[error("`{0}` is too large")]
    TooLarge(String),
    /// A TOML integer below zero.
    #[error("{0} is negative")]
    Negative(i64),
}

/// Parses "64KiB", "1 MiB", "512kB", "1048576", "10B".
pub(crate) fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::NotASize(text.to_owned()))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(SizeError::UnknownUnit {
                unit: other.to_owned(),
                text: text.to_owned(),
            });
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| SizeError::TooLarge(text.to_owned()))
}
