use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn errors_of(text: &str, e: &[(&str, &str)]) -> Vec<ConfigError> {
    load_str(text, "test.toml", env(e)).unwrap_err().0
}

fn has(errors: &[ConfigError], path: &str, needle: &str) -> bool {
    errors
        .iter()
        .any(|e| e.path == path && e.message.contains(needle))
}

#[test]
fn defaults_are_valid_and_documented_values() {
    let c = Config::default();
    assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.http.max_body_size, 1 << 20);
    assert_eq!(c.backbone.kind, BackboneKind::Memory);
    // A slow or stuck subscriber costs only itself by default (review F3).
    assert_eq!(c.backbone.memory.full_policy, FullQueuePolicy::Block);
    assert_eq!(c.websocket.publish_topic, PublishTopic::Subject);
    assert!(c.auth.anonymous.enabled);
    assert!(c.auth.users.is_empty());
    assert_eq!(c.gateway.shutdown_grace, Duration::from_secs(10));
}

#[test]
fn file_overrides_defaults() {
    let c = load_str(
        "[http]\nlisten = \"0.0.0.0:1234\"\nmax_body_size = 65536\n[backbone.memory]\nfull_policy = \"drop\"\n",
        "t",
        Vec::new(),
    )
    .unwrap();
    assert_eq!(c.http.listen.to_string(), "0.0.0.0:1234");
    assert_eq!(c.http.max_body_size, 65536);
    assert_eq!(c.backbone.memory.full_policy, FullQueuePolicy::Drop);
    assert_eq!(c.websocket.path, "/ws", "untouched keys keep defaults");
}

#[test]
fn env_overrides_scalars_nested_lists_and_users() {
    let c = load_str(
        "",
        "t",
        env(&[
            ("MESHGATE__HTTP__LISTEN", "0.0.0.0:9999"),
            ("MESHGATE__BACKBONE__MEMORY__QUEUE_CAPACITY", "10"),
            ("MESHGATE__WEBSOCKET__REQUIRE_SUBPROTOCOL", "false"),
            ("MESHGATE__AUTH__ANONYMOUS__PUBLISH", "a/#, b/+"),
            ("MESHGATE__AUTH__ANONYMOUS__SUBSCRIBE", "[\"x/#\"]"),
            ("MESHGATE__AUTH__ALLOW_PLAINTEXT_PASSWORDS", "true"),
            ("MESHGATE__AUTH__USERS__0__NAME", "dev"),
            ("MESHGATE__AUTH__USERS__0__PASSWORD", "123"),
            ("MESHGATE__AUTH__USERS__0__TOKENS", "token-one-123"),
            ("OTHER_VAR", "ignored"),
        ]),
    )
    .unwrap();
    assert_eq!(c.http.listen.port(), 9999);
    assert_eq!(c.backbone.memory.queue_capacity, 10);
    assert!(!c.websocket.require_subprotocol);
    assert_eq!(c.auth.anonymous.acl.publish, vec!["a/#", "b/+"]);
    assert_eq!(c.auth.anonymous.acl.subscribe, vec!["x/#"]);
    assert_eq!(c.auth.users[0].name, "dev");
    assert_eq!(
        c.auth.users[0].password.as_deref(),
        Some("123"),
        "stays a string"
    );
    assert_eq!(c.auth.users[0].tokens, vec!["token-one-123"]);
}

#[test]
fn env_errors_name_the_variable() {
    let errs = errors_of(
        "",
        &[
            ("MESHGATE__HTTP__LISTNE", "x"),
            ("MESHGATE__HTTP__MAX_IN_FLIGHT", "many"),
        ],
    );
    assert!(
        errs.iter()
            .any(|e| e.path.contains("MESHGATE__HTTP__LISTNE") && e.message.contains("unknown")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.path.contains("MESHGATE__HTTP__MAX_IN_FLIGHT")
                && e.message.contains("integer")),
        "{errs:?}"
    );
    let errs = errors_of("", &[("MESHGATE__NOPE__X", "1")]);
    assert!(
        errs.iter().any(|e| e.path == "MESHGATE__NOPE__X"),
        "{errs:?}"
    );
}

#[test]
fn every_error_at_once_with_paths() {
    let errs = errors_of(
        "[http]\nlisten = \"nowhere\"\nmax_body_size = 100\nbogus = 1\n\n[websocket]\nslow_consumer = \"sometimes\"\nmax_connections = \"lots\"\n\n[mystery]\nx = 1\n\n[backbone.memory]\nblock_timeout = \"soon\"\n",
        &[],
    );
    let text = ConfigErrors(errs.clone()).to_string();
    assert!(has(&errs, "http.listen", "socket address"), "{text}");
    assert!(has(&errs, "http.max_body_size", "64 KiB"), "{text}");
    assert!(has(&errs, "http.bogus", "unknown key"), "{text}");
    assert!(has(&errs, "websocket.max_connections", ""), "{text}");
    assert!(has(&errs, "mystery", "unknown section"), "{text}");
    assert!(
        has(&errs, "backbone.memory.block_timeout", "duration"),
        "{text}"
    );
}

