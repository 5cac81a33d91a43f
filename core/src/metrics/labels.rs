//! The values of the `kind` and `reason` labels, as enums: the whole vocabulary of
//! `meshgate_errors_total{kind}`, `meshgate_events_dropped_total{reason}` and
//! `meshgate_backbone_dropped_total{reason}` is listed here, once, with what each value means.
//! A dashboard or alert can rely on this list; a new value is a change to this file.

/// Declares a label enum: its variants, their label text (`as_str`), and `ALL`.
macro_rules! label_values {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every value, in declaration order (`ALL[v as usize] == v`).
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The label value as it appears on `/metrics`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_values! {
    /// Why a client's request, packet, frame or connection failed: the `kind` label of
    /// `meshgate_errors_total`.
    ErrorKind {
        /// Authentication missing or wrong.
        Unauthorized => "unauthorized",
        /// Authenticated, but the ACL does not allow the topic.
        Forbidden => "forbidden",
        /// The `Origin` of a browser request is not allowed.
        ForbiddenOrigin => "forbidden_origin",
        /// Not a valid CloudEvent (or not one this binding can read).
        BadEvent => "bad_event",
        /// A topic that is not valid or not allowed to clients.
        BadTopic => "bad_topic",
        /// An HTTP request meshgate cannot read (headers, method, batch).
        BadRequest => "bad_request",
        /// A WebSocket upgrade refused (no subprotocol, bad query).
        BadHandshake => "bad_handshake",
        /// A WebSocket frame meshgate does not accept (binary, invalid UTF-8).
        BadFrame => "bad_frame",
        /// An HTTP body in a content type no binding reads.
        UnsupportedMediaType => "unsupported_media_type",
        /// Over a size limit (body, message, frame).
        TooLarge => "too_large",
        /// A client that did not finish its request in time.
        Timeout => "timeout",
        /// HTTP ingress at `http.max_in_flight`.
        Saturated => "saturated",
        /// The backbone refused or failed a publish.
        Backbone => "backbone",
        /// A listener at its connection cap.
        TooManyConnections => "too_many_connections",
        /// `gateway.max_connections_per_ip` reached.
        ConnectionLimitIp => "connection_limit_ip",
        /// `gateway.max_connections_per_user` reached.
        ConnectionLimitUser => "connection_limit_user",
        /// A web listener at its connection cap, refused at accept.
        ConnectionLimit => "connection_limit",
        /// A web client that did not send its request headers in time.
        HeaderTimeout => "header_timeout",
        /// Request headers over the web listener's limit.
        HeaderTooLarge => "header_too_large",
        /// A request target longer than the HTTP parser takes (414).
        UriTooLong => "uri_too_long",
        /// A request for a path the listener does not serve (404).
        NotFound => "not_found",
        /// A request with a method its path does not take (405).
        MethodNotAllowed => "method_not_allowed",
        /// More topic filters than one connection may hold.
        TooManyFilters => "too_many_filters",
        /// A WebSocket client that answered no ping.
        PingTimeout => "ping_timeout",
        /// A WebSocket subscriber disconnected for being too slow.
        SlowConsumerDisconnected => "slow_consumer_disconnected",
        /// A WebSocket frame the binding could not carry out (its `code` is invalid_request).
        InvalidRequest => "invalid_request",
        /// A WebSocket frame holding an invalid event (its `code` is invalid_event).
        InvalidEvent => "invalid_event",
        /// A WebSocket publish the backbone could not take now (its `code` is unavailable).
        Unavailable => "unavailable",
        /// A WebSocket publish that names no topic (its `code` is no_topic).
        NoTopic => "no_topic",
        /// A packet that breaks the protocol.
        Protocol => "protocol",
        /// Bytes that do not parse as the protocol's packets.
        Malformed => "malformed",
        /// An MQTT protocol version meshgate does not speak.
        UnsupportedVersion => "unsupported_version",
        /// No CONNECT within the connect timeout.
        ConnectTimeout => "connect_timeout",
        /// A client id over `mqtt.max_client_id_len`.
        ClientIdTooLong => "client_id_too_long",
        /// A client id connected elsewhere, and takeover is not possible.
        ClientIdTaken => "client_id_taken",
        /// A keep-alive over `mqtt.max_keep_alive`.
        KeepAliveTooLong => "keep_alive_too_long",
        /// A client silent for 1.5 keep-alive intervals.
        KeepAliveTimeout => "keep_alive_timeout",
        /// A client that sent more QoS > 0 PUBLISHes than our Receive Maximum.
        ReceiveMaximum => "receive_maximum",
        /// More subscriptions than one MQTT session may hold.
        SubscriptionLimit => "subscription_limit",
        /// A socket that took longer than the write timeout to take our bytes.
        WriteTimeout => "write_timeout",
        /// Publishes still with the backbone when the connection ended, not settled in time.
        InboundDrainTimeout => "inbound_drain_timeout",
        /// A packet meshgate could not encode (a bug, counted instead of sent).
        Encode => "encode",
        /// The TLS handshake failed.
        TlsHandshake => "tls_handshake",
        /// The TLS handshake did not finish in time.
        TlsHandshakeTimeout => "tls_handshake_timeout",
        /// The MQTT session store (JetStream KV) failed.
        SessionStore => "session_store",
        /// The MQTT retained store (JetStream KV) failed.
        RetainedStore => "retained_store",
        /// An event an AMQP sink cannot write as a message.
        Unencodable => "unencodable",
        /// RabbitMQ nacked a published message.
        BrokerNack => "broker_nack",
        /// An AMQP message whose content header meshgate refuses.
        BadMessage => "bad_message",
        /// A task panicked (a meshgate bug) and was restarted.
        TaskPanic => "task_panic",
        /// A backbone task panicked (a meshgate bug).
        TaskPanicked => "task_panicked",
    }
}

label_values! {
    /// Why an event was not delivered or not published: the `reason` label of
    /// `meshgate_events_dropped_total` (per adapter) and `meshgate_backbone_dropped_total`
    /// (per backbone).
    DropReason {
        /// A subscriber's queue was full (`drop` policy).
        QueueFull => "queue_full",
        /// A subscriber's queue stayed full past the `block` policy's timeout.
        BlockTimeout => "block_timeout",
        /// Copies for a subscriber that has not taken any for the stall limit.
        Stalled => "stalled",
        /// A subscriber too slow for its connection's queue.
        SlowConsumer => "slow_consumer",
        /// A message from the bus that is not a valid event.
        Malformed => "malformed",
        /// A message JetStream had delivered already (deduplicated).
        Duplicate => "duplicate",
        /// Delivered `max_deliver` times without an ack: dead-lettered.
        MaxDeliveries => "max_deliveries",
        /// A durable subscription of the JetStream instance feed stopped tracking a delivery its
        /// client did not acknowledge (past its bound): not delivered again on resume.
        Unacknowledged => "unacknowledged",
        /// An event that a protocol cannot carry (a field or length out of range).
        Unrepresentable => "unrepresentable",
        /// Over a size limit.
        TooLarge => "too_large",
        /// Larger than the MQTT client's Maximum Packet Size.
        TooLargeForClient => "too_large_for_client",
        /// A QoS 0 message for an offline MQTT session.
        OfflineQos0 => "offline_qos0",
        /// An MQTT session's queue was full.
        SessionQueueFull => "session_queue_full",
        /// A message whose MQTT 5 Message Expiry Interval passed while queued.
        Expired => "expired",
        /// The MQTT client refused the message (PUBREC reason code >= 0x80).
        RefusedByClient => "refused_by_client",
        /// Retained messages for a new subscription beyond its send budget.
        RetainedQueueFull => "retained_queue_full",
        /// A retained message beyond `mqtt.max_retained_*`.
        RetainedLimit => "retained_limit",
        /// More offline sessions than `mqtt.max_offline_sessions`.
        SessionLimit => "session_limit",
        /// A will message that is not a valid event.
        BadWill => "bad_will",
        /// A QoS 0 publish that is not a valid event.
        BadEvent => "bad_event",
        /// A QoS 0 publish the ACL refused.
        Forbidden => "forbidden",
        /// A QoS 0 publish the backbone refused.
        Backbone => "backbone",
        /// An AMQP message with a content header meshgate refuses.
        BadMessage => "bad_message",
        /// An AMQP message the source rejected (dead-lettered by RabbitMQ).
        Rejected => "rejected",
        /// An AMQP message meshgate itself had published (not bridged back).
        Loop => "loop",
        /// An AMQP message RabbitMQ could not route (`mandatory`).
        Unroutable => "unroutable",
        /// Events an AMQP sink held while RabbitMQ could not be reached, over its budget.
        Unreachable => "unreachable",
        /// An event an AMQP sink cannot write as a message.
        Unencodable => "unencodable",
        /// Published to RabbitMQ, but no confirm came before the connection ended.
        Unconfirmed => "unconfirmed",
        /// Not delivered when the gateway shut down: held by an AMQP sink, or queued for an MQTT
        /// client that had not taken it within the shutdown drain.
        Shutdown => "shutdown",
        /// Publishes refused because their NATS connection dropped before their bytes were
        /// written (NATS core) or before their PubAck came (JetStream): the client was told to
        /// retry (HTTP 503, MQTT reason code, AMQP nack); none of them was acknowledged.
        Disconnected => "disconnected",
        /// JetStream publishes refused because no PubAck came within
        /// `backbone.jetstream.publish_timeout` (the client retries; deduplicated).
        PubackTimeout => "puback_timeout",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_declaration_order_and_values_are_unique() {
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        let mut kinds: Vec<_> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), ErrorKind::ALL.len());
        let mut reasons: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), DropReason::ALL.len());
    }
}
