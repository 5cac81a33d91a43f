//! MQTT 5 topic aliases (§3.3.2.3.4), both ways: those the client sets on its PUBLISHes, and
//! those this connection gives the client on deliveries. Both last as long as the connection,
//! not the session.

use std::collections::HashMap;

use meshgate_core::Topic;
use rumqttd::protocol::DisconnectReasonCode;

/// Topic Alias Maximum meshgate announces to MQTT 5 clients (aliases they may set).
pub(super) const TOPIC_ALIAS_MAX: u16 = 16;

/// Most topic aliases meshgate gives one client (fewer if the client's Topic Alias Maximum is
/// lower): the map is per connection, and a client must not make it grow without bound.
pub(super) const OUT_TOPIC_ALIAS_MAX: u16 = 64;

/// A connection's topic aliases.
pub(super) struct TopicAliases {
    /// Topic aliases the client set (MQTT 5), allocated on first use. Boxed: `None` costs 8
    /// bytes instead of a map's 48 on every idle connection.
    #[allow(clippy::box_collection)]
    from_client: Option<Box<HashMap<u16, Topic>>>,
    /// Topic aliases this connection gave its client (MQTT 5 Topic Alias Maximum > 0), made
    /// on first use.
    to_client: Option<Box<OutAliases>>,
    /// Topic Alias Maximum the client announced in CONNECT (0: no aliases to it).
    client_max: u16,
}

/// Topic aliases given to a client (MQTT 5 §3.3.2.3.4): the first topics it is sent get one,
/// up to its Topic Alias Maximum; after that, topics go in full. Later PUBLISHes on an
/// aliased topic carry the alias and an empty topic.
#[derive(Debug, Default)]
struct OutAliases {
    by_topic: HashMap<Topic, u16>,
}

/// How a topic goes to the client (see [`TopicAliases::peek`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OutAlias {
    /// The alias to send, if any.
    pub(super) alias: Option<u16>,
    /// The alias is new: the PUBLISH gives it ([`TopicAliases::give`] once written).
    pub(super) new: bool,
    /// The topic goes in full (false: an alias the client already has, empty topic name).
    pub(super) full_topic: bool,
}

impl OutAlias {
    /// No alias: the topic goes in full.
    pub(super) const NONE: OutAlias = OutAlias {
        alias: None,
        new: false,
        full_topic: true,
    };
}

impl TopicAliases {
    /// Aliases for a client that announced Topic Alias Maximum `client_max` (capped at
    /// [`OUT_TOPIC_ALIAS_MAX`]).
    pub(super) fn new(client_max: u16) -> Self {
        TopicAliases {
            from_client: None,
            to_client: None,
            client_max: client_max.min(OUT_TOPIC_ALIAS_MAX),
        }
    }

    /// The topic an inbound PUBLISH's alias stands for: `Ok(None)` when the PUBLISH names its
    /// topic (no alias, or one it sets with the topic: see [`TopicAliases::set`]), `Err` with
    /// the DISCONNECT reason for an alias out of range or never set.
    pub(super) fn resolve(
        &self,
        alias: Option<u16>,
        topic_is_empty: bool,
    ) -> Result<Option<Topic>, DisconnectReasonCode> {
        match alias {
            None => Ok(None),
            Some(a) if a == 0 || a > TOPIC_ALIAS_MAX => {
                Err(DisconnectReasonCode::TopicAliasInvalid)
            }
            Some(a) if topic_is_empty => match self.from_client.as_ref().and_then(|m| m.get(&a)) {
                Some(t) => Ok(Some(t.clone())),
                // An alias that was never set is a protocol error.
                None => Err(DisconnectReasonCode::ProtocolError),
            },
            Some(_) => Ok(None),
        }
    }

    /// A PUBLISH with a topic and an alias sets the alias (MQTT 5 §3.3.2.3.4).
    pub(super) fn set(&mut self, alias: u16, topic: Topic) {
        self.from_client
            .get_or_insert_with(Default::default)
            .insert(alias, topic);
    }

    /// The alias to send `topic` with, without giving it yet: an alias already given (empty
    /// topic), a new one (topic and alias, given by [`TopicAliases::give`] once the PUBLISH is
    /// written), or none (the client takes no aliases, or all are taken).
    pub(super) fn peek(&self, topic: &Topic) -> OutAlias {
        if self.client_max == 0 {
            return OutAlias::NONE;
        }
        let given = self.to_client.as_ref().map_or(0, |a| a.by_topic.len());
        if let Some(&a) = self.to_client.as_ref().and_then(|a| a.by_topic.get(topic)) {
            return OutAlias {
                alias: Some(a),
                new: false,
                full_topic: false,
            };
        }
        if given >= usize::from(self.client_max) {
            return OutAlias::NONE;
        }
        // Aliases 1..=max, in the order topics are first sent.
        OutAlias {
            alias: Some(u16::try_from(given + 1).unwrap_or(u16::MAX)),
            new: true,
            full_topic: true,
        }
    }

    /// Records an alias a written PUBLISH gave the client.
    pub(super) fn give(&mut self, topic: &Topic, alias: u16) {
        self.to_client
            .get_or_insert_with(Default::default)
            .by_topic
            .insert(topic.clone(), alias);
    }

    /// Forgets both ways' aliases: the connection ended (the session may be parked).
    pub(super) fn clear(&mut self) {
        self.from_client = None;
        self.to_client = None;
    }
}