#[test]
fn mqtt_retained_and_client_id_bounds_are_checked() {
    let errs = errors_of(
        "[mqtt]\nmax_client_id_len = 10\nmax_retained_messages = 0\nmax_retained_bytes = \"1KiB\"\nmax_retained_send_bytes = -1\n[backbone.jetstream]\nretained_max_bytes = \"1KiB\"\nsessions_max_bytes = 0\nkv_max_value_size = \"100\"\n",
        &[],
    );
    let text = ConfigErrors(errs.clone()).to_string();
    for key in [
        "mqtt.max_client_id_len",
        "mqtt.max_retained_messages",
        "mqtt.max_retained_bytes",
        "mqtt.max_retained_send_bytes",
        "backbone.jetstream.retained_max_bytes",
        "backbone.jetstream.sessions_max_bytes",
        "backbone.jetstream.kv_max_value_size",
    ] {
        assert!(has(&errs, key, ""), "{key}: {text}");
    }
    assert!(has(&errs, "mqtt.max_client_id_len", "23"), "{text}");
}

#[test]
fn type_error_in_one_section_does_not_hide_others() {
    let errs = errors_of(
        "[http]\nenabled = \"yes\"\n[websocket]\npath = \"ws\"\n[log]\nformat = \"xml\"\n",
        &[],
    );
    assert!(has(&errs, "http.enabled", ""), "{errs:?}");
    assert!(has(&errs, "websocket.path", "must be a path"), "{errs:?}");
    assert!(has(&errs, "log.format", "pretty, json"), "{errs:?}");
}

#[test]
fn syntax_errors_give_line_and_column() {
    let errs = errors_of("[http]\nlisten = \n", &[]);
    assert_eq!(errs.len(), 1);
    assert!(errs[0].message.contains("line 2"), "{errs:?}");
}

#[test]
fn sizes_and_durations() {
    assert_eq!(check::parse_size("64KiB").unwrap(), 65536);
    assert_eq!(check::parse_size("1 MiB").unwrap(), 1 << 20);
    assert_eq!(check::parse_size("1MB").unwrap(), 1_000_000);
    assert_eq!(check::parse_size("512kB").unwrap(), 512_000);
    assert_eq!(check::parse_size("10").unwrap(), 10);
    assert!(check::parse_size("ten").is_err());
    assert!(check::parse_size("1 parsec").is_err());
    let c = load_str("[websocket]\nping_interval = \"1m\"\n", "t", Vec::new()).unwrap();
    assert_eq!(c.websocket.ping_interval, Duration::from_secs(60));
}

#[test]
fn auth_rules() {
    let errs = errors_of(
        r#"
[[auth.users]]
name = "a/b"
publish = ["x/#/y"]
[[auth.users]]
name = "dup"
password = "pw"
tokens = ["short"]
[[auth.users]]
name = "dup"
tokens = ["long-enough-token"]
[[auth.users]]
name = "other"
tokens = ["long-enough-token"]
colour = "blue"
"#,
        &[],
    );
    let text = ConfigErrors(errs.clone()).to_string();
    assert!(has(&errs, "auth.users[0].name", "without"), "{text}");
    assert!(
        has(&errs, "auth.users[0]", "neither a password nor tokens"),
        "{text}"
    );
    assert!(has(&errs, "auth.users[0].publish[0]", "#"), "{text}");
    assert!(
        has(&errs, "auth.users[1].tokens[0]", "8 characters"),
        "{text}"
    );
    assert!(has(&errs, "auth.users[2].name", "twice"), "{text}");
    assert!(
        has(&errs, "auth.users[3].tokens[0]", "another user"),
        "{text}"
    );
    assert!(has(&errs, "auth.users[3].colour", "unknown key"), "{text}");
    assert!(!text.contains("pw"), "no secrets in messages: {text}");
}

#[test]
fn acl_deny_lists() {
    let c = load_str(
        r##"
[auth]
allow_plaintext_passwords = true
[auth.anonymous]
enabled = true
deny_subscribe = ["test/nosubscribe"]
[[auth.users]]
name = "dev"
password = "pw"
publish = ["devices/{clientid}/#"]
deny_publish = ["devices/{clientid}/config"]
subscribe = ["#"]
deny_subscribe = ["$SYS/#", "secret/{user}/#"]
"##,
        "t",
        Vec::new(),
    )
    .unwrap();
    let anon = &c.auth.anonymous.acl;
    // The defaults' allow lists stay; the deny list is added.
    assert_eq!(anon.publish, vec!["#"]);
    assert_eq!(anon.subscribe, vec!["#"]);
    assert_eq!(anon.deny_subscribe, vec!["test/nosubscribe"]);
    assert!(anon.deny_publish.is_empty());
    let dev = &c.auth.users[0].acl;
    assert_eq!(dev.deny_publish, vec!["devices/{clientid}/config"]);
    assert_eq!(dev.deny_subscribe, vec!["$SYS/#", "secret/{user}/#"]);
    // And from the environment.
    let c = load_str(
        "",
        "t",
        env(&[
            (
                "MESHGATE__AUTH__ANONYMOUS__DENY_SUBSCRIBE",
                "test/nosubscribe, a/+",
            ),
            ("MESHGATE__AUTH__USERS__0__NAME", "dev"),
            ("MESHGATE__AUTH__USERS__0__TOKENS", "dev-token-0001"),
            ("MESHGATE__AUTH__USERS__0__DENY_PUBLISH", "[\"x/#\"]"),
        ]),
    )
    .unwrap();
    assert_eq!(
        c.auth.anonymous.acl.deny_subscribe,
        vec!["test/nosubscribe", "a/+"]
    );
    assert_eq!(c.auth.users[0].acl.deny_publish, vec!["x/#"]);
}

