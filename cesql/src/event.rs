//! How an expression reads an event: the [`Event`] trait, and [`MapEvent`], a map of attributes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::value::Value;

/// What an expression sees of a CloudEvent: its context attributes and extensions by name.
///
/// Names are given in lower case (CloudEvents attribute names are `[a-z0-9]+`; CESQL reads
/// `SOURCE` as `source`). An attribute whose type is not one of CESQL's three (URI, timestamp,
/// binary, ...) is given as its String form (spec 3.2). The input is assumed to be a valid
/// event: `specversion`, `id`, `source` and `type` exist.
pub trait Event {
    /// The value of attribute `name`, or `None` when the event does not have it.
    fn attribute(&self, name: &str) -> Option<Value<'_>>;

    /// Whether the event has attribute `name` (`EXISTS name`). The default asks
    /// [`Event::attribute`]; implement it when that is cheaper.
    fn has_attribute(&self, name: &str) -> bool {
        self.attribute(name).is_some()
    }
}

impl<E: Event + ?Sized> Event for &E {
    fn attribute(&self, name: &str) -> Option<Value<'_>> {
        (**self).attribute(name)
    }

    fn has_attribute(&self, name: &str) -> bool {
        (**self).has_attribute(name)
    }
}

/// An event as a map from attribute name to value: for tests, and for users without an event
/// type of their own.
///
/// ```
/// use cesql::{Event, MapEvent, Value};
///
/// let event = MapEvent::new("1", "/sensors", "com.example.reading")
///     .with("sequence", 10)
///     .with("urgent", true);
/// assert_eq!(event.attribute("sequence"), Some(Value::Integer(10)));
/// assert_eq!(event.attribute("specversion"), Some(Value::from("1.0")));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapEvent {
    attributes: BTreeMap<String, Value<'static>>,
}

impl MapEvent {
    /// An event with the required attributes: `specversion` 1.0, `id`, `source` and `type`.
    pub fn new(id: &str, source: &str, kind: &str) -> Self {
        MapEvent::empty()
            .with("specversion", "1.0")
            .with("id", id)
            .with("source", source)
            .with("type", kind)
    }

    /// A map without any attribute (not a valid CloudEvent, but CESQL does not check).
    pub fn empty() -> Self {
        MapEvent::default()
    }

    /// Sets attribute `name` (lower-cased) to `value`.
    pub fn set<'v>(&mut self, name: &str, value: impl Into<Value<'v>>) {
        self.attributes
            .insert(name.to_ascii_lowercase(), value.into().into_owned());
    }

    /// [`MapEvent::set`], by value.
    #[must_use]
    pub fn with<'v>(mut self, name: &str, value: impl Into<Value<'v>>) -> Self {
        self.set(name, value);
        self
    }

    /// Removes attribute `name`.
    pub fn remove(&mut self, name: &str) -> Option<Value<'static>> {
        self.attributes.remove(&name.to_ascii_lowercase())
    }

    /// The attributes, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value<'static>)> {
        self.attributes.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl Event for MapEvent {
    fn attribute(&self, name: &str) -> Option<Value<'_>> {
        self.attributes.get(name).map(|v| match v {
            Value::String(s) => Value::String(Cow::Borrowed(s)),
            Value::Boolean(b) => Value::Boolean(*b),
            Value::Integer(i) => Value::Integer(*i),
        })
    }

    fn has_attribute(&self, name: &str) -> bool {
        self.attributes.contains_key(name)
    }
}
