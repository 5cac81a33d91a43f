//! Raw values → typed [`Config`], collecting every problem with its key path.

use std::net::SocketAddr;
use std::time::Duration;

use meshgate_core::{Topic, TopicFilter, validate};
use toml::{Table, Value};

use crate::check::{SizeError, duration, parse_size, positive};
use crate::model::*;
use crate::{Errors, raw, section};

/// The CloudEvents minimum an intermediary must forward (CE-BINDINGS.md §1).
const MIN_MESSAGE_SIZE: u64 = 64 * 1024;
/// Least `websocket.outbound_queue_bytes`: a few events of ordinary size.
const MIN_OUTBOUND_QUEUE_BYTES: u64 = 64 * 1024;

fn addr(v: &str, path: &str, errors: &mut Errors) -> SocketAddr {
    v.trim().parse().unwrap_or_else(|_| {
        errors.push(
            path,
            format!("`{v}` is not a socket address; write ip:port, e.g. \"127.0.0.1:8080\""),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

fn size(v: &raw::Size, path: &str, min: u64, why: &str, errors: &mut Errors) -> usize {
    let bytes = match v {
        raw::Size::Bytes(n) if *n >= 0 => Ok(*n as u64),
        raw::Size::Bytes(n) => Err(SizeError::Negative(*n)),
        raw::Size::Text(t) => parse_size(t),
    };
    match bytes {
        Ok(b) if b < min => {
            errors.push(path, format!("{b} bytes is below {why}"));
            min as usize
        }
        Ok(b) => usize::try_from(b).unwrap_or(usize::MAX),
        Err(e) => {
            errors.push(path, e.to_string());
            min as usize
        }
    }
}

/// An `allowed_origins` entry: `*`, or `scheme://host[:port]` as browsers send it in `Origin`
/// (kept lower-case, without a trailing `/`).
fn origin(v: &str, path: &str, errors: &mut Errors) -> Option<String> {
    let o = v.trim().trim_end_matches('/').to_ascii_lowercase();
    let ok = o == "*"
        || o.split_once("://").is_some_and(|(scheme, host)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                && !host.is_empty()
                && !host.contains(['/', '?', '#', ' '])
        });
    if ok {
        Some(o)
    } else {
        errors.push(
            path,
            format!(
                "`{v}` is not an origin; write scheme://host[:port], e.g. \"https://app.example.com\", or \"*\""
            ),
        );
        None
    }
}

fn jetstream_config(j: raw::JetStream, errors: &mut Errors) -> JetStreamConfig {
    let name_ok = !j.stream.is_empty()
        && j.stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        errors.push(
            "backbone.jetstream.stream",
            format!(
                "`{}` is not a stream name: letters, digits, `-` and `_` only",
                j.stream
            ),
        );
    }
    let max_bytes = match &j.max_bytes {
        raw::Size::Bytes(n) if *n > 0 => *n as u64,
        raw::Size::Text(t) => parse_size(t).unwrap_or_else(|e| {
            errors.push("backbone.jetstream.max_bytes", e.to_string());
            0
        }),
        raw::Size::Bytes(n) => {
            errors.push(
                "backbone.jetstream.max_bytes",
                format!("must be positive, got {n}"),
            );
            0
        }
    };
    let max_deliver = j.max_deliver;
    if max_deliver < 1 {
        errors.push(
            "backbone.jetstream.max_deliver",
            format!("must be at least 1, got {max_deliver}"),
        );
    }
    let backoff: Vec<Duration> = j
        .backoff
        .iter()
        .map(|b| duration(b, "backbone.jetstream.backoff", errors))
        .collect();
    if !backoff.is_empty() && backoff.len() as i64 >= max_deliver {
        errors.push(
            "backbone.jetstream.backoff",
            format!(
                "{} steps need max_deliver above {}",
                backoff.len(),
                backoff.len()
            ),
        );
    }
    let dead_letter_subject = (!j.dead_letter_subject.is_empty()).then_some(j.dead_letter_subject);
    let kv_max_value_size = size(
        &j.kv_max_value_size,
        "backbone.jetstream.kv_max_value_size",
        MIN_KV_VALUE,
        "4KiB (a session record with a few subscriptions)",
        errors,
    );
    if kv_max_value_size > i32::MAX as usize {
        errors.push(
            "backbone.jetstream.kv_max_value_size",
            format!("at most {} bytes", i32::MAX),
        );
    }
    if dead_letter_subject.as_deref().is_some_and(|s| {
        s.split('.')
            .any(|t| t.is_empty() || t.contains(['*', '>', ' ']))
    }) {
        errors.push(
            "backbone.jetstream.dead_letter_subject",
            "a NATS subject: dot-separated tokens without spaces or wildcards",
        );
    }
    let publish_connections = positive(
        j.publish_connections,
        "backbone.jetstream.publish_connections",
        errors,
    );
    if publish_connections > MAX_PUBLISH_CONNECTIONS {
        errors.push(
            "backbone.jetstream.publish_connections",
            format!("at most {MAX_PUBLISH_CONNECTIONS}, got {publish_connections}"),
        );
    }
    let publish_timeout = duration(
        &j.publish_timeout,
        "backbone.jetstream.publish_timeout",
        errors,
    );
    if !(MIN_PUBLISH_TIMEOUT..=MAX_PUBLISH_TIMEOUT).contains(&publish_timeout) {
        errors.push(
            "backbone.jetstream.publish_timeout",
            format!(
                "between {MIN_PUBLISH_TIMEOUT:?} and {MAX_PUBLISH_TIMEOUT:?} (a client's publish \
                 waits this long at most for its answer), got {publish_timeout:?}"
            ),
        );
    }
    let subscriptions = match j.subscriptions.as_str() {
        "consumer_each" => JetStreamSubscriptions::ConsumerEach,
        "instance_feed" => JetStreamSubscriptions::InstanceFeed,
        other => {
            errors.push(
                "backbone.jetstream.subscriptions",
                format!("`{other}` is not one of: consumer_each, instance_feed"),
            );
            JetStreamSubscriptions::ConsumerEach
        }
    };
    JetStreamConfig {
        stream: j.stream,
        max_age: duration(&j.max_age, "backbone.jetstream.max_age", errors),
        max_bytes,
        replicas: positive(j.replicas, "backbone.jetstream.replicas", errors),
        duplicate_window: duration(
            &j.duplicate_window,
            "backbone.jetstream.duplicate_window",
            errors,
        ),
        ack_wait: duration(&j.ack_wait, "backbone.jetstream.ack_wait", errors),
        backoff,
        max_deliver,
        dead_letter_subject,
        publish_connections: publish_connections.min(MAX_PUBLISH_CONNECTIONS),
        publish_timeout: publish_timeout.clamp(MIN_PUBLISH_TIMEOUT, MAX_PUBLISH_TIMEOUT),
        retained_max_bytes: size(
            &j.retained_max_bytes,
            "backbone.jetstream.retained_max_bytes",
            MIN_KV_BYTES,
            "64KiB (room for a few retained messages)",
            errors,
        ) as u64,
        sessions_max_bytes: size(
            &j.sessions_max_bytes,
            "backbone.jetstream.sessions_max_bytes",
            MIN_KV_BYTES,
            "64KiB (room for a few session records)",
            errors,
        ) as u64,
        kv_max_value_size: kv_max_value_size.min(i32::MAX as usize),
        subscriptions,
    }
}

/// Smallest `backbone.jetstream.{retained,sessions}_max_bytes`.
const MIN_KV_BYTES: u64 = 64 * 1024;
/// Smallest `backbone.jetstream.kv_max_value_size`.
const MIN_KV_VALUE: u64 = 4 * 1024;

/// More JetStream publishing connections than a server has cores gain nothing.
const MAX_PUBLISH_CONNECTIONS: usize = 16;
/// `backbone.jetstream.publish_timeout` bounds: a PubAck takes a round trip and a disk write
/// (well under a second on a healthy server); a minute is already longer than clients wait.
const MIN_PUBLISH_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);

fn nats_config(n: raw::Nats, errors: &mut Errors) -> NatsBackboneConfig {
    if n.urls.is_empty() {
        errors.push(
            "backbone.nats.urls",
            "at least one server URL, e.g. \"nats://127.0.0.1:4222\"",
        );
    }
    for u in &n.urls {
        let rest = u.split_once("://").map_or(u.as_str(), |(scheme, rest)| {
            if !matches!(scheme, "nats" | "tls") {
                errors.push(
                    "backbone.nats.urls",
                    format!("`{u}`: the scheme must be nats:// or tls://"),
                );
            }
            rest
        });
        if rest.is_empty() || rest.contains(['/', ' ']) {
            errors.push(
                "backbone.nats.urls",
                format!("`{u}` is not a server URL like \"nats://127.0.0.1:4222\""),
            );
        }
    }
    let prefix_ok = n.subject_prefix.is_empty()
        || n.subject_prefix.split('.').all(|t| {
            !t.is_empty() && !t.contains(['*', '>']) && !t.bytes().any(|b| b <= b' ' || b == 0x7f)
        });
    if !prefix_ok {
        errors.push(
            "backbone.nats.subject_prefix",
            format!(
                "`{}` is not a subject prefix: dot-separated tokens without spaces, control characters, `*` or `>`",
                n.subject_prefix
            ),
        );
    }
    let wire_mode = match n.wire_mode.as_str() {
        "structured" => NatsWireMode::Structured,
        "binary" => NatsWireMode::Binary,
        other => {
            errors.push(
                "backbone.nats.wire_mode",
                format!("`{other}` is not one of: structured, binary"),
            );
            NatsWireMode::Structured
        }
    };
    let some = |s: String| (!s.is_empty()).then_some(s);
    let (user, password, token) = (some(n.user), some(n.password), some(n.token));
    if user.is_some() != password.is_some() {
        errors.push("backbone.nats.password", "user and password go together");
    }
    if token.is_some() && user.is_some() {
        errors.push(
            "backbone.nats.token",
            "use a token or a user and password, not both",
        );
    }
    let nkey = match (some(n.credentials_file), some(n.nkey_seed_file)) {
        (None, None) => None,
        (Some(_), Some(_)) => {
            errors.push(
                "backbone.nats.nkey_seed_file",
                "use a credentials file or an NKey seed file, not both",
            );
            None
        }
        (Some(f), None) => Some(NatsNkey::CredentialsFile(pem_file(
            &f,
            "backbone.nats.credentials_file",
            "",
            errors,
        ))),
        (None, Some(f)) => Some(NatsNkey::SeedFile(pem_file(
            &f,
            "backbone.nats.nkey_seed_file",
            "",
            errors,
        ))),
    };
    if nkey.is_some() && (user.is_some() || token.is_some()) {
        errors.push(
            "backbone.nats.credentials_file",
            "NKey authentication replaces user/password and token: set one of them",
        );
    }
    let tls = NatsTlsConfig {
        ca_file: some(n.ca_file.clone()).map(|f| pem_file(&f, "backbone.nats.ca_file", "", errors)),
        client: match (some(n.tls_cert_file), some(n.tls_key_file)) {
            (None, None) => None,
            (cert, key) => {
                let why = "backbone.nats.tls_cert_file and tls_key_file go together: PEM files";
                Some((
                    pem_file(
                        cert.as_deref().unwrap_or(""),
                        "backbone.nats.tls_cert_file",
                        why,
                        errors,
                    ),
                    pem_file(
                        key.as_deref().unwrap_or(""),
                        "backbone.nats.tls_key_file",
                        why,
                        errors,
                    ),
                ))
            }
        },
    };
    NatsBackboneConfig {
        urls: n.urls,
        subject_prefix: n.subject_prefix,
        wire_mode,
        user,
        password,
        token,
        tls,
        nkey,
        connect_timeout: duration(&n.connect_timeout, "backbone.nats.connect_timeout", errors),
        subscription_capacity: positive(
            n.subscription_capacity,
            "backbone.nats.subscription_capacity",
            errors,
        ),
        subscription_bytes: size(
            &n.subscription_bytes,
            "backbone.nats.subscription_bytes",
            64 << 10,
            "64 KiB (one message always fits in an empty queue, whatever its size)",
            errors,
        ),
        max_control_line: size(
            &n.max_control_line,
            "backbone.nats.max_control_line",
            512,
            "the 512 bytes meshgate's own JetStream requests may take (nats-server's default is 4096)",
            errors,
        ),
    }
}

/// HTTPS on a listener: both files or neither (`<section>.tls_cert_file`, `tls_key_file`).
fn server_tls(
    section: &str,
    cert: &str,
    key: &str,
    errors: &mut Errors,
) -> Option<ServerTlsConfig> {
    if cert.is_empty() && key.is_empty() {
        return None;
    }
    let why =
        format!("required with {section}.tls_cert_file / tls_key_file: the path of a PEM file");
    Some(ServerTlsConfig {
        cert_file: pem_file(cert, &format!("{section}.tls_cert_file"), &why, errors),
        key_file: pem_file(key, &format!("{section}.tls_key_file"), &why, errors),
    })
}

/// A PEM file that must exist (its content is checked when the listener starts); `why_needed`
/// when it is not set.
fn pem_file(v: &str, path: &str, why_needed: &str, errors: &mut Errors) -> std::path::PathBuf {
    if v.is_empty() {
        errors.push(path, why_needed);
    } else if !std::path::Path::new(v).is_file() {
        errors.push(path, format!("`{v}` is not a readable file"));
    }
    std::path::PathBuf::from(v)
}

/// `mqtt.max_client_id_len`: at least 23 (MQTT 3.1.1 §3.1.3.1 and 5 §3.1.3.1: a server must
/// accept client ids of 1 to 23 characters), at most 65535 (the field's limit).
fn client_id_len(v: i64, errors: &mut Errors) -> usize {
    if !(23..=65_535).contains(&v) {
        errors.push(
            "mqtt.max_client_id_len",
            format!("must be from 23 (the MQTT minimum) to 65535, got {v}"),
        );
        return 256;
    }
    usize::try_from(v).unwrap_or(256)
}

fn non_negative(v: i64, path: &str, errors: &mut Errors) -> usize {
    if v < 0 {
        errors.push(path, format!("must be 0 or more, got {v}"));
        return 0;
    }
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn route(v: &str, path: &str, errors: &mut Errors) -> String {
    if !v.starts_with('/')
        || v == "/"
        || v.ends_with('/')
        || v.contains(['?', '#', '{', '}', ' ', '"', '\'', '<', '>', '%', '\\'])
    {
        errors.push(
            path,
            format!("`{v}` must be a path like \"/events\": starting with `/`, not `/` itself, no trailing `/`, and none of ? # {{ }} \" ' < > % \\ or spaces"),
        );
    }
    v.to_owned()
}

/// ACL filters: valid MQTT filters once `{user}` and `{clientid}` are replaced, and no other
/// `{name}` (a misspelt template would silently be a literal level, and a deny rule with it
/// would deny nothing).
fn filters(list: &[String], path: &str, errors: &mut Errors) -> Vec<String> {
    for (i, f) in list.iter().enumerate() {
        // User names and the client ids bound have no `/`, `+` or `#`: the filter as written
        // has the shape of every filter made from it.
        if let Err(e) = TopicFilter::parse(f) {
            errors.push(format!("{path}[{i}]"), e.to_string());
        } else if let Some(name) =
            unknown_template(&f.replace("{clientid}", "c").replace("{user}", "u"))
        {
            errors.push(
                format!("{path}[{i}]"),
                format!(
                    "unknown template `{{{name}}}`; the templates are {{user}} and {{clientid}}"
                ),
            );
        }
    }
    list.to_vec()
}

/// The first `{name}` in `s` (name: ASCII letters, digits, `_`, `-`).
fn unknown_template(s: &str) -> Option<&str> {
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        rest = &rest[open + 1..];
        if let Some(close) = rest.find('}') {
            let name = &rest[..close];
            if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Some(name);
            }
        }
    }
    None
}

