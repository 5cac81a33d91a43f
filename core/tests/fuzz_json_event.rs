//! Fuzz target `fuzz_json_event`: the JSON event reader (the scanner for the usual shape,
//! serde_json for the rest) and the batch reader, on random and mutated input; and the writer:
//! `decode(encode(e)) == e` for generated events. See fuzz/src/lib.rs for running it longer.

use meshgate_core::event::{Data, Event, ExtensionValue};
use meshgate_core::json;
use meshgate_fuzz::proptest::prelude::*;
use serde_json::value::RawValue;

const SEEDS: &[&[u8]] = &[
    br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"AAE="}"#,
    br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","subject":"a/b","data":{"k":[1,"v",null,true,2.5]},"n":5,"b":false}"#,
    br#"[{"specversion":"1.0","id":"1","source":"/s","type":"t"},{"specversion":"1.0","id":"2","source":"/s","type":"t","datacontenttype":"text/plain","data":"x\u00e9\n"}]"#,
    br#"{"specversion":"1.0","id":"\u0041","source":"/s","type":"t","time":"2026-12-05T10:00:00Z","dataschema":"http://x/y"}"#,
];

/// Reading never panics; what reads as an event writes back to the same event.
fn check(input: Vec<u8>) -> Result<(), String> {
    if let Ok(event) = json::decode(&input) {
        let again = json::decode(&json::encode(&event))
            .map_err(|e| format!("re-reading what was written failed: {e}"))?;
        if again != event {
            return Err(format!("{event:?} was written and read back as {again:?}"));
        }
    }
    if let Ok(events) = json::decode_batch(&input, 1000)
        && events.len() > 1000
    {
        return Err(format!("{} events read past the limit", events.len()));
    }
    // A small limit: the early stop at the limit is on a path of its own.
    let _ = json::decode_batch(&input, 1);
    Ok(())
}

#[test]
fn fuzz_json_event() {
    meshgate_fuzz::run(
        "fuzz_json_event",
        meshgate_fuzz::bytes("fuzz_json_event", SEEDS, 512),
        |b| Some(b.to_vec()),
        check,
    );
}

/// Events of every shape the model allows.
fn events() -> impl Strategy<Value = Event> {
    let text = "(?s).{0,24}";
    (
        ("[ -~é€😀]{1,16}", "/[a-z0-9/._~-]{0,15}", "[ -~]{1,16}"),
        proptest::option::of("[ -~é€😀]{0,24}"),
        proptest::collection::btree_map(
            "[a-z0-9]{1,12}",
            prop_oneof![
                "[ -~é€😀]{0,16}".prop_map(ExtensionValue::String),
                any::<i32>().prop_map(ExtensionValue::Integer),
                any::<bool>().prop_map(ExtensionValue::Boolean),
            ],
            0..4,
        ),
        0..5u8,
        text,
        proptest::collection::vec(any::<u8>(), 0..32),
    )
        .prop_filter_map(
            "not a valid event",
            |((id, source, ty), subject, extensions, kind, text, bytes)| {
                let mut e = Event::new(id, source, ty).ok()?;
                e.set_subject(subject).ok()?;
                for (name, value) in extensions {
                    e.set_extension(&name, value).ok()?;
                }
                match kind {
                    0 => {}
                    1 => e.set_data(Some(Data::Binary(bytes.into()))),
                    2 => {
                        e.set_datacontenttype(Some("text/plain".into())).ok()?;
                        e.set_data(Some(Data::Text(text)));
                    }
                    3 => {
                        e.set_datacontenttype(Some("application/json".into()))
                            .ok()?;
                        let raw = serde_json::json!({ "t": text, "n": [1, -2.5] }).to_string();
                        e.set_data(Some(Data::Json(RawValue::from_string(raw).ok()?)));
                    }
                    _ => {
                        e.set_datacontenttype(Some("application/octet-stream".into()))
                            .ok()?;
                        e.set_data(Some(Data::Binary(bytes.into())));
                    }
                }
                Some(e)
            },
        )
}

#[test]
fn fuzz_json_event_round_trip() {
    meshgate_fuzz::run(
        "fuzz_json_event_round_trip",
        events(),
        |_| None,
        |event| {
            let written = json::encode(&event);
            let read = json::decode(&written)
                .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&written)))?;
            if read != event {
                return Err(format!("{event:?} read back as {read:?}"));
            }
            let batch = format!("[{0},{0}]", String::from_utf8_lossy(&written));
            match json::decode_batch(batch.as_bytes(), 2) {
                Ok(events) if events == [event.clone(), event] => Ok(()),
                other => Err(format!("batch of two read as {other:?}")),
            }
        },
    );
}