#[test]
fn acl_errors_name_the_key() {
    let errs = errors_of(
        r##"
[auth.anonymous]
enabled = true
deny_subscribe = ["ok", "a/#/b"]
[[auth.users]]
name = "dev"
password = "pw"
publish = ["devices/{client_id}/#"]
deny_subscribe = ["{clientid}#"]
deny = ["x"]
"##,
        &[],
    );
    let text = ConfigErrors(errs.clone()).to_string();
    assert!(
        has(
            &errs,
            "auth.anonymous.deny_subscribe[1]",
            "`#` must be the last"
        ),
        "{text}"
    );
    assert!(
        has(
            &errs,
            "auth.users[0].publish[0]",
            "unknown template `{client_id}`"
        ),
        "{text}"
    );
    assert!(has(&errs, "auth.users[0].deny_subscribe[0]", "#"), "{text}");
    assert!(has(&errs, "auth.users[0].deny", "unknown key"), "{text}");
    let errs = errors_of(
        "[auth.anonymous]\nenabled = true\ndeny_publish = \"x\"\n",
        &[],
    );
    assert!(
        has(&errs, "auth.anonymous.deny_publish", "sequence"),
        "{errs:?}"
    );
}

#[test]
fn unknown_backbone_kinds_list_the_known_ones() {
    let errs = errors_of("[backbone]\nkind = \"kafka\"\n", &[]);
    assert!(
        has(&errs, "backbone.kind", "memory, nats, jetstream"),
        "{errs:?}"
    );
}

#[test]
fn jetstream_settings_are_checked() {
    let c = load_str("[backbone]\nkind = \"jetstream\"\n", "t", Vec::new()).unwrap();
    assert_eq!(c.backbone.kind, BackboneKind::JetStream);
    assert_eq!(c.backbone.jetstream.max_bytes, 1 << 30);
    assert_eq!(c.backbone.jetstream.publish_connections, 2);
    let errs = errors_of(
        "[backbone.jetstream]\nstream = \"a.b\"\nbackoff = [\"1s\", \"2s\"]\nmax_deliver = 2\ndead_letter_subject = \"dl.>\"\npublish_connections = 17\n",
        &[],
    );
    assert!(
        has(
            &errs,
            "backbone.jetstream.publish_connections",
            "at most 16"
        ),
        "{errs:?}"
    );
    assert!(
        has(&errs, "backbone.jetstream.stream", "stream name"),
        "{errs:?}"
    );
    assert!(
        has(&errs, "backbone.jetstream.backoff", "max_deliver"),
        "{errs:?}"
    );
    assert!(
        has(&errs, "backbone.jetstream.dead_letter_subject", "wildcards"),
        "{errs:?}"
    );
    assert_eq!(
        c.backbone.jetstream.publish_timeout,
        std::time::Duration::from_secs(5)
    );
    for bad in ["\"50ms\"", "\"2m\"", "\"soon\""] {
        let errs = errors_of(
            &format!("[backbone.jetstream]\npublish_timeout = {bad}\n"),
            &[],
        );
        assert!(
            has(&errs, "backbone.jetstream.publish_timeout", ""),
            "{bad}: {errs:?}"
        );
    }
    assert_eq!(
        c.backbone.jetstream.subscriptions,
        JetStreamSubscriptions::InstanceFeed
    );
    // Replicated streams take either mode (the instance feed reads through the leader).
    let ok = load_str(
        "[backbone.jetstream]\nreplicas = 3\n",
        "test.toml",
        env(&[]),
    );
    assert!(ok.is_ok(), "{ok:?}");
    let ok = load_str(
        "[backbone.jetstream]\nreplicas = 3\nsubscriptions = \"consumer_each\"\n",
        "test.toml",
        env(&[]),
    );
    assert!(ok.is_ok(), "{ok:?}");
    let errs = errors_of("[backbone.jetstream]\nsubscriptions = \"feed\"\n", &[]);
    assert!(
        has(
            &errs,
            "backbone.jetstream.subscriptions",
            "consumer_each, instance_feed"
        ),
        "{errs:?}"
    );
    let errs = errors_of("[backbone.jetstream]\npublish_connections = 0\n", &[]);
    assert!(
        has(
            &errs,
            "backbone.jetstream.publish_connections",
            "at least 1"
        ),
        "{errs:?}"
    );
}

