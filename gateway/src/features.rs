//! The Cargo features this meshgate was built with, and the check that a configuration enables
//! nothing the build left out.
//!
//! Without the check a config asking for, say, `mqtt.enabled = true` on a binary built without
//! MQTT would start a gateway that silently does not listen on 1883; it has to fail instead,
//! naming the key and the feature to rebuild with. HTTP ingress, the admin listener and the
//! memory backbone are always compiled in, so the embedded defaults (HTTP + WebSocket on the
//! memory backbone) need only the `websocket` feature.

use std::fmt;

use meshgate_config::{BackboneKind, Config};

/// The features compiled into this binary, sorted (the `features` label of
/// `meshgate_build_info`).
pub const COMPILED: &[&str] = &[
    #[cfg(feature = "amqp")]
    "amqp",
    #[cfg(feature = "mqtt")]
    "mqtt",
    #[cfg(feature = "nats")]
    "nats",
    #[cfg(feature = "websocket")]
    "websocket",
];

/// [`COMPILED`], comma-separated: `"amqp,mqtt,nats,websocket"` for a default build.
pub fn compiled() -> String {
    COMPILED.join(",")
}

/// A config key that enables a part this build does not contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingFeature {
    /// The config key, e.g. `mqtt.enabled`.
    pub key: &'static str,
    /// The configured value, as it is written in TOML (`true`, `"jetstream"`).
    pub value: &'static str,
    /// The Cargo feature that would compile the part in.
    pub feature: &'static str,
}

impl fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {} but this meshgate was built without the \"{}\" feature (cargo build --features {})",
            self.key, self.value, self.feature, self.feature
        )
    }
}

impl std::error::Error for MissingFeature {}

/// Every [`MissingFeature`] of a configuration (all at once, like the config's own errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingFeatures(pub Vec<MissingFeature>);

impl fmt::Display for MissingFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, missing) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{missing}")?;
        }
        Ok(())
    }
}

impl std::error::Error for MissingFeatures {}

/// `Err` with every part `config` enables that this build does not contain.
pub fn check(config: &Config) -> Result<(), MissingFeatures> {
    let missing = missing_from(config, COMPILED);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingFeatures(missing))
    }
}

/// The parts `config` enables that a build with only the features `compiled` lacks; a
/// parameter rather than [`COMPILED`] so that the test covers every combination in any build.
fn missing_from(config: &Config, compiled: &[&str]) -> Vec<MissingFeature> {
    let backbone = match config.backbone.kind {
        BackboneKind::Memory => None,
        BackboneKind::Nats => Some("\"nats\""),
        BackboneKind::JetStream => Some("\"jetstream\""),
    };
    let wanted = [
        (
            "mqtt.enabled",
            config.mqtt.enabled.then_some("true"),
            "mqtt",
        ),
        (
            "websocket.enabled",
            config.websocket.enabled.then_some("true"),
            "websocket",
        ),
        (
            "amqp.enabled",
            config.amqp.enabled.then_some("true"),
            "amqp",
        ),
        ("backbone.kind", backbone, "nats"),
    ];
    wanted
        .into_iter()
        .filter(|(_, _, feature)| !compiled.contains(feature))
        .filter_map(|(key, value, feature)| {
            value.map(|value| MissingFeature {
                key,
                value,
                feature,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[&str] = &["amqp", "mqtt", "nats", "websocket"];

    #[test]
    fn a_part_the_build_lacks_is_reported_with_its_key_and_feature() {
        let mut c = Config::default();
        assert_eq!(missing_from(&c, ALL), vec![]);
        assert_eq!(
            missing_from(&c, &["mqtt", "websocket"]),
            vec![],
            "the embedded defaults run on the minimal build"
        );
        assert_eq!(
            missing_from(&c, &[]),
            vec![MissingFeature {
                key: "websocket.enabled",
                value: "true",
                feature: "websocket"
            }]
        );

        c.mqtt.enabled = true;
        c.amqp.enabled = true;
        c.backbone.kind = BackboneKind::JetStream;
        assert_eq!(missing_from(&c, ALL), vec![]);
        let missing = MissingFeatures(missing_from(&c, &["mqtt", "websocket"]));
        assert_eq!(
            missing.to_string(),
            "amqp.enabled = true but this meshgate was built without the \"amqp\" feature \
             (cargo build --features amqp); backbone.kind = \"jetstream\" but this meshgate was \
             built without the \"nats\" feature (cargo build --features nats)"
        );
        c.backbone.kind = BackboneKind::Nats;
        let keys: Vec<_> = missing_from(&c, &[]).iter().map(|m| m.key).collect();
        assert_eq!(
            keys,
            [
                "mqtt.enabled",
                "websocket.enabled",
                "amqp.enabled",
                "backbone.kind"
            ]
        );
        assert_eq!(missing_from(&c, &[])[3].value, "\"nats\"");
    }

    #[test]
    fn the_compiled_list_is_sorted_and_comma_separated() {
        let mut sorted = COMPILED.to_vec();
        sorted.sort_unstable();
        assert_eq!(COMPILED, sorted.as_slice());
        assert_eq!(compiled().split(',').count(), COMPILED.len().max(1));
        #[cfg(all(
            feature = "amqp",
            feature = "mqtt",
            feature = "nats",
            feature = "websocket"
        ))]
        assert_eq!(compiled(), "amqp,mqtt,nats,websocket");
    }
}