/// The ACL lists of `section` (`auth.anonymous` or `auth.users[i]`), checked.
fn acl(
    publish: &[String],
    subscribe: &[String],
    deny_publish: &[String],
    deny_subscribe: &[String],
    client_id_prefixes: &[String],
    section: &str,
    errors: &mut Errors,
) -> AclConfig {
    for (i, prefix) in client_id_prefixes.iter().enumerate() {
        let rest = prefix.replace("{user}", "");
        if prefix.is_empty() || prefix.len() > 256 || rest.contains(['{', '}']) {
            errors.push(
                format!("{section}.client_id_prefixes[{i}]"),
                "a client id prefix: 1 to 256 bytes, `{user}` the only template",
            );
        }
    }
    AclConfig {
        publish: filters(publish, &format!("{section}.publish"), errors),
        subscribe: filters(subscribe, &format!("{section}.subscribe"), errors),
        deny_publish: filters(deny_publish, &format!("{section}.deny_publish"), errors),
        deny_subscribe: filters(deny_subscribe, &format!("{section}.deny_subscribe"), errors),
        client_id_prefixes: client_id_prefixes.to_vec(),
    }
}

fn get<'a>(table: &'a Table, key: &str) -> Option<&'a Value> {
    table.get(key)
}

pub(crate) fn convert(table: &Table, errors: &mut Errors) -> Option<Config> {
    let known = [
        "gateway",
        "log",
        "admin",
        "backbone",
        "http",
        "websocket",
        "mqtt",
        "amqp",
        "auth",
        "tracing",
        "triggers",
    ];
    for key in table.keys() {
        if !known.contains(&key.as_str()) {
            errors.push(
                key.clone(),
                format!("unknown section; known: {}", known.join(", ")),
            );
        }
    }
    let empty = Value::Table(Table::new());
    let sec = |k: &str| get(table, k).unwrap_or(&empty);

    let gateway: Option<raw::Gateway> = section(sec("gateway"), "gateway", errors);
    let log: Option<raw::Log> = section(sec("log"), "log", errors);
    let admin: Option<raw::Admin> = section(sec("admin"), "admin", errors);
    let backbone: Option<raw::Backbone> = section(sec("backbone"), "backbone", errors);
    let http: Option<raw::Http> = section(sec("http"), "http", errors);
    let websocket: Option<raw::WebSocket> = section(sec("websocket"), "websocket", errors);
    let mqtt: Option<raw::Mqtt> = section(sec("mqtt"), "mqtt", errors);
    let amqp: Option<raw::Amqp> = section(sec("amqp"), "amqp", errors);
    let amqp = amqp.map(|a| crate::amqp::convert(a, errors));
    let auth = auth(sec("auth"), errors);
    let tracing: Option<raw::Tracing> = section(sec("tracing"), "tracing", errors);
    let tracing = tracing.map(|t| tracing_config(t, errors));
    let triggers = triggers(table.get("triggers"), errors);

    let gateway = gateway.map(|g| {
        if let Some(id) = &g.instance_id
            && (id.is_empty() || id.contains(char::is_whitespace))
        {
            errors.push(
                "gateway.instance_id",
                "must be non-empty and without whitespace",
            );
        }
        GatewayConfig {
            instance_id: g.instance_id,
            shutdown_grace: duration(&g.shutdown_grace, "gateway.shutdown_grace", errors),
            worker_threads: match g.worker_threads {
                0 => None,
                n if (1..=1024).contains(&n) => usize::try_from(n).ok(),
                n => {
                    errors.push(
                        "gateway.worker_threads",
                        format!("must be 0 (one per CPU core) or 1 to 1024, got {n}"),
                    );
                    None
                }
            },
            max_connections_per_ip: non_negative(
                g.max_connections_per_ip,
                "gateway.max_connections_per_ip",
                errors,
            ),
            max_connections_per_user: non_negative(
                g.max_connections_per_user,
                "gateway.max_connections_per_user",
                errors,
            ),
        }
    });
    let log = log.map(|l| {
        if l.level.trim().is_empty() {
            errors.push(
                "log.level",
                "must not be empty; e.g. \"info\" or \"meshgate_http=debug,info\"",
            );
        }
        let format = match l.format.as_str() {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => {
                errors.push(
                    "log.format",
                    format!("`{other}` is not one of: pretty, json"),
                );
                LogFormat::Pretty
            }
        };
        LogConfig {
            level: l.level,
            format,
        }
    });
    let admin = admin.map(|a| AdminConfig {
        enabled: a.enabled,
        listen: addr(&a.listen, "admin.listen", errors),
        tls: server_tls("admin", &a.tls_cert_file, &a.tls_key_file, errors),
        max_connections: positive(a.max_connections, "admin.max_connections", errors),
        api_token: match a.api_token.as_str() {
            "" => None,
            t if t.len() < 16 || t.contains(char::is_whitespace) => {
                errors.push(
                    "admin.api_token",
                    "at least 16 characters without whitespace (or \"\" to turn the admin API off)",
                );
                None
            }
            t => Some(t.to_owned()),
        },
    });
    let backbone = backbone.map(|b| {
        let kind = match b.kind.as_str() {
            "memory" => BackboneKind::Memory,
            "nats" => BackboneKind::Nats,
            "jetstream" => BackboneKind::JetStream,
            other => {
                errors.push(
                    "backbone.kind",
                    format!("`{other}` is not one of: memory, nats, jetstream"),
                );
                BackboneKind::Memory
            }
        };
        let full_policy = match b.memory.full_policy.as_str() {
            "block" => FullQueuePolicy::Block,
            "drop" => FullQueuePolicy::Drop,
            other => {
                errors.push(
                    "backbone.memory.full_policy",
                    format!("`{other}` is not one of: block, drop"),
                );
                FullQueuePolicy::Drop
            }
        };
        BackboneConfig {
            kind,
            memory: MemoryBackboneConfig {
                queue_capacity: positive(
                    b.memory.queue_capacity,
                    "backbone.memory.queue_capacity",
                    errors,
                ),
                full_policy,
                block_timeout: duration(
                    &b.memory.block_timeout,
                    "backbone.memory.block_timeout",
                    errors,
                ),
            },
            nats: nats_config(b.nats, errors),
            jetstream: jetstream_config(b.jetstream, errors),
        }
    });
    let min_why = "the 64 KiB every CloudEvents intermediary must accept";
    let http = http.map(|h| {
        if let Err(e) = validate::uri_reference("source", &h.wrap.source) {
            errors.push("http.wrap.source", e.to_string());
        }
        if let Err(e) = validate::non_empty_string("type", &h.wrap.event_type) {
            errors.push("http.wrap.type", e.to_string());
        }
        HttpConfig {
            enabled: h.enabled,
            listen: addr(&h.listen, "http.listen", errors),
            tls: server_tls("http", &h.tls_cert_file, &h.tls_key_file, errors),
            events_path: route(&h.events_path, "http.events_path", errors),
            max_body_size: size(
                &h.max_body_size,
                "http.max_body_size",
                MIN_MESSAGE_SIZE,
                min_why,
                errors,
            ),
            max_batch_events: positive(h.max_batch_events, "http.max_batch_events", errors),
            max_in_flight: positive(h.max_in_flight, "http.max_in_flight", errors),
            retry_after: duration(&h.retry_after, "http.retry_after", errors),
            browser_page: h.browser_page,
            header_read_timeout: duration(
                &h.header_read_timeout,
                "http.header_read_timeout",
                errors,
            ),
            idle_timeout: duration(&h.idle_timeout, "http.idle_timeout", errors),
            max_connections: positive(h.max_connections, "http.max_connections", errors),
            max_header_size: size(
                &h.max_header_size,
                "http.max_header_size",
                8 * 1024,
                "8 KiB (browsers send heads of a few KiB: cookies, long URLs)",
                errors,
            ),
            allowed_origins: h
                .allowed_origins
                .into_iter()
                .filter_map(|o| origin(&o, "http.allowed_origins", errors))
                .collect(),
            body_read_timeout: duration(&h.body_read_timeout, "http.body_read_timeout", errors),
            wrap: WrapConfig {
                source: h.wrap.source,
                event_type: h.wrap.event_type,
            },
        }
    });
    let websocket = websocket.map(|w| {
        if w.outbound_queue.is_some() {
            errors.push(
                "websocket.outbound_queue",
                "retired: the outbound queue is bounded in bytes now; set websocket.outbound_queue_bytes (default 16MiB) instead",
            );
        }
        let slow_consumer = match w.slow_consumer.as_str() {
            "disconnect" => SlowConsumerPolicy::Disconnect,
            "drop" => SlowConsumerPolicy::Drop,
            other => {
                errors.push(
                    "websocket.slow_consumer",
                    format!("`{other}` is not one of: disconnect, drop"),
                );
                SlowConsumerPolicy::Disconnect
            }
        };
        let publish_topic = match w.publish_topic.as_str() {
            "subject" => PublishTopic::Subject,
            other => match other.strip_prefix("fixed:") {
                Some(t) => {
                    if let Err(e) = Topic::from_mqtt(t) {
                        errors.push("websocket.publish_topic", e.to_string());
                    }
                    PublishTopic::Fixed(t.to_owned())
                }
                None => {
                    errors.push(
                        "websocket.publish_topic",
                        format!("`{other}` is not \"subject\" or \"fixed:<topic>\""),
                    );
                    PublishTopic::Subject
                }
            },
        };
        WebSocketConfig {
            enabled: w.enabled,
            path: route(&w.path, "websocket.path", errors),
            require_subprotocol: w.require_subprotocol,
            max_message_size: size(
                &w.max_message_size,
                "websocket.max_message_size",
                MIN_MESSAGE_SIZE,
                min_why,
                errors,
            ),
            outbound_queue_bytes: size(
                &w.outbound_queue_bytes,
                "websocket.outbound_queue_bytes",
                MIN_OUTBOUND_QUEUE_BYTES,
                "64 KiB, the least a connection's outbound queue may hold",
                errors,
            ),
            slow_consumer,
            publish_topic,
            max_connections: positive(w.max_connections, "websocket.max_connections", errors),
            ping_interval: duration(&w.ping_interval, "websocket.ping_interval", errors),
            max_filters: positive(w.max_filters, "websocket.max_filters", errors),
            allowed_origins: w
                .allowed_origins
                .into_iter()
                .filter_map(|o| origin(&o, "websocket.allowed_origins", errors))
                .collect(),
        }
    });
    let mqtt = mqtt.map(|m| {
        let v5_outbound = match m.v5_outbound.as_str() {
            "binary" => Mqtt5Mode::Binary,
            "structured" => Mqtt5Mode::Structured,
            other => {
                errors.push(
                    "mqtt.v5_outbound",
                    format!("`{other}` is not one of: binary, structured"),
                );
                Mqtt5Mode::Binary
            }
        };
        let v311_outbound = match m.v311_outbound.as_str() {
            "structured" => Mqtt311Mode::Structured,
            "data" => Mqtt311Mode::Data,
            other => {
                errors.push(
                    "mqtt.v311_outbound",
                    format!("`{other}` is not one of: structured, data"),
                );
                Mqtt311Mode::Structured
            }
        };
        let plain_messages = match m.plain_messages.as_str() {
            "as_published" => PlainMessages::AsPublished,
            "cloudevents" => PlainMessages::CloudEvents,
            other => {
                errors.push(
                    "mqtt.plain_messages",
                    format!("`{other}` is not one of: as_published, cloudevents"),
                );
                PlainMessages::AsPublished
            }
        };
        if let Err(e) = validate::non_empty_string("type", &m.wrap_type) {
            errors.push("mqtt.wrap_type", e.to_string());
        }
        let max_inflight = positive(m.max_inflight, "mqtt.max_inflight", errors);
        let max_inflight = u16::try_from(max_inflight).unwrap_or_else(|_| {
            errors.push("mqtt.max_inflight", "must be at most 65535");
            u16::MAX
        });
        MqttConfig {
            enabled: m.enabled,
            listen: addr(&m.listen, "mqtt.listen", errors),
            max_connections: positive(m.max_connections, "mqtt.max_connections", errors),
            max_packet_size: size(
                &m.max_packet_size,
                "mqtt.max_packet_size",
                MIN_MESSAGE_SIZE,
                min_why,
                errors,
            ),
            connect_timeout: duration(&m.connect_timeout, "mqtt.connect_timeout", errors),
            write_timeout: {
                let d = duration(&m.write_timeout, "mqtt.write_timeout", errors);
                if d.is_zero() {
                    errors.push("mqtt.write_timeout", "must be longer than 0s, e.g. \"30s\"");
                }
                d
            },
            max_keep_alive: {
                let d = duration(&m.max_keep_alive, "mqtt.max_keep_alive", errors);
                if d < Duration::from_secs(1) || d > Duration::from_secs(65_535) {
                    errors.push(
                        "mqtt.max_keep_alive",
                        "must be between 1s and 65535s (MQTT's Server Keep Alive is a 16-bit count of seconds)",
                    );
                }
                d
            },
            max_inflight,
            max_queued: positive(m.max_queued, "mqtt.max_queued", errors),
            max_subscriptions: positive(m.max_subscriptions, "mqtt.max_subscriptions", errors),
            max_session_expiry: duration(&m.max_session_expiry, "mqtt.max_session_expiry", errors),
            max_offline_sessions: non_negative(
                m.max_offline_sessions,
                "mqtt.max_offline_sessions",
                errors,
            ),
            max_retained_messages: positive(
                m.max_retained_messages,
                "mqtt.max_retained_messages",
                errors,
            ),
            max_retained_bytes: size(
                &m.max_retained_bytes,
                "mqtt.max_retained_bytes",
                MIN_MESSAGE_SIZE,
                "64KiB (one retained message of the smallest max_packet_size)",
                errors,
            ),
            max_retained_send_bytes: size(
                &m.max_retained_send_bytes,
                "mqtt.max_retained_send_bytes",
                MIN_MESSAGE_SIZE,
                "64KiB (one retained message of the smallest max_packet_size)",
                errors,
            ),
            max_client_id_len: client_id_len(m.max_client_id_len, errors),
            v5_outbound,
            v311_outbound,
            plain_messages,
            sys_interval: duration(&m.sys_interval, "mqtt.sys_interval", errors),
            wrap_type: m.wrap_type,
            websocket_path: (!m.websocket_path.is_empty())
                .then(|| route(&m.websocket_path, "mqtt.websocket_path", errors)),
            tls: (!m.tls_listen.is_empty()).then(|| {
                let why = "required when mqtt.tls_listen is set: the path of a PEM file";
                let client_auth = match m.tls_client_auth.as_str() {
                    "none" => ClientAuthMode::None,
                    "optional" => ClientAuthMode::Optional,
                    "required" => ClientAuthMode::Required,
                    other => {
                        errors.push(
                            "mqtt.tls_client_auth",
                            format!("`{other}`: expected \"none\", \"optional\" or \"required\""),
                        );
                        ClientAuthMode::None
                    }
                };
                let client_ca_file = match (client_auth, m.tls_client_ca_file.as_str()) {
                    (ClientAuthMode::None, _) => None,
                    (_, ca) => Some(pem_file(
                        ca,
                        "mqtt.tls_client_ca_file",
                        "required when mqtt.tls_client_auth is \"optional\" or \"required\": the CA that signs client certificates",
                        errors,
                    )),
                };
                let identity = match m.tls_identity.as_str() {
                    "cn" => CertificateIdentity::CommonName,
                    "san" => CertificateIdentity::SubjectAltName,
                    other => {
                        errors.push(
                            "mqtt.tls_identity",
                            format!("`{other}`: expected \"cn\" (subject common name) or \"san\" (first DNS, e-mail or URI alternative name)"),
                        );
                        CertificateIdentity::CommonName
                    }
                };
                MqttTlsConfig {
                    listen: addr(&m.tls_listen, "mqtt.tls_listen", errors),
                    cert_file: pem_file(&m.tls_cert_file, "mqtt.tls_cert_file", why, errors),
                    key_file: pem_file(&m.tls_key_file, "mqtt.tls_key_file", why, errors),
                    client_ca_file,
                    client_auth,
                    identity,
                }
            }),
        }
    });
    if let (Some(h), Some(w), Some(m)) = (&http, &websocket, &mqtt)
        && let Some(p) = &m.websocket_path
        && (p == &w.path || p == &h.events_path || p.starts_with(&format!("{}/", h.events_path)))
    {
        errors.push(
            "mqtt.websocket_path",
            format!("`{p}` collides with websocket.path or http.events_path"),
        );
    }
    if let (Some(h), Some(w)) = (&http, &websocket)
        && (h.events_path == w.path || w.path.starts_with(&format!("{}/", h.events_path)))
    {
        errors.push(
            "websocket.path",
            format!(
                "`{}` collides with http.events_path `{}`",
                w.path, h.events_path
            ),
        );
    }
    for (d, path) in [
        (
            gateway.as_ref().map(|g| g.shutdown_grace),
            "gateway.shutdown_grace",
        ),
        (
            websocket.as_ref().map(|w| w.ping_interval),
            "websocket.ping_interval",
        ),
        (
            http.as_ref().map(|h| h.header_read_timeout),
            "http.header_read_timeout",
        ),
        (http.as_ref().map(|h| h.idle_timeout), "http.idle_timeout"),
        (
            http.as_ref().map(|h| h.body_read_timeout),
            "http.body_read_timeout",
        ),
    ] {
        if d == Some(Duration::ZERO) {
            errors.push(path, "must be longer than 0s");
        }
    }
    // Deadlines are computed as `now + timeout` (in hyper too, which would panic on an overflow):
    // longer than a day is a typo, not a policy.
    const DAY: Duration = Duration::from_secs(24 * 3600);
    for (d, path) in [
        (
            http.as_ref().map(|h| h.header_read_timeout),
            "http.header_read_timeout",
        ),
        (http.as_ref().map(|h| h.idle_timeout), "http.idle_timeout"),
        (
            http.as_ref().map(|h| h.body_read_timeout),
            "http.body_read_timeout",
        ),
        (
            websocket.as_ref().map(|w| w.ping_interval),
            "websocket.ping_interval",
        ),
    ] {
        if let Some(d) = d.filter(|d| *d > DAY) {
            errors.push(path, format!("{d:?} is longer than the maximum of 24h"));
        }
    }
    if let (Some(amqp), Some(auth)) = (&amqp, &auth) {
        for (i, source) in amqp.sources.iter().enumerate() {
            if let Some(user) = &source.user
                && !auth.users.iter().any(|u| &u.name == user)
            {
                errors.push(
                    format!("amqp.sources[{i}].user"),
                    format!("`{user}` is not one of [[auth.users]]"),
                );
            }
        }
    }
    Some(Config {
        gateway: gateway?,
        log: log?,
        admin: admin?,
        backbone: backbone?,
        http: http?,
        websocket: websocket?,
        mqtt: mqtt?,
        amqp: amqp?,
        auth: auth?,
        tracing: tracing?,
        triggers,
    })
}

