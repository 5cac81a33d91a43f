//! What the admin API asks of the MQTT broker: its persistent sessions and its retained
//! messages (connections are in the process-wide registry, `meshgate_core::connections`).

use std::sync::Arc;

use meshgate_core::{BackboneError, Topic, TopicFilter};
use serde::Serialize;

use crate::Shared;
use crate::session::parked::ParkedInfo;

/// Why the admin API cannot delete a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeleteError {
    #[error("client `{0}` is connected (to instance `{1}`): close its connection first")]
    Connected(String, String),
    #[error("the session store cannot be read; retry later")]
    Unavailable,
    #[error(
        "client `{0}` took its session back meanwhile (or the store refused the delete); nothing deleted"
    )]
    Claimed(String),
}

/// Most bytes of retained events one page of `GET /retained` holds.
pub const RETAINED_PAGE_BYTES: usize = 4 << 20;

/// The MQTT broker as the admin API sees it.
#[derive(Clone)]
pub struct MqttAdmin {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MqttAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MqttAdmin")
    }
}

/// One page of persistent sessions parked on this instance.
#[derive(Debug, Clone, Serialize)]
pub struct Sessions {
    pub items: Vec<SessionInfo>,
    /// The cursor of the next page (`?after=`), when there are more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A persistent session whose client is away.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub client_id: String,
    pub user: String,
    pub parked_at_ms: u64,
    /// `None`: never (MQTT 5 Session Expiry Interval 0xFFFFFFFF).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    pub subscriptions: usize,
}

impl From<ParkedInfo> for SessionInfo {
    fn from(p: ParkedInfo) -> Self {
        SessionInfo {
            client_id: p.client_id,
            user: p.user,
            parked_at_ms: p.parked_at_ms,
            expires_at_ms: p.expires_at_ms,
            subscriptions: p.subscriptions,
        }
    }
}

/// Retained messages matching a filter.
#[derive(Debug, Clone, Serialize)]
pub struct RetainedPage {
    pub items: Vec<RetainedInfo>,
    /// How many more match beyond this page (narrow the filter to see them).
    pub more: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetainedInfo {
    pub topic: String,
    /// The retained event, as CloudEvents JSON.
    pub event: Box<serde_json::value::RawValue>,
}

impl MqttAdmin {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MqttAdmin { shared }
    }

    /// Up to `limit` sessions parked here whose client id sorts after `after`.
    pub fn sessions(&self, after: &str, limit: usize) -> Sessions {
        let (items, more) = self.shared.parked.list(after, limit.max(1));
        let next = more
            .then(|| items.last().map(|s| s.client_id.clone()))
            .flatten();
        Sessions {
            items: items.into_iter().map(SessionInfo::from).collect(),
            next,
        }
    }

    /// Deletes the session of `client_id` (see [`crate::session::stored::delete`]); false
    /// when there was none.
    pub async fn delete_session(&self, client_id: &str) -> Result<bool, DeleteError> {
        if self.shared.is_connected(client_id) {
            return Err(DeleteError::Connected(
                client_id.to_owned(),
                self.shared.ctx.instance.to_string(),
            ));
        }
        crate::session::stored::delete(&self.shared, client_id).await
    }

    /// Up to `limit` retained messages whose topic matches `filter`.
    pub async fn retained(&self, filter: &TopicFilter, limit: usize) -> RetainedPage {
        let found = self
            .shared
            .retained
            .matching(filter, limit.max(1), RETAINED_PAGE_BYTES)
            .await;
        let items = found
            .envelopes
            .iter()
            .filter_map(|e| {
                let json = String::from_utf8(e.json().to_vec()).ok()?;
                Some(RetainedInfo {
                    topic: e.topic.as_str().to_owned(),
                    event: serde_json::value::RawValue::from_string(json).ok()?,
                })
            })
            .collect();
        RetainedPage {
            items,
            more: found.beyond,
        }
    }

    /// Removes `topic`'s retained message; false when there was none (the memory store).
    pub async fn clear_retained(&self, topic: &Topic) -> Result<bool, BackboneError> {
        self.shared.retained.clear(topic).await
    }
}
