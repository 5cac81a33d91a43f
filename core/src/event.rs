//! The CloudEvents 1.0 event model, with the validation the spec demands and SDKs skip.
//!
//! meshgate keeps its own small event type instead of `cloudevents::Event` (see
//! `docs/decisions/0001-own-cloudevent-type.md`): attribute values are kept as the exact
//! strings that arrived (so `time` is forwarded unchanged), extension types survive every hop,
//! and every constructor validates, so an `Event` value is always a valid CloudEvent.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::validate;

pub use crate::event_error::EventError;

/// The only `specversion` meshgate accepts and writes (CE-BINDINGS.md §10, version rejection).
pub const SPEC_VERSION: &str = "1.0";

/// The value of an extension attribute. JSON carries Boolean and Integer natively; every other
/// CloudEvents type (String, URI, URI-reference, Binary, Timestamp) is carried as its canonical
/// string, so it is a `String` here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtensionValue {
    String(String),
    Integer(i32),
    Boolean(bool),
}

impl fmt::Display for ExtensionValue {
    /// The canonical string form (CloudEvents type system), used by string-only bindings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtensionValue::String(s) => f.write_str(s),
            ExtensionValue::Integer(i) => write!(f, "{i}"),
            ExtensionValue::Boolean(b) => write!(f, "{b}"),
        }
    }
}

/// The event payload, kept in the form it arrived in so that re-encoding does not change it.
#[derive(Debug, Clone)]
pub enum Data {
    /// A JSON value from a structured event's `data` member (JSON content type or none). Kept as
    /// raw text: it is never parsed a second time and never re-rendered.
    Json(Box<RawValue>),
    /// A string from a structured event's `data` member with a non-JSON content type.
    Text(String),
    /// Bytes: `data_base64`, or a binary-mode body.
    Binary(Bytes),
}

impl PartialEq for Data {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Data::Json(a), Data::Json(b)) => a.get() == b.get(),
            (Data::Text(a), Data::Text(b)) => a == b,
            (Data::Binary(a), Data::Binary(b)) => a == b,
            _ => false,
        }
    }
}

impl Data {
    /// The payload as the bytes a binary-mode binding puts in the message body.
    pub fn to_bytes(&self) -> Bytes {
        match self {
            Data::Binary(b) => b.clone(),
            other => Bytes::copy_from_slice(other.as_slice()),
        }
    }

