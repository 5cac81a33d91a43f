//! The limits of the `[http]`, `[websocket]` and `[mqtt]` sections, which a configuration
//! reload changes in place (issue 25 item 3): each listener reads them from a
//! [`meshgate_core::live::Live`] cell made here at start and replaced by [`ListenerLimits::apply`].
//!
//! What is a limit (a number or a duration that bounds a client): the fields the `*_limits_of`
//! functions below copy. Everything else in those sections (`enabled`, listen addresses, paths,
//! TLS on or off, allowed origins, encodings and modes) shapes the listeners and their routes
//! when they start: a change there still needs a restart (`reload::needs_restart`).
//!
//! When a changed limit takes effect: HTTP requests and the web and admin listeners' new
//! connections use the section as it is when they start; WebSocket and MQTT connections meet
//! `max_queued`, `max_subscriptions`, `max_filters`, `outbound_queue_bytes`, `slow_consumer`
//! and the session expiry cap at their next check, and keep the frame size and ping interval
//! of their upgrade and the Receive Maximum and packet size their CONNACK announced. Counts
//! over a lowered cap (connections, requests in flight, retained messages, parked sessions)
//! are not cut; until they are under it, new connections and requests are refused (503, a
//! CONNACK refusal), a new topic's retained message is not stored, a disconnecting session
//! ends instead of being kept. The retained-store limits bound the in-memory store only (a
//! JetStream store has its own, `backbone.jetstream.retained_max_bytes`).

use std::sync::Arc;

use meshgate_config::{Config, HttpConfig, MqttConfig, WebSocketConfig};
use meshgate_core::live::Live;

use crate::serve;

/// Where the listeners read their limits (see the module documentation).
pub struct ListenerLimits {
    pub http: Arc<Live<HttpConfig>>,
    pub websocket: Arc<Live<WebSocketConfig>>,
    /// The web and admin listeners' socket bounds (timeouts and head size from `[http]`).
    pub web: Arc<Live<serve::Limits>>,
    pub admin: Arc<Live<serve::Limits>>,
    /// The MQTT broker's, once it runs.
    #[cfg(feature = "mqtt")]
    pub mqtt: std::sync::OnceLock<meshgate_mqtt::MqttLimits>,
}

impl std::fmt::Debug for ListenerLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerLimits").finish_non_exhaustive()
    }
}

impl ListenerLimits {
    /// The cells for the configuration the gateway starts with.
    pub fn new(config: &Config) -> Arc<ListenerLimits> {
        Arc::new(ListenerLimits {
            http: Arc::new(Live::new(config.http.clone())),
            websocket: Arc::new(Live::new(config.websocket.clone())),
            web: Arc::new(Live::new(web(config))),
            admin: Arc::new(Live::new(admin(config))),
            #[cfg(feature = "mqtt")]
            mqtt: std::sync::OnceLock::new(),
        })
    }

    /// Puts `next`'s limits in force where they differ from `running`'s; the sections whose
    /// limits changed. Only limits may differ in these sections (`reload::needs_restart`
    /// refused the rest before).
    pub fn apply(&self, running: &Config, next: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        // Compared by their limits only: a reload may also change their TLS files.
        if http_limits_of(&running.http, &next.http) != running.http {
            self.http.set(next.http.clone());
            self.web.set(web(next));
            self.admin.set(admin(next));
            changed.push("http limits");
        }
        if websocket_limits_of(&running.websocket, &next.websocket) != running.websocket {
            self.websocket.set(next.websocket.clone());
            changed.push("websocket limits");
        }
        #[cfg(feature = "mqtt")]
        if mqtt_limits_of(&running.mqtt, &next.mqtt) != running.mqtt
            && let Some(mqtt) = self.mqtt.get()
        {
            // (Named only when the broker runs.)
            mqtt.set(&next.mqtt);
            changed.push("mqtt limits");
        }
        changed
    }
}

fn web(config: &Config) -> serve::Limits {
    serve::Limits::of(
        &config.http,
        config.http.max_connections,
        "http.max_connections",
    )
}

fn admin(config: &Config) -> serve::Limits {
    serve::Limits::of(
        &config.http,
        config.admin.max_connections,
        "admin.max_connections",
    )
}