fn tracing_config(t: raw::Tracing, errors: &mut Errors) -> TracingConfig {
    let endpoint = t.endpoint.trim();
    let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
    if !scheme_ok || endpoint.contains(char::is_whitespace) || endpoint.len() <= "https://".len() {
        errors.push(
            "tracing.endpoint",
            format!(
                "{endpoint:?} is not an http:// or https:// URL (the OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces)"
            ),
        );
    }
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        errors.push(
            "tracing.sample_ratio",
            format!("{} is not between 0.0 and 1.0", t.sample_ratio),
        );
    }
    if t.service_name.trim().is_empty() {
        errors.push("tracing.service_name", "must not be empty");
    }
    TracingConfig {
        enabled: t.enabled,
        endpoint: endpoint.to_owned(),
        sample_ratio: t.sample_ratio.clamp(0.0, 1.0),
        service_name: t.service_name,
        export_timeout: duration(&t.export_timeout, "tracing.export_timeout", errors),
        max_queued_spans: positive(t.max_queued_spans, "tracing.max_queued_spans", errors),
    }
}

/// `[[triggers]]`: each checked as the admin API checks a `PUT /triggers/{name}` body.
fn triggers(value: Option<&Value>, errors: &mut Errors) -> Vec<crate::TriggerConfig> {
    let Some(value) = value else {
        return Vec::new();
    };
    let Value::Array(list) = value else {
        errors.push("triggers", "must be an array of tables ([[triggers]])");
        return Vec::new();
    };
    let mut out: Vec<crate::TriggerConfig> = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let at = format!("triggers[{i}]");
        let doc = match serde_json::to_value(item) {
            Ok(d) => d,
            Err(e) => {
                errors.push(at, format!("cannot read the trigger: {e}"));
                continue;
            }
        };
        match crate::parse_trigger(None, &doc) {
            Ok(t) if out.iter().any(|o| o.name == t.name) => {
                errors.push(
                    format!("{at}.name"),
                    format!("`{}` is used by an earlier trigger", t.name),
                );
            }
            Ok(t) => out.push(t),
            Err(problems) => {
                for (path, message) in problems {
                    let path = if path.is_empty() {
                        at.clone()
                    } else {
                        format!("{at}.{path}")
                    };
                    errors.push(path, message);
                }
            }
        }
    }
    out
}

