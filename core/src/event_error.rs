//! [`EventError`], in its own file so that [`crate::validate`] (which returns it) and
//! [`crate::event`] (which re-exports it and calls the validators) do not depend on each other.

/// Why an event (or one attribute of it) is not a valid CloudEvent. The text always names the
/// attribute, so it can be shown to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("required attribute `{0}` is missing")]
    Missing(&'static str),
    #[error("attribute `{name}` is invalid: {reason}")]
    InvalidValue { name: String, reason: String },
    #[error("attribute name `{name}` is invalid: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("attribute `{0}` appears more than once")]
    Duplicate(String),
    #[error("specversion `{0}` is not supported; meshgate accepts only 1.0")]
    UnsupportedSpecVersion(String),
    #[error("{0}")]
    Format(String),
}

impl EventError {
    pub(crate) fn invalid(name: &str, reason: impl Into<String>) -> Self {
        EventError::InvalidValue {
            name: name.to_owned(),
            reason: reason.into(),
        }
    }
}
