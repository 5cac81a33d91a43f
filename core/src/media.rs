//! Media-type tests used by every binding. Type, subtype and parameter names compare
//! case-insensitively (CE-BINDINGS.md §1).

/// The `type/subtype` part of a media type, trimmed and lower-cased.
pub fn essence(media_type: &str) -> String {
    media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// `*/json` or `*/*+json` (JSON format §3.1).
pub fn is_json(media_type: &str) -> bool {
    let e = essence(media_type);
    match e.split_once('/') {
        Some((_, sub)) => sub == "json" || sub.ends_with("+json"),
        None => false,
    }
}

/// Media types whose bytes are text, written as a JSON string rather than Base64.
pub fn is_text(media_type: &str) -> bool {
    let e = essence(media_type);
    e.starts_with("text/")
        || e == "application/xml"
        || e.ends_with("+xml")
        || e == "application/javascript"
        || e == "application/x-www-form-urlencoded"
}

/// Structured mode: the media type starts with `application/cloudevents` (any case).
pub fn is_cloudevents(media_type: &str) -> bool {
    media_type
        .trim_start()
        .get(..23)
        .is_some_and(|p| p.eq_ignore_ascii_case("application/cloudevents"))
}

/// Batch mode: `application/cloudevents-batch` (check this before [`is_cloudevents`]).
pub fn is_cloudevents_batch(media_type: &str) -> bool {
    media_type
        .trim_start()
        .get(..29)
        .is_some_and(|p| p.eq_ignore_ascii_case("application/cloudevents-batch"))
}

/// The structured format named by a CloudEvents media type: `json` for
/// `application/cloudevents+json`, `None` when no `+format` suffix is given.
pub fn cloudevents_format(media_type: &str) -> Option<String> {
    let e = essence(media_type);
    e.split_once('+').map(|(_, f)| f.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        assert!(is_cloudevents(
            "Application/CloudEvents+JSON; charset=utf-8"
        ));
        assert!(is_cloudevents_batch("application/cloudevents-batch+json"));
        assert!(!is_cloudevents_batch("application/cloudevents+json"));
        assert!(is_json("application/vnd.x+json"));
        assert!(is_json("TEXT/JSON; charset=utf-8"));
        assert!(!is_json("application/jsonx"));
        assert!(is_text("text/plain"));
        assert_eq!(
            cloudevents_format("application/cloudevents+avro").as_deref(),
            Some("avro")
        );
    }
}