fn auth(value: &Value, errors: &mut Errors) -> Option<AuthConfig> {
    let Value::Table(t) = value else {
        errors.push("auth", "must be a table");
        return None;
    };
    for key in t.keys() {
        if ![
            "anonymous",
            "users",
            "allow_anonymous_on_public",
            "allow_plaintext_passwords",
            "max_failed_logins",
            "failed_login_window",
            "jwt",
            "certificates",
        ]
        .contains(&key.as_str())
        {
            errors.push(format!("auth.{key}"), "unknown key");
        }
    }
    // `auth.<key>`: a boolean, false when absent.
    let mut switch = |key: &str| match t.get(key) {
        None => false,
        Some(Value::Boolean(b)) => *b,
        Some(_) => {
            errors.push(format!("auth.{key}"), "must be true or false");
            false
        }
    };
    let allow_anonymous_on_public = switch("allow_anonymous_on_public");
    let allow_plaintext_passwords = switch("allow_plaintext_passwords");
    let max_failed_logins = match t.get("max_failed_logins") {
        None => 10,
        Some(Value::Integer(n)) if (0..=i64::from(u32::MAX)).contains(n) => *n as u32,
        Some(_) => {
            errors.push(
                "auth.max_failed_logins",
                "must be a whole number of failed logins (0 turns the limit off)",
            );
            10
        }
    };
    let failed_login_window = match t.get("failed_login_window") {
        None => Duration::from_secs(60),
        Some(Value::String(s)) => {
            let d = duration(s, "auth.failed_login_window", errors);
            if d.is_zero() {
                errors.push(
                    "auth.failed_login_window",
                    "must be longer than 0 (auth.max_failed_logins = 0 turns the limit off)",
                );
            }
            d
        }
        Some(_) => {
            errors.push(
                "auth.failed_login_window",
                "must be a duration such as \"1m\" or \"30s\"",
            );
            Duration::from_secs(60)
        }
    };
    let empty = Value::Table(Table::new());
    let jwt = section::<raw::Jwt>(t.get("jwt").unwrap_or(&empty), "auth.jwt", errors)
        .map(|j| jwt(j, errors));
    let certificates = section::<raw::Rules>(
        t.get("certificates").unwrap_or(&empty),
        "auth.certificates",
        errors,
    )
    .map(|r| {
        acl(
            &r.publish,
            &r.subscribe,
            &r.deny_publish,
            &r.deny_subscribe,
            &r.client_id_prefixes,
            "auth.certificates",
            errors,
        )
    });
    let anonymous: Option<raw::Anonymous> = section(
        t.get("anonymous").unwrap_or(&empty),
        "auth.anonymous",
        errors,
    );
    let anonymous = anonymous.map(|a| AnonymousConfig {
        enabled: a.enabled,
        acl: acl(
            &a.publish,
            &a.subscribe,
            &a.deny_publish,
            &a.deny_subscribe,
            &a.client_id_prefixes,
            "auth.anonymous",
            errors,
        ),
    });
    let mut users = Vec::new();
    match t.get("users") {
        None => {}
        Some(Value::Array(items)) => {
            let mut names = std::collections::BTreeSet::new();
            let mut tokens = std::collections::BTreeSet::new();
            for (i, item) in items.iter().enumerate() {
                let path = format!("auth.users[{i}]");
                let Some(u) = section::<raw::User>(item, &path, errors) else {
                    continue;
                };
                if u.name.is_empty()
                    || u.name.contains(['/', '+', '#', '{', '}'])
                    || u.name.contains(char::is_whitespace)
                {
                    errors.push(
                        format!("{path}.name"),
                        "must be non-empty, without `/`, `+`, `#`, `{`, `}` or whitespace",
                    );
                }
                if !names.insert(u.name.clone()) {
                    errors.push(
                        format!("{path}.name"),
                        format!("user `{}` is defined twice", u.name),
                    );
                }
                if u.password.is_none() && u.tokens.is_empty() && !u.certificate {
                    errors.push(
                        path.clone(),
                        format!(
                            "user `{}` has neither a password nor tokens nor `certificate = true`; it could never log in",
                            u.name
                        ),
                    );
                }
                match u.password.as_deref() {
                    Some("") => errors.push(format!("{path}.password"), "must not be empty"),
                    Some(p) if meshgate_core::auth::password::is_hash(p) => {
                        if let Err(e) = meshgate_core::auth::password::check_hash(p) {
                            errors.push(format!("{path}.password"), e);
                        }
                    }
                    Some(_) if !allow_plaintext_passwords => errors.push(
                        format!("{path}.password"),
                        "a plaintext password; store its hash instead: `meshgate passwd` reads the password on stdin and prints an Argon2id hash to paste here (or set auth.allow_plaintext_passwords = true, for development only)",
                    ),
                    _ => {}
                }
                for (j, tok) in u.tokens.iter().enumerate() {
                    if tok.len() < 8 {
                        errors.push(
                            format!("{path}.tokens[{j}]"),
                            "tokens must be at least 8 characters",
                        );
                    }
                    if !tokens.insert(tok.clone()) {
                        errors.push(
                            format!("{path}.tokens[{j}]"),
                            "this token is already given to another user",
                        );
                    }
                }
                users.push(UserConfig {
                    acl: acl(
                        &u.publish,
                        &u.subscribe,
                        &u.deny_publish,
                        &u.deny_subscribe,
                        &u.client_id_prefixes,
                        &path,
                        errors,
                    ),
                    name: u.name,
                    password: u.password,
                    certificate: u.certificate,
                    tokens: u.tokens,
                });
            }
        }
        Some(_) => errors.push("auth.users", "must be an array of tables ([[auth.users]])"),
    }
    Some(AuthConfig {
        anonymous: anonymous?,
        users,
        allow_anonymous_on_public,
        allow_plaintext_passwords,
        max_failed_logins,
        failed_login_window,
        jwt: jwt?,
        certificates: certificates?,
    })
}

