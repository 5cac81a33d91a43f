//! Checks of the CloudEvents type system (spec.md, "Type System" and "Naming Conventions") that
//! the Rust SDK does not perform. Each returns an [`EventError`] naming the attribute.

use crate::event_error::EventError;

/// The `type` prefix of meshgate's own events: WebSocket control events, the wrappings of plain
/// messages (`io.meshgate.mqtt.message`, ...), `$SYS` events.
pub const RESERVED_TYPE_PREFIX: &str = "io.meshgate.";

/// A CloudEvent a client sent (not one meshgate made from a plain message): its type may not be
/// one of meshgate's own, which subscribers read as the gateway's word (a browser's
/// `io.meshgate.error`, a device's `$SYS` event). Checked by every ingress binding.
pub fn client_event(event: &crate::event::Event) -> Result<(), EventError> {
    if event.ty().starts_with(RESERVED_TYPE_PREFIX) {
        return Err(EventError::InvalidValue {
            name: "type".to_owned(),
            reason: format!(
                "`{}`: types starting with `{RESERVED_TYPE_PREFIX}` are reserved for meshgate's own events",
                event.ty()
            ),
        });
    }
    Ok(())
}

/// Attribute names: `[a-z0-9]+`, not `data` (CE-BINDINGS.md §1). The SHOULD rules (start with a
/// letter, at most 20 characters) are not enforced: a receiver must accept what the MUSTs allow.
pub fn attribute_name(name: &str) -> Result<(), EventError> {
    let invalid = |reason| {
        Err(EventError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return invalid("only lower-case letters a-z and digits 0-9 are allowed");
    }
    if name == "data" {
        return invalid("`data` is reserved");
    }
    Ok(())
}

/// Is `c` forbidden in a CloudEvents String? (C0/C1 controls, DEL, noncharacters; unpaired
/// surrogates cannot occur in a Rust `str`.)
pub fn is_forbidden_char(c: char) -> bool {
    let u = c as u32;
    u <= 0x1F
        || (0x7F..=0x9F).contains(&u)
        || (0xFDD0..=0xFDEF).contains(&u)
        || (u & 0xFFFE) == 0xFFFE
}

/// A CloudEvents String value.
pub fn string(name: &str, value: &str) -> Result<(), EventError> {
    // ASCII (nearly every attribute): only the C0 controls and DEL can be forbidden.
    if value.bytes().all(|b| (0x20..0x7F).contains(&b)) {
        return Ok(());
    }
    if let Some(c) = value.chars().find(|c| is_forbidden_char(*c)) {
        return Err(EventError::invalid(
            name,
            format!("contains the forbidden character U+{:04X}", c as u32),
        ));
    }
    Ok(())
}

pub fn non_empty_string(name: &str, value: &str) -> Result<(), EventError> {
    if value.is_empty() {
        return Err(EventError::invalid(name, "must not be empty"));
    }
    string(name, value)
}

/// The bytes a URI-reference holds as they are: RFC 3986's unreserved characters, gen-delims
/// and sub-delims (`%` starts an escape and is checked apart). A table: every event's `source`
/// goes through here, and searching the punctuation list for each byte was a tenth of decoding.
const URI_CHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let punctuation = b"-._~:/?#[]@!$&'()*+,;=";
    let mut i = 0;
    while i < punctuation.len() {
        table[punctuation[i] as usize] = true;
        i += 1;
    }
    table
};

/// Characters RFC 3986 allows in a URI-reference outside percent-escapes.
fn is_uri_char(b: u8) -> bool {
    URI_CHAR[usize::from(b)]
}

fn uri_chars(name: &str, value: &str) -> Result<(), EventError> {
    let bytes = value.as_bytes();
    if bytes.iter().fold(true, |ok, &b| ok & is_uri_char(b)) {
        return Ok(());
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let ok = bytes.len() >= i + 3
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit();
            if !ok {
                return Err(EventError::invalid(
                    name,
                    "has a `%` that does not start a %XX escape",
                ));
            }
            i += 3;
            continue;
        }
        if !is_uri_char(b) {
            let c = value[i..].chars().next().unwrap_or('?');
            return Err(EventError::invalid(
                name,
                format!("is not a URI-reference: {c:?} must be percent-encoded"),
            ));
        }
        i += 1;
    }
    Ok(())
}

/// A non-empty URI-reference (RFC 3986 §4.1), e.g. `/a/b`, `urn:x`, `1-555-123-4567`.
pub fn uri_reference(name: &str, value: &str) -> Result<(), EventError> {
    if value.is_empty() {
        return Err(EventError::invalid(name, "must not be empty"));
    }
    uri_chars(name, value)
}

