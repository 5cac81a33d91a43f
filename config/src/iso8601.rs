//! ISO 8601 durations as Knative's delivery options write them (`PT0.2S`, `PT10S`, `PT1M30S`,
//! `P1D`): `P[nD][T[nH][nM][n[.f]S]]`. Years and months are refused (their length depends on the
//! calendar, and Knative's own parser refuses them for these fields too); weeks (`P1W`) are
//! days × 7. Only the seconds may have a fraction. No crate is used for ~50 lines whose whole
//! input is an operator's config value; the tests below cover every branch.

use std::time::Duration;

/// Parses `text`; the error says what is wrong, for a config message.
pub fn parse(text: &str) -> Result<Duration, String> {
    let example = "write e.g. \"PT0.2S\", \"PT10S\", \"PT1M\"";
    let Some(rest) = text.strip_prefix('P') else {
        return Err(format!(
            "`{text}` is not an ISO 8601 duration (it starts with P); {example}"
        ));
    };
    let (date, time) = match rest.split_once('T') {
        Some((_, "")) => {
            return Err(format!("`{text}`: nothing after T; {example}"));
        }
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    if date.is_empty() && time.is_none() {
        return Err(format!("`{text}` is empty after P; {example}"));
    }
    let mut total = Duration::ZERO;
    for (number, unit) in components(date, text)? {
        let secs_per = match unit {
            'W' => 7 * 86_400,
            'D' => 86_400,
            'Y' | 'M' => {
                return Err(format!(
                    "`{text}`: years and months have no fixed length; use days (P30D)"
                ));
            }
            other => return Err(format!("`{text}`: `{other}` is not a date unit (D, W)")),
        };
        total = add(total, whole(number, text)?.checked_mul(secs_per), text)?;
    }
    if let Some(time) = time {
        for (number, unit) in components(time, text)? {
            let part = match unit {
                'H' => whole(number, text)?.checked_mul(3600),
                'M' => whole(number, text)?.checked_mul(60),
                'S' => Some(seconds(number, text)?),
                other => {
                    return Err(format!("`{text}`: `{other}` is not a time unit (H, M, S)"));
                }
            };
            total = add(total, part, text)?;
        }
    }
    Ok(total)
}

/// `total + part`, refused (not panicking, not saturating) when either is too large.
fn add(total: Duration, part: Option<Duration>, text: &str) -> Result<Duration, String> {
    part.and_then(|p| total.checked_add(p))
        .ok_or_else(|| format!("`{text}` is too long a duration"))
}

/// `12H30M` → [("12", 'H'), ("30", 'M')].
fn components<'a>(part: &'a str, text: &str) -> Result<Vec<(&'a str, char)>, String> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in part.char_indices() {
        if c.is_ascii_digit() || c == '.' || c == ',' {
            continue;
        }
        if i == start {
            return Err(format!("`{text}`: `{c}` has no number before it"));
        }
        out.push((&part[start..i], c));
        start = i + c.len_utf8();
    }
    if start != part.len() {
        return Err(format!(
            "`{text}`: `{}` has no unit after it",
            &part[start..]
        ));
    }
    Ok(out)
}

fn whole(number: &str, text: &str) -> Result<Duration, String> {
    number.parse::<u64>().map(Duration::from_secs).map_err(|_| {
        format!("`{text}`: `{number}` is not a whole number (only seconds take a fraction)")
    })
}

fn seconds(number: &str, text: &str) -> Result<Duration, String> {
    let number = number.replace(',', ".");
    match number.parse::<f64>() {
        Ok(s) if (0.0..1e12).contains(&s) && !number.starts_with('.') => {
            Ok(Duration::from_secs_f64(s))
        }
        _ => Err(format!("`{text}`: `{number}` is not a number of seconds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knative_examples() {
        assert_eq!(parse("PT0.2S"), Ok(Duration::from_millis(200)));
        assert_eq!(parse("PT10S"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("PT1M30S"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("PT1H"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("P1D"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("P1W"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse("P1DT1S"), Ok(Duration::from_secs(86_401)));
        assert_eq!(parse("PT0,5S"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("PT0S"), Ok(Duration::ZERO));
    }

    #[test]
    fn refusals_say_why() {
        for (text, says) in [
            ("10s", "starts with P"),
            ("P", "empty after P"),
            ("PT", "nothing after T"),
            ("P1M", "no fixed length"),
            ("P1Y", "no fixed length"),
            ("PT1.5M", "whole number"),
            ("PTS", "no number"),
            ("PT10", "no unit"),
            ("PT1X", "not a time unit"),
            ("P1H", "not a date unit"),
            ("PT.5S", "not a number of seconds"),
            ("PT1e3S", "not a time unit"),
            ("PT99999999999999999999H", "whole number"),
            ("P1DT18446744073709551615H", "too long"),
            ("PT18446744073709551615H1S", "too long"),
            ("P18446744073709551615W", "too long"),
            ("PT18446744073709551615S", "not a number of seconds"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