/// `section` with the limits of `limits`: equal to `limits` when only limits differ.
///
/// Every field is named (no `..`): a field added to the section does not compile here until
/// it is sorted as a limit (taken from `limits`) or not (kept from `section`: a difference
/// needs a restart).
pub fn http_limits_of(section: &HttpConfig, limits: &HttpConfig) -> HttpConfig {
    let HttpConfig {
        enabled,
        listen,
        tls,
        events_path,
        browser_page,
        allowed_origins,
        wrap,
        max_body_size: _,
        max_batch_events: _,
        max_in_flight: _,
        retry_after: _,
        header_read_timeout: _,
        idle_timeout: _,
        max_connections: _,
        max_header_size: _,
        body_read_timeout: _,
    } = section.clone();
    HttpConfig {
        enabled,
        listen,
        tls,
        events_path,
        browser_page,
        allowed_origins,
        wrap,
        max_body_size: limits.max_body_size,
        max_batch_events: limits.max_batch_events,
        max_in_flight: limits.max_in_flight,
        retry_after: limits.retry_after,
        header_read_timeout: limits.header_read_timeout,
        idle_timeout: limits.idle_timeout,
        max_connections: limits.max_connections,
        max_header_size: limits.max_header_size,
        body_read_timeout: limits.body_read_timeout,
    }
}

/// Likewise for `[websocket]`.
pub fn websocket_limits_of(section: &WebSocketConfig, limits: &WebSocketConfig) -> WebSocketConfig {
    let WebSocketConfig {
        enabled,
        path,
        require_subprotocol,
        publish_topic,
        allowed_origins,
        max_message_size: _,
        outbound_queue_bytes: _,
        slow_consumer: _,
        max_connections: _,
        ping_interval: _,
        max_filters: _,
    } = section.clone();
    WebSocketConfig {
        enabled,
        path,
        require_subprotocol,
        publish_topic,
        allowed_origins,
        max_message_size: limits.max_message_size,
        outbound_queue_bytes: limits.outbound_queue_bytes,
        slow_consumer: limits.slow_consumer,
        max_connections: limits.max_connections,
        ping_interval: limits.ping_interval,
        max_filters: limits.max_filters,
    }
}

/// Likewise for `[mqtt]`.
pub fn mqtt_limits_of(section: &MqttConfig, limits: &MqttConfig) -> MqttConfig {
    let MqttConfig {
        enabled,
        listen,
        v5_outbound,
        v311_outbound,
        plain_messages,
        sys_interval,
        wrap_type,
        websocket_path,
        tls,
        max_connections: _,
        max_packet_size: _,
        connect_timeout: _,
        write_timeout: _,
        max_keep_alive: _,
        max_inflight: _,
        max_queued: _,
        max_subscriptions: _,
        max_session_expiry: _,
        max_offline_sessions: _,
        max_retained_messages: _,
        max_retained_bytes: _,
        max_retained_send_bytes: _,
        max_client_id_len: _,
    } = section.clone();
    MqttConfig {
        enabled,
        listen,
        v5_outbound,
        v311_outbound,
        plain_messages,
        sys_interval,
        wrap_type,
        websocket_path,
        tls,
        max_connections: limits.max_connections,
        max_packet_size: limits.max_packet_size,
        connect_timeout: limits.connect_timeout,
        write_timeout: limits.write_timeout,
        max_keep_alive: limits.max_keep_alive,
        max_inflight: limits.max_inflight,
        max_queued: limits.max_queued,
        max_subscriptions: limits.max_subscriptions,
        max_session_expiry: limits.max_session_expiry,
        max_offline_sessions: limits.max_offline_sessions,
        max_retained_messages: limits.max_retained_messages,
        max_retained_bytes: limits.max_retained_bytes,
        max_retained_send_bytes: limits.max_retained_send_bytes,
        max_client_id_len: limits.max_client_id_len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_is_copied_and_anything_else_is_not() {
        let running = Config::default();
        let mut next = running.clone();
        next.mqtt.max_queued += 1;
        next.http.max_in_flight += 1;
        next.websocket.max_filters += 1;
        assert_eq!(mqtt_limits_of(&running.mqtt, &next.mqtt), next.mqtt);
        assert_eq!(http_limits_of(&running.http, &next.http), next.http);
        assert_eq!(
            websocket_limits_of(&running.websocket, &next.websocket),
            next.websocket
        );
        next.mqtt.wrap_type = "other".into();
        assert_ne!(mqtt_limits_of(&running.mqtt, &next.mqtt), next.mqtt);
    }
}