/// An absolute URI (RFC 3986 §4.3): a scheme, `:`, then the rest.
pub fn absolute_uri(name: &str, value: &str) -> Result<(), EventError> {
    uri_reference(name, value)?;
    let scheme_ok = value.split_once(':').is_some_and(|(scheme, _)| {
        let mut chars = scheme.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    if !scheme_ok || value.contains('#') {
        return Err(EventError::invalid(
            name,
            "must be an absolute URI with a scheme (e.g. https://example.com/schema) and no fragment",
        ));
    }
    Ok(())
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An RFC 2046 media type: `type/subtype` followed by optional `; name=value` parameters.
pub fn media_type(name: &str, value: &str) -> Result<(), EventError> {
    string(name, value)?;
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or("").trim();
    let valid_essence = essence
        .split_once('/')
        .is_some_and(|(t, s)| is_token(t) && is_token(s));
    if !valid_essence {
        return Err(EventError::invalid(
            name,
            format!("`{value}` is not a media type (expected type/subtype)"),
        ));
    }
    for param in parts {
        let param = param.trim();
        if param.is_empty() {
            continue;
        }
        let ok = param
            .split_once('=')
            .is_some_and(|(k, v)| is_token(k.trim()) && !v.trim().is_empty());
        if !ok {
            return Err(EventError::invalid(
                name,
                format!("media type parameter `{param}` is not name=value"),
            ));
        }
    }
    Ok(())
}

fn digits(s: &[u8]) -> Option<u32> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0')))
}

/// An RFC 3339 `date-time`: `YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)`, `T` and `Z` in either case.
pub fn timestamp(name: &str, value: &str) -> Result<(), EventError> {
    let err = || {
        EventError::invalid(
            name,
            format!("`{value}` is not an RFC 3339 timestamp (e.g. 2026-11-22T15:04:05Z)"),
        )
    };
    let b = value.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return Err(err());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(err());
    }
    let year = digits(&b[0..4]).ok_or_else(err)?;
    let month = digits(&b[5..7]).ok_or_else(err)?;
    let day = digits(&b[8..10]).ok_or_else(err)?;
    let hour = digits(&b[11..13]).ok_or_else(err)?;
    let minute = digits(&b[14..16]).ok_or_else(err)?;
    let second = digits(&b[17..19]).ok_or_else(err)?;
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(err()),
    };
    if day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return Err(err());
    }
    let mut rest = &b[19..];
    if rest.first() == Some(&b'.') {
        let n = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return Err(err());
        }
        rest = &rest[1 + n..];
    }
    match rest {
        [b'Z' | b'z'] => Ok(()),
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            let h = digits(&[*h1, *h2]).ok_or_else(err)?;
            let m = digits(&[*m1, *m2]).ok_or_else(err)?;
            if h > 23 || m > 59 {
                return Err(err());
            }
            Ok(())
        }
        _ => Err(err()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        for ok in [
            "2026-11-22T15:04:05Z",
            "2024-02-29t00:00:00.123456789+05:30",
            "1985-04-12T23:20:50.52z",
            "1990-12-31T23:59:60-00:00",
        ] {
            assert!(timestamp("time", ok).is_ok(), "{ok}");
        }
        for bad in [
            "2023-02-29T00:00:00Z",
            "2026-11-22 15:04:05Z",
            "2026-11-22T15:04:05",
            "2026-11-22T15:04:05.Z",
            "2026-13-01T00:00:00Z",
            "2026-11-22T15:04:05+0100",
            "yesterday",
        ] {
            assert!(timestamp("time", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn strings_reject_controls_and_noncharacters() {
        assert!(string("s", "Euro € 😀").is_ok());
        for bad in [
            "a\nb",
            "\u{7f}",
            "\u{85}",
            "\u{fdd0}",
            "\u{fffe}",
            "\u{1ffff}",
        ] {
            assert!(string("s", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uris_and_media_types() {
        assert!(uri_reference("source", "https://ex.com/a?b=c&d=e#f").is_ok());
        assert!(uri_reference("source", "/a/b%20c").is_ok());
        assert!(uri_reference("source", "a b").is_err());
        assert!(uri_reference("source", "100%").is_err());
        assert!(absolute_uri("dataschema", "https://ex.com/s.json").is_ok());
        assert!(absolute_uri("dataschema", "/relative").is_err());
        assert!(media_type("ct", "application/json; charset=utf-8").is_ok());
        assert!(media_type("ct", "Application/CloudEvents+JSON").is_ok());
        assert!(media_type("ct", "json").is_err());
        assert!(media_type("ct", "text/plain; charset").is_err());
    }
}