#[test]
fn nats_backbone_settings_are_checked() {
    let c = load_str(
        "[backbone]\nkind = \"nats\"\n",
        "t",
        env(&[(
            "MESHGATE__BACKBONE__NATS__URLS",
            "nats://10.0.0.1:4222, tls://10.0.0.2:4222",
        )]),
    )
    .unwrap();
    assert_eq!(c.backbone.kind, BackboneKind::Nats);
    assert_eq!(c.backbone.nats.urls.len(), 2);
    assert_eq!(c.backbone.nats.wire_mode, NatsWireMode::Structured);
    assert_eq!(c.backbone.nats.max_control_line, 4096);
    assert_eq!(c.backbone.nats.subscription_bytes, 64 << 20);
    let errs = errors_of("[backbone.nats]\nsubscription_bytes = 100\n", &[]);
    assert!(
        has(&errs, "backbone.nats.subscription_bytes", "below 64 KiB"),
        "{errs:?}"
    );
    let c = load_str(
        "[backbone.nats]\nmax_control_line = \"8KiB\"\n",
        "t",
        Vec::new(),
    )
    .unwrap();
    assert_eq!(c.backbone.nats.max_control_line, 8192);
    let errs = errors_of(
        "[backbone.nats]\nurls = [\"http://x:1\"]\nsubject_prefix = \"a..b\"\nwire_mode = \"xml\"\nuser = \"u\"\nmax_control_line = 100\n",
        &[],
    );
    assert!(
        has(&errs, "backbone.nats.urls", "nats:// or tls://"),
        "{errs:?}"
    );
    assert!(
        has(
            &errs,
            "backbone.nats.subject_prefix",
            "not a subject prefix"
        ),
        "{errs:?}"
    );
    assert!(
        has(&errs, "backbone.nats.wire_mode", "structured, binary"),
        "{errs:?}"
    );
    assert!(
        has(&errs, "backbone.nats.password", "go together"),
        "{errs:?}"
    );
    assert!(
        has(
            &errs,
            "backbone.nats.max_control_line",
            "below the 512 bytes"
        ),
        "{errs:?}"
    );
    let shown = format!(
        "{:?}",
        load_str("[backbone.nats]\ntoken = \"s3cret\"\n", "t", Vec::new())
            .unwrap()
            .backbone
            .nats
    );
    assert!(!shown.contains("s3cret"), "{shown}");
}

#[test]
fn publish_topic_fixed() {
    let c = load_str(
        "[websocket]\npublish_topic = \"fixed:browser/in\"\n",
        "t",
        Vec::new(),
    )
    .unwrap();
    assert_eq!(
        c.websocket.publish_topic,
        PublishTopic::Fixed("browser/in".into())
    );
    let errs = errors_of("[websocket]\npublish_topic = \"fixed:a/+\"\n", &[]);
    assert!(
        has(&errs, "websocket.publish_topic", "wildcard"),
        "{errs:?}"
    );
}

#[test]
fn missing_file_names_the_path() {
    let e = load(
        Some(std::path::Path::new("/nonexistent/meshgate.toml")),
        Vec::new(),
    )
    .unwrap_err();
    assert_eq!(e.0[0].path, "/nonexistent/meshgate.toml");
}

#[test]
fn debug_output_hides_secrets() {
    let c = load_str(
        "[auth]\nallow_plaintext_passwords = true\n[[auth.users]]\nname = \"u\"\npassword = \"hunter2\"\ntokens = [\"secret-token-1\"]\n",
        "t",
        Vec::new(),
    )
    .unwrap();
    let dbg = format!("{c:?}");
    assert!(
        !dbg.contains("hunter2") && !dbg.contains("secret-token-1"),
        "{dbg}"
    );
}

#[test]
fn mqtt_write_timeout_and_max_keep_alive_are_checked() {
    let errors = errors_of(
        "[mqtt]\nwrite_timeout = \"0s\"\nmax_keep_alive = \"70000s\"\n",
        &[],
    );
    assert!(
        has(&errors, "mqtt.write_timeout", "longer than 0s"),
        "{errors:?}"
    );
    assert!(has(&errors, "mqtt.max_keep_alive", "65535s"), "{errors:?}");
    let errors = errors_of(
        "[mqtt]\nwrite_timeout = \"soon\"\nmax_keep_alive = \"0s\"\n",
        &[],
    );
    assert!(has(&errors, "mqtt.write_timeout", "duration"), "{errors:?}");
    assert!(
        has(&errors, "mqtt.max_keep_alive", "between 1s"),
        "{errors:?}"
    );
    let c = load_str("", "t", Vec::new()).unwrap();
    assert_eq!(c.mqtt.write_timeout, Duration::from_secs(30));
    assert_eq!(c.mqtt.max_keep_alive, Duration::from_secs(3600));
}

