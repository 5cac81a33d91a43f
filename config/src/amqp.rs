//! The `[amqp]` section: RabbitMQ connection settings, `[[amqp.sources]]` and `[[amqp.sinks]]`.

use std::collections::BTreeSet;

use meshgate_core::{Topic, TopicFilter, validate};

use crate::check::{SizeError, duration, parse_size, positive};
use crate::model::{AmqpConfig, AmqpMode, AmqpSinkConfig, AmqpSourceConfig};
use crate::{Errors, raw, section};

/// AMQP 0.9.1 short strings (queue, exchange and routing key names) hold at most 255 bytes.
const MAX_SHORT_STRING: usize = 255;

/// Placeholders a sink's `routing_key` template may use.
pub const ROUTING_KEY_PLACEHOLDERS: [&str; 2] = ["{topic}", "{type}"];

fn url(v: &str, errors: &mut Errors) {
    let path = "amqp.url";
    let Some((scheme, rest)) = v.split_once("://") else {
        errors.push(
            path,
            format!("`{v}` is not a broker URL like \"amqp://127.0.0.1:5672\""),
        );
        return;
    };
    if scheme != "amqp" && scheme != "amqps" {
        errors.push(
            path,
            format!("`{v}`: the scheme must be amqp:// or amqps:// (TLS)"),
        );
    }
    if rest.contains('@') {
        errors.push(
            path,
            "credentials do not go in the URL: set amqp.user and amqp.password",
        );
    } else if rest.contains(['/', '?', '#']) {
        errors.push(
            path,
            "the URL is only scheme://host:port: set the virtual host with amqp.vhost",
        );
    } else if rest.is_empty() || rest.starts_with(':') || rest.contains(char::is_whitespace) {
        errors.push(
            path,
            format!("`{v}` is not a broker URL like \"amqp://127.0.0.1:5672\""),
        );
    } else if let Some((_, port)) = rest.rsplit_once(':')
        && !rest.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        errors.push(path, format!("`{port}` is not a port number"));
    }
}

/// A name for logs, metrics and connection names.
fn name(v: &str, path: &str, seen: &mut BTreeSet<String>, errors: &mut Errors) {
    if v.is_empty()
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        errors.push(
            path,
            format!("`{v}` is not a name: letters, digits, `-`, `_` and `.` only"),
        );
    }
    if !seen.insert(v.to_owned()) {
        errors.push(path, format!("`{v}` is used by another source or sink"));
    }
}

fn short_string(v: &str, path: &str, errors: &mut Errors) {
    if v.len() > MAX_SHORT_STRING {
        errors.push(
            path,
            format!(
                "{} bytes; AMQP names hold at most {MAX_SHORT_STRING}",
                v.len()
            ),
        );
    }
}

fn source(
    s: raw::AmqpSource,
    path: &str,
    seen: &mut BTreeSet<String>,
    errors: &mut Errors,
) -> AmqpSourceConfig {
    name(&s.name, &format!("{path}.name"), seen, errors);
    let exchange = (!s.exchange.is_empty()).then_some(s.exchange);
    let queue = match (s.queue.is_empty(), &exchange) {
        (false, _) => s.queue,
        (true, Some(_)) => format!("meshgate.{}", s.name),
        (true, None) => {
            errors.push(
                format!("{path}.queue"),
                "set `queue` (an existing queue to consume) or `exchange` + `binding_keys` (meshgate declares and binds a queue)",
            );
            String::new()
        }
    };
    short_string(&queue, &format!("{path}.queue"), errors);
    if let Some(x) = &exchange {
        short_string(x, &format!("{path}.exchange"), errors);
        if s.binding_keys.is_empty() {
            errors.push(
                format!("{path}.binding_keys"),
                "at least one binding key when `exchange` is set, e.g. [\"#\"]",
            );
        }
    } else if !s.binding_keys.is_empty() {
        errors.push(
            format!("{path}.binding_keys"),
            "binding keys need `exchange`: the exchange to bind the queue to",
        );
    }
    for (i, k) in s.binding_keys.iter().enumerate() {
        short_string(k, &format!("{path}.binding_keys[{i}]"), errors);
    }
    let topic_prefix = (!s.topic_prefix.is_empty()).then_some(s.topic_prefix);
    if let Some(p) = &topic_prefix
        && let Err(e) = Topic::from_mqtt(p)
    {
        errors.push(format!("{path}.topic_prefix"), e.to_string());
    }
    let prefetch = positive(s.prefetch, &format!("{path}.prefetch"), errors);
    let prefetch = u16::try_from(prefetch).unwrap_or_else(|_| {
        errors.push(format!("{path}.prefetch"), "must be at most 65535");
        u16::MAX
    });
    let wrap_source = if s.wrap_source.is_empty() {
        format!("/meshgate/amqp/{}", s.name)
    } else {
        s.wrap_source
    };
    if let Err(e) = validate::uri_reference("source", &wrap_source) {
        errors.push(format!("{path}.wrap_source"), e.to_string());
    }
    if let Err(e) = validate::non_empty_string("type", &s.wrap_type) {
        errors.push(format!("{path}.wrap_type"), e.to_string());
    }
    AmqpSourceConfig {
        name: s.name,
        queue,
        exchange,
        binding_keys: s.binding_keys,
        topic_prefix,
        prefetch,
        wrap_source,
        wrap_type: s.wrap_type,
        user: (!s.user.is_empty()).then_some(s.user),
    }
}