    /// The payload as a binary-mode body, borrowed.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Data::Json(raw) => raw.get().as_bytes(),
            Data::Text(s) => s.as_bytes(),
            Data::Binary(b) => b,
        }
    }

    /// Length of the payload in bytes, as a binary-mode body.
    pub fn len(&self) -> usize {
        match self {
            Data::Json(raw) => raw.get().len(),
            Data::Text(s) => s.len(),
            Data::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A valid CloudEvents 1.0 event. Fields are private so that an `Event` can only be built through
/// the validating setters.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    id: String,
    // Shared strings: a producer's wrapped events all carry the same source and type, and the
    // subject of a wrapped event is its topic, so these are reference counts, not copies.
    source: Arc<str>,
    ty: Arc<str>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    subject: Option<Arc<str>>,
    time: Option<String>,
    extensions: BTreeMap<String, ExtensionValue>,
    data: Option<Data>,
}

/// Names of the context attributes defined by the core spec.
pub const CORE_ATTRIBUTES: [&str; 8] = [
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
];

impl Event {
    /// A new event with the required attributes, each validated.
    pub fn new(
        id: impl Into<String>,
        source: impl Into<String>,
        ty: impl Into<String>,
    ) -> Result<Event, EventError> {
        let id = id.into();
        let source = source.into();
        let ty = ty.into();
        validate::non_empty_string("id", &id)?;
        validate::uri_reference("source", &source)?;
        validate::non_empty_string("type", &ty)?;
        Ok(Event {
            id,
            source: source.into(),
            ty: ty.into(),
            datacontenttype: None,
            dataschema: None,
            subject: None,
            time: None,
            extensions: BTreeMap::new(),
            data: None,
        })
    }

    /// An event from values the caller has already validated (see `wrap::Wrapper`, which
    /// checks its source and type once rather than per message).
    pub(crate) fn from_trusted(id: String, source: Arc<str>, ty: Arc<str>, time: String) -> Event {
        Event {
            id,
            source,
            ty,
            datacontenttype: None,
            dataschema: None,
            subject: None,
            time: Some(time),
            extensions: BTreeMap::new(),
            data: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn source(&self) -> &str {
        &self.source
    }
    pub fn specversion(&self) -> &'static str {
        SPEC_VERSION
    }
    pub fn ty(&self) -> &str {
        &self.ty
    }
    pub fn datacontenttype(&self) -> Option<&str> {
        self.datacontenttype.as_deref()
    }
    pub fn dataschema(&self) -> Option<&str> {
        self.dataschema.as_deref()
    }
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }
    /// The `time` attribute exactly as it arrived (validated as RFC 3339).
    pub fn time(&self) -> Option<&str> {
        self.time.as_deref()
    }
    pub fn extensions(&self) -> &BTreeMap<String, ExtensionValue> {
        &self.extensions
    }
    pub fn extension(&self, name: &str) -> Option<&ExtensionValue> {
        self.extensions.get(name)
    }
    pub fn data(&self) -> Option<&Data> {
        self.data.as_ref()
    }

    /// The content type a binary-mode binding states for the data: `datacontenttype`, or
    /// `application/json` for JSON data without one (CE-BINDINGS E4: a JSON string keeps its
    /// quotes' meaning); bytes without a content type get none (E3: nothing is invented).
    pub fn binary_content_type(&self) -> Option<&str> {
        match (self.datacontenttype(), self.data()) {
            (Some(ct), _) => Some(ct),
            (None, Some(Data::Json(_))) => Some("application/json"),
            _ => None,
        }
    }

    pub fn set_datacontenttype(&mut self, v: Option<String>) -> Result<(), EventError> {
        if let Some(v) = &v {
            validate::media_type("datacontenttype", v)?;
        }
        self.datacontenttype = v;
        Ok(())
    }
    pub fn set_dataschema(&mut self, v: Option<String>) -> Result<(), EventError> {
        if let Some(v) = &v {
            validate::absolute_uri("dataschema", v)?;
        }
        self.dataschema = v;
        Ok(())
    }
    pub fn set_subject(&mut self, v: Option<String>) -> Result<(), EventError> {
        self.set_shared_subject(v.map(Arc::from))
    }
    /// [`Event::set_subject`] with a shared string (a topic's text, say), without a copy.
    pub fn set_shared_subject(&mut self, v: Option<Arc<str>>) -> Result<(), EventError> {
        if let Some(v) = &v {
            validate::non_empty_string("subject", v)?;
        }
        self.subject = v;
        Ok(())
    }
    pub fn set_time(&mut self, v: Option<String>) -> Result<(), EventError> {
        if let Some(v) = &v {
            validate::timestamp("time", v)?;
        }
        self.time = v;
        Ok(())
    }
    pub fn set_data(&mut self, data: Option<Data>) {
        self.data = data;
    }

    /// Sets an extension attribute after checking its name and value.
    pub fn set_extension(&mut self, name: &str, value: ExtensionValue) -> Result<(), EventError> {
        validate::attribute_name(name)?;
        if CORE_ATTRIBUTES.contains(&name) {
            return Err(EventError::InvalidName {
                name: name.to_owned(),
                reason: "it is a core attribute, not an extension",
            });
        }
        if let ExtensionValue::String(s) = &value {
            validate::string(name, s)?;
        }
        self.extensions.insert(name.to_owned(), value);
        Ok(())
    }

    pub fn remove_extension(&mut self, name: &str) -> Option<ExtensionValue> {
        self.extensions.remove(name)
    }

    /// Every context attribute in canonical string form, core attributes first, in the order a
    /// binary-mode binding writes them. `datacontenttype` is included; bindings that carry it
    /// elsewhere skip it.
    pub fn attributes(&self) -> impl Iterator<Item = (&str, AttributeRef<'_>)> {
        let core = [
            ("specversion", Some(AttributeRef::Str(SPEC_VERSION))),
            ("id", Some(AttributeRef::Str(&self.id))),
            ("source", Some(AttributeRef::Str(&self.source))),
            ("type", Some(AttributeRef::Str(&self.ty))),
            (
                "datacontenttype",
                self.datacontenttype.as_deref().map(AttributeRef::Str),
            ),
            (
                "dataschema",
                self.dataschema.as_deref().map(AttributeRef::Str),
            ),
            ("subject", self.subject.as_deref().map(AttributeRef::Str)),
            ("time", self.time.as_deref().map(AttributeRef::Str)),
        ];
        core.into_iter()
            .filter_map(|(n, v)| v.map(|v| (n, v)))
            .chain(
                self.extensions
                    .iter()
                    .map(|(n, v)| (n.as_str(), AttributeRef::Ext(v))),
            )
    }
}

/// A borrowed attribute value, for encoders.
#[derive(Debug, Clone, Copy)]
pub enum AttributeRef<'a> {
    Str(&'a str),
    Ext(&'a ExtensionValue),
}

impl fmt::Display for AttributeRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttributeRef::Str(s) => f.write_str(s),
            AttributeRef::Ext(v) => v.fmt(f),
        }
    }
}