#[test]
fn mqtt_tls_and_session_settings_are_checked() {
    let errors = errors_of(
        "[mqtt]\ntls_listen = \"0.0.0.0:8883\"\ntls_key_file = \"/nonexistent/key.pem\"\nmax_session_expiry = \"forever\"\nmax_offline_sessions = -1\n",
        &[],
    );
    assert!(has(&errors, "mqtt.tls_cert_file", "required"), "{errors:?}");
    assert!(
        has(&errors, "mqtt.tls_key_file", "not a readable file"),
        "{errors:?}"
    );
    assert!(
        has(&errors, "mqtt.max_session_expiry", "duration"),
        "{errors:?}"
    );
    assert!(
        has(&errors, "mqtt.max_offline_sessions", "0 or more"),
        "{errors:?}"
    );
    let c = load_str("[mqtt]\nmax_session_expiry = \"0s\"\n", "t", Vec::new()).unwrap();
    assert_eq!(
        c.mqtt.max_session_expiry,
        Duration::ZERO,
        "0 turns persistence off"
    );
    assert!(c.mqtt.tls.is_none(), "TLS is off by default");
}

#[test]
fn amqp_defaults_are_valid() {
    let c = Config::default();
    assert!(!c.amqp.enabled, "the AMQP bridge is off by default");
    assert_eq!(c.amqp.url, "amqp://127.0.0.1:5672");
    assert_eq!(c.amqp.vhost, "/");
    assert_eq!(c.amqp.user, "guest");
    assert!(c.amqp.ca_file.is_none());
    assert_eq!(c.amqp.heartbeat, Duration::from_secs(30));
    assert_eq!(c.amqp.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.amqp.reconnect_min, Duration::from_millis(200));
    assert_eq!(c.amqp.reconnect_max, Duration::from_secs(10));
    assert!(c.amqp.sources.is_empty() && c.amqp.sinks.is_empty());
    assert_eq!(c.amqp.max_body_size, 1 << 20);
    let c = load_str(
        "[amqp]\nenabled = true\nurl = \"amqps://rabbit.example.com:5671\"\n",
        "t",
        Vec::new(),
    )
    .unwrap();
    assert!(c.amqp.enabled);
    assert_eq!(c.amqp.url, "amqps://rabbit.example.com:5671");
}

#[test]
fn amqp_max_body_size_is_checked() {
    let errs_of = |v: &str| errors_of(&format!("[amqp]\nmax_body_size = {v}\n"), &[]);
    for bad in ["0", "-1", "\"1TiB\"", "\"513MiB\"", "\"lots\""] {
        let errs = errs_of(bad);
        assert!(has(&errs, "amqp.max_body_size", ""), "{bad}: {errs:?}");
    }
    let c = load_str("[amqp]\nmax_body_size = \"64KiB\"\n", "test.toml", env(&[])).unwrap();
    assert_eq!(c.amqp.max_body_size, 64 << 10);
}

#[test]
fn amqp_url_is_only_scheme_host_and_port() {
    let url_errors = |url: &str| errors_of(&format!("[amqp]\nurl = \"{url}\"\n"), &[]);
    let errs = url_errors("amqp://u:p@h:5672");
    assert!(has(&errs, "amqp.url", "amqp.user"), "{errs:?}");
    assert!(
        !ConfigErrors(errs.clone()).to_string().contains("u:p"),
        "the URL's credentials are not repeated: {errs:?}"
    );
    let errs = url_errors("amqp://h:5672/vhost");
    assert!(has(&errs, "amqp.url", "amqp.vhost"), "{errs:?}");
    let errs = url_errors("http://x");
    assert!(has(&errs, "amqp.url", "amqp:// or amqps://"), "{errs:?}");
    let errs = url_errors("127.0.0.1:5672");
    assert!(has(&errs, "amqp.url", "not a broker URL"), "{errs:?}");
    let errs = url_errors("amqp://h:port");
    assert!(has(&errs, "amqp.url", "not a port number"), "{errs:?}");
    for ok in ["amqp://h", "amqp://[::1]:5672", "amqps://h:5671"] {
        let c = load_str(&format!("[amqp]\nurl = \"{ok}\"\n"), "t", Vec::new());
        assert!(c.is_ok(), "{ok}: {c:?}");
    }
}

#[test]
fn amqp_sources_are_checked() {
    let errs = errors_of(
        r##"
[[amqp.sources]]
name = "nothing"
[[amqp.sources]]
name = "no-keys"
exchange = "x"
[[amqp.sources]]
name = "no-exchange"
queue = "q"
binding_keys = ["#"]
[[amqp.sources]]
name = "zero"
queue = "q"
prefetch = 0
[[amqp.sources]]
name = "huge"
queue = "q"
prefetch = 70000
[[amqp.sources]]
name = "typo"
queue = "q"
bogus = 1
"##,
        &[],
    );
    let text = ConfigErrors(errs.clone()).to_string();
    assert!(
        has(&errs, "amqp.sources[0].queue", "`exchange`"),
        "neither queue nor exchange: {text}"
    );
    assert!(
        has(&errs, "amqp.sources[1].binding_keys", "at least one"),
        "{text}"
    );
    assert!(
        has(&errs, "amqp.sources[2].binding_keys", "need `exchange`"),
        "{text}"
    );
    assert!(
        has(&errs, "amqp.sources[3].prefetch", "at least 1"),
        "{text}"
    );
    assert!(
        has(&errs, "amqp.sources[4].prefetch", "at most 65535"),
        "{text}"
    );
    assert!(has(&errs, "amqp.sources[5].bogus", "unknown key"), "{text}");
    assert_eq!(errs.len(), 6, "one error each: {text}");
}