fn jwt(j: raw::Jwt, errors: &mut Errors) -> JwtConfig {
    let some = |s: String| (!s.is_empty()).then_some(s);
    let mqtt_username = match j.mqtt_username.as_str() {
        "any" => false,
        "claim" => true,
        other => {
            errors.push(
                "auth.jwt.mqtt_username",
                format!(
                    "`{other}`: expected \"any\" (ignored) or \"claim\" (must be the token's user)"
                ),
            );
            false
        }
    };
    for (key, claim) in [
        ("user_claim", &j.user_claim),
        ("publish_claim", &j.publish_claim),
        ("subscribe_claim", &j.subscribe_claim),
    ] {
        if claim.is_empty() {
            errors.push(format!("auth.jwt.{key}"), "must name a claim");
        }
    }
    let config = JwtConfig {
        enabled: j.enabled,
        secret: some(j.secret),
        public_key_file: some(j.public_key_file).map(Into::into),
        jwks_file: some(j.jwks_file).map(Into::into),
        issuer: some(j.issuer),
        audience: some(j.audience),
        leeway: duration(&j.leeway, "auth.jwt.leeway", errors),
        user_claim: j.user_claim,
        publish_claim: j.publish_claim,
        subscribe_claim: j.subscribe_claim,
        match_mqtt_username: mqtt_username,
        acl: acl(
            &j.publish,
            &j.subscribe,
            &j.deny_publish,
            &j.deny_subscribe,
            &j.client_id_prefixes,
            "auth.jwt",
            errors,
        ),
    };
    if config.enabled {
        if config.secret.as_ref().is_some_and(|s| s.len() < 32) {
            errors.push(
                "auth.jwt.secret",
                "must be at least 32 bytes (HS256 keys are as long as the hash)",
            );
        }
        if let Err(e) = meshgate_core::auth::jwt::check(&jwt_spec(&config)) {
            errors.push("auth.jwt", e);
        }
    }
    config
}

/// The core's view of `[auth.jwt]`.
pub fn jwt_spec(c: &JwtConfig) -> meshgate_core::auth::JwtSpec {
    meshgate_core::auth::JwtSpec {
        secret: c.secret.clone(),
        public_key_file: c.public_key_file.clone(),
        jwks_file: c.jwks_file.clone(),
        issuer: c.issuer.clone(),
        audience: c.audience.clone(),
        leeway: c.leeway,
        user_claim: c.user_claim.clone(),
        publish_claim: c.publish_claim.clone(),
        subscribe_claim: c.subscribe_claim.clone(),
        match_mqtt_username: c.match_mqtt_username,
        permissions: meshgate_core::Permissions {
            publish: c.acl.publish.clone(),
            subscribe: c.acl.subscribe.clone(),
            deny_publish: c.acl.deny_publish.clone(),
            deny_subscribe: c.acl.deny_subscribe.clone(),
            client_id_prefixes: c.acl.client_id_prefixes.clone(),
        },
    }
}