fn routing_key_template(v: &str, path: &str, errors: &mut Errors) {
    let mut rest = v;
    while let Some(open) = rest.find('{') {
        let after = &rest[open..];
        match ROUTING_KEY_PLACEHOLDERS
            .iter()
            .find(|p| after.starts_with(**p))
        {
            Some(p) => rest = &after[p.len()..],
            None => {
                errors.push(
                    path,
                    format!(
                        "unknown placeholder in `{v}`; known: {}",
                        ROUTING_KEY_PLACEHOLDERS.join(", ")
                    ),
                );
                return;
            }
        }
    }
    if rest.contains('}') || v.contains(char::is_control) {
        errors.push(path, format!("`{v}`: stray `}}` or a control character"));
    }
}

fn sink(
    s: raw::AmqpSink,
    path: &str,
    seen: &mut BTreeSet<String>,
    errors: &mut Errors,
) -> AmqpSinkConfig {
    name(&s.name, &format!("{path}.name"), seen, errors);
    if let Err(e) = TopicFilter::parse(&s.filter) {
        errors.push(format!("{path}.filter"), e.to_string());
    }
    short_string(&s.exchange, &format!("{path}.exchange"), errors);
    routing_key_template(&s.routing_key, &format!("{path}.routing_key"), errors);
    let mode = match s.mode.as_str() {
        "binary" => AmqpMode::Binary,
        "structured" => AmqpMode::Structured,
        other => {
            errors.push(
                format!("{path}.mode"),
                format!("`{other}` is not one of: binary, structured"),
            );
            AmqpMode::Binary
        }
    };
    AmqpSinkConfig {
        name: s.name,
        filter: s.filter,
        exchange: s.exchange,
        routing_key: s.routing_key,
        mode,
        persistent: s.persistent,
        mandatory: s.mandatory,
        max_in_flight: positive(s.max_in_flight, &format!("{path}.max_in_flight"), errors),
    }
}

pub(crate) fn convert(a: raw::Amqp, errors: &mut Errors) -> AmqpConfig {
    url(&a.url, errors);
    if a.user.is_empty() {
        errors.push(
            "amqp.user",
            "must not be empty (RabbitMQ's default is guest)",
        );
    }
    let ca_file = (!a.ca_file.is_empty()).then(|| {
        if !std::path::Path::new(&a.ca_file).is_file() {
            errors.push(
                "amqp.ca_file",
                format!("`{}` is not a readable file", a.ca_file),
            );
        }
        std::path::PathBuf::from(&a.ca_file)
    });
    let client_cert = match (a.tls_cert_file.as_str(), a.tls_key_file.as_str()) {
        ("", "") => None,
        (cert, key) => {
            let mut file = |v: &str, k: &str| {
                if v.is_empty() {
                    errors.push(
                        k,
                        "amqp.tls_cert_file and tls_key_file go together: PEM files",
                    );
                } else if !std::path::Path::new(v).is_file() {
                    errors.push(k, format!("`{v}` is not a readable file"));
                }
                std::path::PathBuf::from(v)
            };
            Some((
                file(cert, "amqp.tls_cert_file"),
                file(key, "amqp.tls_key_file"),
            ))
        }
    };
    let reconnect_min = duration(&a.reconnect_min, "amqp.reconnect_min", errors);
    let reconnect_max = duration(&a.reconnect_max, "amqp.reconnect_max", errors);
    if reconnect_min.is_zero() {
        errors.push("amqp.reconnect_min", "must be longer than 0s");
    }
    if reconnect_max < reconnect_min {
        errors.push(
            "amqp.reconnect_max",
            "must not be shorter than amqp.reconnect_min",
        );
    }
    let connect_timeout = duration(&a.connect_timeout, "amqp.connect_timeout", errors);
    if connect_timeout.is_zero() {
        errors.push("amqp.connect_timeout", "must be longer than 0s");
    }
    let heartbeat = duration(&a.heartbeat, "amqp.heartbeat", errors);
    if heartbeat.as_secs() > u64::from(u16::MAX) {
        errors.push("amqp.heartbeat", "must be at most 65535s");
    }
    let max_body_size = max_body_size(&a.max_body_size, errors);
    let mut seen = BTreeSet::new();
    let sources = a
        .sources
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let path = format!("amqp.sources[{i}]");
            let s = section::<raw::AmqpSource>(v, &path, errors)?;
            Some(source(s, &path, &mut seen, errors))
        })
        .collect();
    let sinks = a
        .sinks
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let path = format!("amqp.sinks[{i}]");
            let s = section::<raw::AmqpSink>(v, &path, errors)?;
            Some(sink(s, &path, &mut seen, errors))
        })
        .collect();
    AmqpConfig {
        enabled: a.enabled,
        url: a.url,
        vhost: a.vhost,
        user: a.user,
        password: a.password,
        ca_file,
        client_cert,
        heartbeat,
        connect_timeout,
        reconnect_min,
        reconnect_max,
        max_body_size,
        sources,
        sinks,
    }
}

/// RabbitMQ's own ceiling for `max_message_size`.
const MAX_MESSAGE_SIZE: u64 = 512 << 20;

/// `amqp.max_body_size`: 1 byte up to RabbitMQ's 512 MiB ceiling.
fn max_body_size(v: &raw::Size, errors: &mut Errors) -> usize {
    let path = "amqp.max_body_size";
    let bytes = match v {
        raw::Size::Bytes(n) => u64::try_from(*n).map_err(|_| SizeError::Negative(*n)),
        raw::Size::Text(t) => parse_size(t),
    };
    match bytes {
        Ok(0) => {
            errors.push(path, "must be at least 1 byte, e.g. \"1MiB\"");
            1
        }
        Ok(b) if b > MAX_MESSAGE_SIZE => {
            errors.push(
                path,
                format!("{b} bytes is over 512MiB, the most RabbitMQ delivers"),
            );
            1
        }
        Ok(b) => usize::try_from(b).unwrap_or(usize::MAX),
        Err(e) => {
            errors.push(path, e.to_string());
            1
        }
    }
}
