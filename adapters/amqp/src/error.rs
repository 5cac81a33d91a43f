//! Why an AMQP link failed, typed, so that the reconnect loop, its log line and `/readyz` can
//! tell a wrong password from an unreachable broker from a missing queue.

use std::time::Duration;

/// A failure of a source's or sink's connection, its setup, or the broker's side of it.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The TCP connection could not be made, or reading or writing it failed.
    #[error("{doing}: {source}")]
    Io {
        doing: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The broker closed the connection without a reason (end of stream).
    #[error("the broker closed the connection")]
    Closed,
    /// No connection within `amqp.connect_timeout`.
    #[error("no connection within amqp.connect_timeout ({0:?})")]
    Timeout(Duration),
    /// The TLS handshake with the broker failed.
    #[error("TLS: {0}")]
    Tls(#[source] std::io::Error),
    /// The broker refused the login: wrong `amqp.user`/`amqp.password`, or no access to
    /// `amqp.vhost`.
    #[error(
        "the broker refused the login: {text} (reply code {code}); check amqp.user, amqp.password and amqp.vhost"
    )]
    Auth { code: u16, text: String },
    /// The broker closed the connection or the channel with a reply code: a missing queue or
    /// exchange, a refused declaration, a cancelled consumer.
    #[error("the broker refused: {text} (reply code {code})")]
    Refused { code: u16, text: String },
    /// The broker sent something this client cannot accept (a frame out of place, over
    /// `frame_max`, undecodable).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A configured value the broker connection cannot use (a CA file, a name over 255
    /// bytes); the message names the key.
    #[error("{0}")]
    Config(String),
    /// The sinks' lapin connection failed (lapin's own error, with the broker's reply when
    /// there was one).
    #[error("{}", describe_lapin(.0))]
    Lapin(#[from] lapin::Error),
    /// A step of setting up the link (declaring, binding, subscribing to the backbone) failed;
    /// `what` says which.
    #[error("{what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: Box<AmqpError>,
    },
    /// The link's task panicked (a meshgate bug); it restarts.
    #[error("its task panicked ({0}); restarting")]
    Panicked(String),
    /// The backbone refused the sink's subscription.
    #[error("cannot subscribe to `{filter}` on the backbone: {source}")]
    Subscribe {
        filter: String,
        #[source]
        source: meshgate_core::backbone::BackboneError,
    },
}

/// AMQP reply codes that mean "you may not": ACCESS_REFUSED (403), and NOT_ALLOWED (530),
/// which RabbitMQ sends for a virtual host the user has no access to.
const ACCESS_REFUSED: u16 = 403;
const NOT_ALLOWED: u16 = 530;

impl AmqpError {
    /// The broker's reply to `connection.close` / `channel.close`, typed by its code.
    pub(crate) fn from_reply(code: u16, text: &str, during_login: bool) -> AmqpError {
        let text = text.to_owned();
        if during_login && (code == ACCESS_REFUSED || code == NOT_ALLOWED) {
            AmqpError::Auth { code, text }
        } else {
            AmqpError::Refused { code, text }
        }
    }

    pub(crate) fn io(doing: &'static str) -> impl FnOnce(std::io::Error) -> AmqpError {
        move |source| AmqpError::Io { doing, source }
    }

    /// Wraps the error with the setup step that failed.
    pub(crate) fn during(self, what: impl Into<String>) -> AmqpError {
        AmqpError::Setup {
            what: what.into(),
            source: Box::new(self),
        }
    }

    /// A short, stable name of the kind of failure, for logs (`kind=auth`).
    pub fn kind(&self) -> &'static str {
        match self {
            AmqpError::Io { .. } | AmqpError::Closed | AmqpError::Timeout(_) => "network",
            AmqpError::Tls(_) => "tls",
            AmqpError::Auth { .. } => "auth",
            AmqpError::Refused { .. } => "refused",
            AmqpError::Protocol(_) => "protocol",
            AmqpError::Config(_) => "config",
            AmqpError::Lapin(e) => match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp)
                    if matches!(
                        amqp.kind(),
                        lapin::protocol::AMQPErrorKind::Hard(
                            lapin::protocol::AMQPHardError::NOTALLOWED
                        ) | lapin::protocol::AMQPErrorKind::Soft(
                            lapin::protocol::AMQPSoftError::ACCESSREFUSED
                        )
                    ) =>
                {
                    "auth"
                }
                lapin::ErrorKind::ProtocolError(_) => "refused",
                lapin::ErrorKind::IOError(_) => "network",
                _ => "protocol",
            },
            AmqpError::Setup { source, .. } => source.kind(),
            AmqpError::Subscribe { .. } => "backbone",
            AmqpError::Panicked(_) => "panic",
        }
    }
}

/// A lapin error as an operator reads it: refused credentials, missing queues and the like
/// arrive as AMQP reply codes with the broker's text.
fn describe_lapin(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            format!(
                "the broker refused: {} ({:?})",
                amqp.get_message(),
                amqp.kind()
            )
        }
        _ => e.to_string(),
    }
}
