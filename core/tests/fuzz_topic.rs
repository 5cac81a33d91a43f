//! Fuzz target `fuzz_topic`: topic and filter parsing from every protocol's form (MQTT, URL
//! path, NATS subject, AMQP routing key) on random and mutated input: no panic; what parses
//! maps to NATS, AMQP and a URL path and back to the same topic; a filter that covers another
//! matches every topic the other matches (the `$` rule included).

use meshgate_core::{Topic, TopicFilter};

const SEEDS: &[&[u8]] = &[
    b"sensors/42/temperature",
    b"$SYS/broker/load\n#",
    b"a/+/c\n+/#",
    b"x y/*.>/%2F/\xc3\xa9\xe2\x82\xac",
    b"/\n//\na//b",
    b"$share/g/a/#\n$x/x",
];

fn check(input: Vec<u8>) -> Result<(), String> {
    let text = String::from_utf8_lossy(&input);
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or_default();
    let second = lines.next().unwrap_or_default();
    // Every reader takes every string without panicking.
    let _ = Topic::from_url_path(first);
    let _ = Topic::from_nats_subject("meshgate", first);
    let _ = Topic::from_nats_subject("", first);
    let _ = Topic::from_amqp_routing_key(first);
    let _ = TopicFilter::from_template(first, "user");
    let topics: Vec<Topic> = [first, second]
        .iter()
        .filter_map(|s| Topic::from_mqtt(s).ok())
        .collect();
    let filters: Vec<TopicFilter> = [first, second]
        .iter()
        .filter_map(|s| TopicFilter::parse(s).ok())
        .collect();
    for t in &topics {
        let back = Topic::from_nats_subject("meshgate", &t.to_nats_subject("meshgate"))
            .map_err(|e| format!("NATS form of {t:?}: {e}"))?;
        if &back != t {
            return Err(format!("{t:?} -> NATS -> {back:?}"));
        }
        let back = Topic::from_amqp_routing_key(&t.to_amqp_routing_key())
            .map_err(|e| format!("AMQP form of {t:?}: {e}"))?;
        if &back != t {
            return Err(format!("{t:?} -> AMQP -> {back:?}"));
        }
        let back =
            Topic::from_url_path(&t.to_url_path()).map_err(|e| format!("URL of {t:?}: {e}"))?;
        if &back != t {
            return Err(format!("{t:?} -> URL -> {back:?}"));
        }
        if !TopicFilter::from(t.clone()).matches(t) {
            return Err(format!("{t:?} does not match itself as a filter"));
        }
    }
    for f in &filters {
        let _ = f.to_nats_subjects("meshgate");
        let _ = f.to_amqp_binding_key();
        if !f.covers(f) {
            return Err(format!("{f:?} does not cover itself"));
        }
        for g in &filters {
            if f.covers(g) {
                for t in &topics {
                    if g.matches(t) && !f.matches(t) {
                        return Err(format!("{f:?} covers {g:?} but only {g:?} matches {t:?}"));
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_topic() {
    meshgate_fuzz::run(
        "fuzz_topic",
        meshgate_fuzz::bytes("fuzz_topic", SEEDS, 64),
        |b| Some(b.to_vec()),
        check,
    );
}