#[test]
fn amqp_sinks_are_checked() {
    let errs = errors_of(
        r##"
[[amqp.sinks]]
name = "bad-filter"
filter = "a/#/b"
[[amqp.sinks]]
name = "bad-key"
filter = "#"
routing_key = "x.{nope}"
[[amqp.sinks]]
name = "bad-mode"
filter = "#"
mode = "weird"
"##,
        &[],
    );
    let text = ConfigErrors(errs.clone()).to_string();
    assert!(has(&errs, "amqp.sinks[0].filter", "#"), "{text}");
    assert!(
        has(&errs, "amqp.sinks[1].routing_key", "unknown placeholder"),
        "{text}"
    );
    assert!(
        has(&errs, "amqp.sinks[1].routing_key", "{topic}, {type}"),
        "the known placeholders are listed: {text}"
    );
    assert!(
        has(&errs, "amqp.sinks[2].mode", "binary, structured"),
        "{text}"
    );
    assert_eq!(errs.len(), 3, "one error each: {text}");
}

#[test]
fn amqp_names_are_unique_across_sources_and_sinks() {
    let errs = errors_of(
        r##"
[[amqp.sources]]
name = "orders"
queue = "q"
[[amqp.sinks]]
name = "orders"
filter = "#"
"##,
        &[],
    );
    assert!(
        has(&errs, "amqp.sinks[0].name", "used by another"),
        "{errs:?}"
    );
    let errs = errors_of(
        "[[amqp.sources]]\nname = \"a\"\nqueue = \"q\"\n[[amqp.sources]]\nname = \"a\"\nqueue = \"q2\"\n",
        &[],
    );
    assert!(
        has(&errs, "amqp.sources[1].name", "used by another"),
        "{errs:?}"
    );
}

#[test]
fn amqp_source_and_sink_defaults() {
    let c = load_str(
        r##"
[[amqp.sources]]
name = "legacy"
exchange = "orders"
binding_keys = ["#"]
[[amqp.sources]]
name = "existing"
queue = "their.queue"
wrap_source = "/legacy/orders"
[[amqp.sinks]]
name = "out"
filter = "orders/#"
exchange = "mesh"
routing_key = "x.{type}.{topic}"
mode = "structured"
"##,
        "t",
        Vec::new(),
    )
    .unwrap();
    let s = &c.amqp.sources[0];
    assert_eq!(
        s.queue, "meshgate.legacy",
        "meshgate names the queue it declares"
    );
    assert_eq!(s.exchange.as_deref(), Some("orders"));
    assert_eq!(s.binding_keys, vec!["#"]);
    assert_eq!(s.wrap_source, "/meshgate/amqp/legacy");
    assert_eq!(s.wrap_type, "io.meshgate.amqp.message");
    assert_eq!(s.prefetch, 256);
    assert_eq!(s.topic_prefix, None);
    let s = &c.amqp.sources[1];
    assert_eq!(s.queue, "their.queue");
    assert_eq!(s.exchange, None);
    assert_eq!(s.wrap_source, "/legacy/orders");
    let k = &c.amqp.sinks[0];
    assert_eq!(k.mode, AmqpMode::Structured);
    assert_eq!(k.routing_key, "x.{type}.{topic}");
    assert!(k.persistent && k.mandatory);
    assert_eq!(k.max_in_flight, 256);
}

#[test]
fn amqp_debug_output_hides_the_password() {
    let c = load_str(
        "[amqp]\nuser = \"mesh\"\npassword = \"rabbit-s3cret\"\n",
        "t",
        Vec::new(),
    )
    .unwrap();
    assert_eq!(c.amqp.password, "rabbit-s3cret");
    let dbg = format!("{:?}", c.amqp);
    assert!(!dbg.contains("rabbit-s3cret"), "{dbg}");
    assert!(dbg.contains("mesh"), "the user is shown: {dbg}");
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("rabbit-s3cret"), "{dbg}");
    let c = load_str("", "t", env(&[("MESHGATE__AMQP__PASSWORD", "env-s3cret")])).unwrap();
    assert_eq!(c.amqp.password, "env-s3cret");
    assert!(!format!("{:?}", c.amqp).contains("env-s3cret"));
}