/// Builds an event from attributes that arrive one by one as canonical strings (binary-mode
/// bindings: HTTP `ce-` headers, MQTT 5 user properties, NATS headers, AMQP headers).
/// Detects duplicates and missing required attributes; unknown names become String extensions.
#[derive(Debug, Default)]
pub struct StringAttributes {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    ty: Option<String>,
    others: Vec<(String, String)>,
    seen: std::collections::BTreeSet<String>,
}

impl StringAttributes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one attribute. `name` must already be lower-cased by the binding.
    pub fn push(&mut self, name: &str, value: String) -> Result<(), EventError> {
        validate::attribute_name(name)?;
        if !self.seen.insert(name.to_owned()) {
            return Err(EventError::Duplicate(name.to_owned()));
        }
        match name {
            "specversion" => self.specversion = Some(value),
            "id" => self.id = Some(value),
            "source" => self.source = Some(value),
            "type" => self.ty = Some(value),
            _ => self.others.push((name.to_owned(), value)),
        }
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.seen.contains(name)
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Validates and builds the event (without data).
    pub fn build(self) -> Result<Event, EventError> {
        let specversion = self.specversion.ok_or(EventError::Missing("specversion"))?;
        if specversion != SPEC_VERSION {
            return Err(EventError::UnsupportedSpecVersion(specversion));
        }
        let mut event = Event::new(
            self.id.ok_or(EventError::Missing("id"))?,
            self.source.ok_or(EventError::Missing("source"))?,
            self.ty.ok_or(EventError::Missing("type"))?,
        )?;
        for (name, value) in self.others {
            event.set_string_attribute(&name, value)?;
        }
        Ok(event)
    }
}

impl Event {
    /// Sets any optional attribute from its canonical string form; unknown names become String
    /// extensions (CE-BINDINGS.md §10: an extension from a string-only binding stays a string).
    pub fn set_string_attribute(&mut self, name: &str, value: String) -> Result<(), EventError> {
        match name {
            "datacontenttype" => self.set_datacontenttype(Some(value)),
            "dataschema" => self.set_dataschema(Some(value)),
            "subject" => self.set_subject(Some(value)),
            "time" => self.set_time(Some(value)),
            "specversion" | "id" | "source" | "type" => Err(EventError::InvalidName {
                name: name.to_owned(),
                reason: "required attributes are set when the event is created",
            }),
            _ => self.set_extension(name, ExtensionValue::String(value)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rejects_empty_required() {
        assert!(matches!(
            Event::new("", "/src", "t"),
            Err(EventError::InvalidValue { name, .. }) if name == "id"
        ));
        assert!(Event::new("a", "", "t").is_err());
        assert!(Event::new("a", "/s", "").is_err());
        assert!(Event::new("A1", "1-555-123-4567", "t").is_ok());
    }

    #[test]
    fn extension_names_follow_the_rules() {
        let mut e = Event::new("A1", "/src", "com.example.t").unwrap();
        assert!(e.set_extension("myext", ExtensionValue::Integer(1)).is_ok());
        for bad in ["my_ext", "MyExt", "data", "", "subject"] {
            assert!(
                e.set_extension(bad, ExtensionValue::Boolean(true)).is_err(),
                "{bad} must be rejected"
            );
        }
    }

    #[test]
    fn string_attributes_detect_duplicates_and_versions() {
        let mut a = StringAttributes::new();
        a.push("id", "1".into()).unwrap();
        assert_eq!(
            a.push("id", "2".into()),
            Err(EventError::Duplicate("id".into()))
        );
        let mut a = StringAttributes::new();
        for (n, v) in [
            ("specversion", "0.3"),
            ("id", "1"),
            ("source", "/s"),
            ("type", "t"),
        ] {
            a.push(n, v.into()).unwrap();
        }
        assert_eq!(
            a.build(),
            Err(EventError::UnsupportedSpecVersion("0.3".into()))
        );
    }
}
