//! `ce-` header values, shared by the bindings that carry attributes as headers (HTTP, NATS):
//! RFC 7230 quoted-string, then one round of percent-encoding (CE HTTP binding §3.1.3.2).

/// Why a `ce-` header value cannot be decoded. The text is the reason shown to the client
/// (after the header's name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderValueError {
    #[error("quoted string ends with a lone backslash")]
    LoneBackslash,
    #[error("unescaped `\"` inside a quoted string")]
    UnescapedQuote,
    #[error("`%` not followed by two hex digits")]
    BadPercent,
    #[error("not valid UTF-8 after percent-decoding")]
    NotUtf8,
}

/// A browser's request refused by [`check_origin`]. The text is the detail of the 403: it
/// names the origin and the setting that would allow it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("origin `{origin}` may not use this endpoint; add it to {key}")]
pub struct OriginRefused {
    /// The `Origin` header as sent (invalid UTF-8 replaced).
    pub origin: String,
    /// The setting that lists the allowed origins (`http.allowed_origins`, …).
    pub key: String,
}

/// Undoes RFC 7230 quoted-string quoting, if the value is quoted.
fn unquote(raw: &[u8]) -> Result<Vec<u8>, HeaderValueError> {
    if raw.len() < 2 || raw[0] != b'"' || raw[raw.len() - 1] != b'"' {
        return Ok(raw.to_vec());
    }
    let inner = &raw[1..raw.len() - 1];
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&escaped) => out.push(escaped),
                None => return Err(HeaderValueError::LoneBackslash),
            },
            b'"' => return Err(HeaderValueError::UnescapedQuote),
            b => out.push(b),
        }
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes a `ce-` header value: quoted-string first, then exactly one round of
/// percent-decoding (lowercase hex accepted, `+` stays `+`), then strict UTF-8.
pub fn decode_header_value(raw: &[u8]) -> Result<String, HeaderValueError> {
    let unquoted = unquote(raw)?;
    let mut out = Vec::with_capacity(unquoted.len());
    let mut i = 0;
    while i < unquoted.len() {
        if unquoted[i] == b'%' {
            let decoded = unquoted
                .get(i + 1..i + 3)
                .and_then(|h| Some(hex(h[0])? << 4 | hex(h[1])?));
            match decoded {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => return Err(HeaderValueError::BadPercent),
            }
        }
        out.push(unquoted[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| HeaderValueError::NotUtf8)
}

/// Encodes a header value per §3.1.3.2: space, `"`, `%` and everything outside U+0021–U+007E
/// become UTF-8 `%XY` (uppercase); nothing else is encoded.
pub fn percent_encode_header(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == ' ' || c == '"' || c == '%' || !('\u{21}'..='\u{7e}').contains(&c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `host[:port]` with the scheme's default port removed, lower-case.
fn authority_without_default_port(scheme: &str, authority: &str) -> String {
    let a = authority.to_ascii_lowercase();
    let default = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return a,
    };
    match a.strip_suffix(default) {
        Some(stripped) => stripped.to_owned(),
        None => a,
    }
}

/// The `Origin` rule of the web listener (against cross-site WebSocket hijacking and
/// cross-site form posts), as the NATS server's websocket `same_origin`/`allowed_origins`:
/// a request without `Origin` is not from a browser (devices, CLI tools) and passes; a
/// browser's must name the request's own `Host` (default ports ignored) or be one of
/// `allowed` (lower-case `scheme://host[:port]`, or `*` for any). `key` names the setting in
/// the refusal.
pub fn check_origin(
    origin: Option<&[u8]>,
    host: Option<&[u8]>,
    allowed: &[String],
    key: &str,
) -> Result<(), OriginRefused> {
    let Some(origin) = origin else {
        return Ok(());
    };
    if allowed.iter().any(|a| a == "*") {
        return Ok(());
    }
    let refused = || OriginRefused {
        origin: String::from_utf8_lossy(origin).into_owned(),
        key: key.to_owned(),
    };
    let origin = std::str::from_utf8(origin).map_err(|_| refused())?.trim();
    let lower = origin.trim_end_matches('/').to_ascii_lowercase();
    if allowed.contains(&lower) {
        return Ok(());
    }
    // Same origin: the page was served by this host (`null` and the like never are).
    let Some((scheme, authority)) = lower.split_once("://") else {
        return Err(refused());
    };
    match host.and_then(|h| std::str::from_utf8(h).ok()) {
        Some(host)
            if authority_without_default_port(scheme, authority)
                == authority_without_default_port(scheme, host.trim()) =>
        {
            Ok(())
        }
        _ => Err(refused()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_rule() {
        let check = |origin: Option<&str>, host: Option<&str>, allowed: &[&str]| {
            let allowed: Vec<String> = allowed.iter().map(|s| (*s).to_owned()).collect();
            check_origin(
                origin.map(str::as_bytes),
                host.map(str::as_bytes),
                &allowed,
                "x.allowed_origins",
            )
        };
        let host = Some("gw.example:8080");
        assert!(check(None, host, &[]).is_ok(), "no Origin: not a browser");
        assert!(check(Some("http://gw.example:8080"), host, &[]).is_ok());
        assert!(check(Some("https://gw.example"), Some("GW.example:443"), &[]).is_ok());
        assert!(
            check(Some("http://gw.example:8080"), None, &[]).is_err(),
            "no Host"
        );
        assert!(check(Some("null"), host, &[]).is_err());
        assert!(
            check(Some("http://gw.example:80"), host, &[]).is_err(),
            "other port"
        );
        assert!(check(Some("https://a.example"), host, &["https://a.example"]).is_ok());
        assert!(check(Some("https://b.example"), host, &["*"]).is_ok());
        let err = check(Some("https://b.example"), host, &["https://a.example"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`https://b.example`") && err.contains("x.allowed_origins"),
            "{err}"
        );
        assert!(check(Some("\u{e9}"), host, &[]).is_err());
    }
}