#[test]
fn web_listener_bounds_are_checked_and_name_their_keys() {
    let errs = errors_of(
        "[http]\nheader_read_timeout = \"0s\"\nmax_header_size = 100\nidle_timeout = \"soon\"\nmax_connections = 0\n[admin]\nmax_connections = -1\n[websocket]\nmax_filters = 0\nallowed_origins = [\"example.com\", \"https://ok.example\"]\n",
        &[],
    );
    let text = ConfigErrors(errs.clone()).to_string();
    assert!(
        has(&errs, "http.header_read_timeout", "longer than 0s"),
        "{text}"
    );
    assert!(has(&errs, "http.idle_timeout", "duration"), "{text}");
    assert!(has(&errs, "http.max_header_size", "8 KiB"), "{text}");
    let long = errors_of("[http]\nbody_read_timeout = \"1000000000000000s\"\n", &[]);
    assert!(has(&long, "http.body_read_timeout", "24h"), "{long:?}");
    assert!(has(&errs, "http.max_connections", "at least 1"), "{text}");
    assert!(has(&errs, "admin.max_connections", "at least 1"), "{text}");
    assert!(has(&errs, "websocket.max_filters", "at least 1"), "{text}");
    assert!(
        has(
            &errs,
            "websocket.allowed_origins",
            "`example.com` is not an origin"
        ),
        "{text}"
    );
    assert!(!text.contains("ok.example"), "{text}");
    let c = load_str(
        "[websocket]\nallowed_origins = [\"HTTPS://App.Example.com/\", \"*\"]\n",
        "t",
        Vec::new(),
    )
    .unwrap();
    assert_eq!(
        c.websocket.allowed_origins,
        vec!["https://app.example.com", "*"]
    );
    let d = Config::default();
    assert_eq!(d.http.header_read_timeout, Duration::from_secs(10));
    assert_eq!(d.http.idle_timeout, Duration::from_secs(60));
    assert_eq!(d.http.max_connections, 10_000);
    assert_eq!(d.http.max_header_size, 64 * 1024);
    assert_eq!(d.websocket.max_filters, 256);
    assert!(d.websocket.allowed_origins.is_empty());
    assert!(d.http.allowed_origins.is_empty());
    assert_eq!(d.http.body_read_timeout, Duration::from_secs(30));
    let errs = errors_of("[http]\nallowed_origins = [\"null\"]\n", &[]);
    assert!(
        has(&errs, "http.allowed_origins", "not an origin"),
        "{errs:?}"
    );
}

#[test]
fn websocket_outbound_queue_is_bounded_in_bytes() {
    let d = load_str("", "t", Vec::new()).unwrap();
    assert_eq!(d.websocket.outbound_queue_bytes, 16 * 1024 * 1024);
    let c = load_str(
        "[websocket]\noutbound_queue_bytes = \"1MiB\"\n",
        "t",
        Vec::new(),
    )
    .unwrap();
    assert_eq!(c.websocket.outbound_queue_bytes, 1024 * 1024);
    let errs = errors_of("[websocket]\noutbound_queue_bytes = 1000\n", &[]);
    assert!(
        has(&errs, "websocket.outbound_queue_bytes", "below 64 KiB"),
        "{errs:?}"
    );
    // The retired event count names its replacement, from the file or the environment.
    let errs = errors_of("[websocket]\noutbound_queue = 256\n", &[]);
    assert!(
        has(&errs, "websocket.outbound_queue", "outbound_queue_bytes"),
        "{errs:?}"
    );
    let errs = errors_of("", &[("MESHGATE__WEBSOCKET__OUTBOUND_QUEUE", "256")]);
    assert!(
        has(
            &errs,
            "MESHGATE__WEBSOCKET__OUTBOUND_QUEUE (websocket.outbound_queue)",
            "outbound_queue_bytes"
        ),
        "{errs:?}"
    );
}

#[test]
fn an_amqp_source_user_must_be_a_configured_user() {
    let errs = errors_of(
        "[[amqp.sources]]\nname = \"s\"\nqueue = \"q\"\nuser = \"ghost\"\n",
        &[],
    );
    assert!(
        errs.iter()
            .any(|e| e.path == "amqp.sources[0].user" && e.message.contains("ghost")),
        "{errs:?}"
    );
    let ok = load_str(
        "[[auth.users]]\nname = \"app\"\ntokens = [\"app-token-0123456789\"]\n\
         [[amqp.sources]]\nname = \"s\"\nqueue = \"q\"\nuser = \"app\"\n",
        "t",
        Vec::new(),
    )
    .unwrap();
    assert_eq!(ok.amqp.sources[0].user.as_deref(), Some("app"));
}

#[test]
fn passwords_must_be_hashes_unless_plaintext_is_allowed() {
    let hash = meshgate_core::auth::password::hash_password(b"pw", 8, 1).unwrap();
    let doc = |password: &str, plaintext: bool| {
        format!(
            "[auth]\nallow_plaintext_passwords = {plaintext}\nmax_failed_logins = 5\nfailed_login_window = \"30s\"\n[[auth.users]]\nname = \"u\"\npassword = \"{password}\"\n"
        )
    };
    let c = load_str(&doc(&hash, false), "t", Vec::new()).unwrap();
    assert_eq!(c.auth.users[0].password.as_deref(), Some(hash.as_str()));
    assert_eq!(c.auth.max_failed_logins, 5);
    assert_eq!(c.auth.failed_login_window, Duration::from_secs(30));
    let errs = errors_of(&doc("hunter2", false), &[]);
    let text = ConfigErrors(errs.clone()).to_string();
    assert!(
        has(&errs, "auth.users[0].password", "meshgate passwd"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2"),
        "no secret in the message: {text}"
    );
    assert!(load_str(&doc("hunter2", true), "t", Vec::new()).is_ok());
    let errs = errors_of(&doc("$argon2id$v=19$m=8,t=1,p=1$broken", true), &[]);
    assert!(
        has(&errs, "auth.users[0].password", "not a password hash"),
        "{errs:?}"
    );
    let errs = errors_of(
        "[auth]\nmax_failed_logins = -1\nfailed_login_window = 5\n",
        &[],
    );
    assert!(
        has(&errs, "auth.max_failed_logins", "whole number"),
        "{errs:?}"
    );
    assert!(
        has(&errs, "auth.failed_login_window", "duration"),
        "{errs:?}"
    );
}

#[test]
fn jwt_settings_are_checked_when_enabled() {
    let errs = errors_of(
        "[auth.jwt]\nenabled = true\nsecret = \"short\"\nmqtt_username = \"maybe\"\nuser_claim = \"\"\n",
        &[],
    );
    let text = ConfigErrors(errs.clone()).to_string();
    assert!(has(&errs, "auth.jwt.secret", "32 bytes"), "{text}");
    assert!(has(&errs, "auth.jwt.mqtt_username", "claim"), "{text}");
    assert!(has(&errs, "auth.jwt.user_claim", "name a claim"), "{text}");
    assert!(!text.contains("short"), "no secret in messages: {text}");
    let errs = errors_of(
        "[auth.jwt]\nenabled = true\npublic_key_file = \"/nonexistent/jwt.pem\"\n",
        &[],
    );
    assert!(has(&errs, "auth.jwt", "/nonexistent/jwt.pem"), "{errs:?}");
    let errs = errors_of("[auth.jwt]\nenabled = true\n", &[]);
    assert!(has(&errs, "auth.jwt", "no key"), "{errs:?}");
    let c = load_str(
        "[auth.jwt]\nenabled = true\nsecret = \"0123456789abcdef0123456789abcdef\"\nmqtt_username = \"claim\"\nsubscribe = [\"public/#\"]\n",
        "t",
        Vec::new(),
    )
    .unwrap();
    assert!(c.auth.jwt.match_mqtt_username);
    assert_eq!(c.auth.jwt.acl.subscribe, vec!["public/#"]);
    assert!(
        !format!("{c:?}").contains("0123456789abcdef"),
        "Debug hides the secret"
    );
}

#[test]
fn client_id_prefixes_are_checked() {
    let errs = errors_of(
        "[auth.anonymous]\nclient_id_prefixes = [\"\"]\n[[auth.users]]\nname = \"u\"\ntokens = [\"token-of-u-1\"]\nclient_id_prefixes = [\"{clientid}-\", \"{user}-\"]\n",
        &[],
    );
    assert!(
        has(&errs, "auth.anonymous.client_id_prefixes[0]", "1 to 256"),
        "{errs:?}"
    );
    assert!(
        has(&errs, "auth.users[0].client_id_prefixes[0]", "`{user}`"),
        "{errs:?}"
    );
    assert!(
        !errs
            .iter()
            .any(|e| e.path == "auth.users[0].client_id_prefixes[1]"),
        "{errs:?}"
    );
}

#[test]
fn env_sets_a_users_certificate_flag_and_client_id_prefixes() {
    let c = load_str(
        "",
        "t",
        env(&[
            ("MESHGATE__AUTH__USERS__0__NAME", "svc"),
            ("MESHGATE__AUTH__USERS__0__CERTIFICATE", "true"),
            (
                "MESHGATE__AUTH__USERS__0__CLIENT_ID_PREFIXES",
                "svc-, legacy-",
            ),
        ]),
    )
    .unwrap();
    assert!(c.auth.users[0].certificate);
    assert_eq!(
        c.auth.users[0].acl.client_id_prefixes,
        vec!["svc-", "legacy-"]
    );
    let errs = errors_of("[auth]\nfailed_login_window = \"0s\"\n", &[]);
    assert!(
        has(&errs, "auth.failed_login_window", "longer than 0"),
        "{errs:?}"
    );
}

#[test]
fn tracing_is_off_by_default_and_checked_when_set() {
    let c = Config::default();
    assert!(!c.tracing.enabled);
    assert_eq!(c.tracing.endpoint, "http://127.0.0.1:4318/v1/traces");
    let c = load_str(
        "",
        "t",
        env(&[
            ("MESHGATE__TRACING__ENABLED", "true"),
            ("MESHGATE__TRACING__SAMPLE_RATIO", "0.25"),
        ]),
    )
    .unwrap();
    assert!(c.tracing.enabled);
    assert!((c.tracing.sample_ratio - 0.25).abs() < f64::EPSILON);
    let e = errors_of(
        "[tracing]\nendpoint = \"collector:4318\"\nsample_ratio = 2.0\nservice_name = \" \"\nmax_queued_spans = 0\n",
        &[],
    );
    let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "tracing.endpoint",
            "tracing.sample_ratio",
            "tracing.service_name",
            "tracing.max_queued_spans"
        ],
        "{e:?}"
    );
    assert!(e[0].message.contains("http://"), "{}", e[0].message);
}
