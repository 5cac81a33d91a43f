//! Event filters in Knative Eventing's dialects (issue 21 item 2): `exact`, `prefix`, `suffix`,
//! `all`, `any`, `not` and `cesql` (the `filters` of a Knative Trigger), and the legacy
//! attribute map (`filter.attributes`: every pair exact, `""` any value).
//!
//! Semantics as Knative's (`knative.dev/eventing/pkg/eventfilter`, read for this): a filter
//! gives *pass*, *fail* or *no filter*; an event is delivered unless the result is *fail*.
//! - `exact` / `prefix` / `suffix`: one attribute and a non-empty value; an event without the
//!   attribute fails. Values are compared with the attribute's canonical string form (an
//!   Integer extension `7` is `"7"`; Knative's Go code compares the typed value, so there an
//!   Integer extension never matches a string);
//! - `all`: fails at the first member that fails, otherwise gives the last member's result
//!   (*no filter* when empty); `any`: passes at the first member that passes, otherwise fails
//!   if some member failed (*no filter* when empty or all members are *no filter*); `not`:
//!   swaps pass and fail;
//! - `cesql`: passes when the expression is `true` without an evaluation error (a missing
//!   attribute is an error: the event fails), compiled once when the filter is made;
//! - a list of filters is their `all`.
//!
//! Filters are checked when made, with errors that name where (`filters[1].all[0].exact`): one
//! dialect per object, one attribute per `exact`/`prefix`/`suffix`, attribute names `[a-z0-9]+`,
//! non-empty values, CESQL that parses, at most [`MAX_DEPTH`] levels of nesting (filters come
//! from config and the admin API: a hostile document must not recurse without bound).

use std::borrow::Cow;

use serde_json::Value as Json;

use crate::event::{Event, ExtensionValue};

/// The deepest nesting of `all` / `any` / `not` a filter may have.
pub const MAX_DEPTH: usize = 32;

/// One filter, checked and compiled.
#[derive(Debug)]
pub enum Filter {
    Exact(String, String),
    Prefix(String, String),
    Suffix(String, String),
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
    Sql(Box<cesql::Expression>),
    /// Knative's legacy `filter.attributes`: every attribute exact; `""` any value (the
    /// attribute must still exist).
    Attributes(Vec<(String, String)>),
}

/// What a filter says about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// The filter says nothing (an empty `all` or `any`): the event is delivered.
    NoFilter,
}

/// Why a filter document is refused: where in it, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct FilterError {
    pub path: String,
    pub reason: String,
}

fn refuse(path: &str, reason: impl Into<String>) -> FilterError {
    FilterError {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn is_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl Filter {
    /// A list of Knative filter objects (`filters: [...]`), as their `all`; `path` names the
    /// list in errors.
    pub fn parse_list(json: &Json, path: &str) -> Result<Filter, FilterError> {
        Ok(Filter::All(parse_members(json, path, 0)?))
    }

    /// One Knative filter object (`{"exact": {"type": "x"}}`, `{"all": [...]}`, ...).
    pub fn parse(json: &Json, path: &str) -> Result<Filter, FilterError> {
        parse_object(json, path, 0)
    }

    /// Knative's legacy attribute map (`filter.attributes`).
    pub fn attributes(json: &Json, path: &str) -> Result<Filter, FilterError> {
        let Some(map) = json.as_object() else {
            return Err(refuse(path, "an object of attribute names to values"));
        };
        let mut pairs = Vec::with_capacity(map.len());
        for (name, value) in map {
            if !is_attribute_name(name) {
                return Err(refuse(
                    path,
                    format!("`{name}` is not a CloudEvents attribute name ([a-z0-9]+)"),
                ));
            }
            let Some(value) = value.as_str() else {
                return Err(refuse(&format!("{path}.{name}"), "a string"));
            };
            pairs.push((name.clone(), value.to_owned()));
        }
        Ok(Filter::Attributes(pairs))
    }

    /// What the filter says about `event`.
    pub fn evaluate(&self, event: &Event) -> Outcome {
        let pass = |b: bool| if b { Outcome::Pass } else { Outcome::Fail };
        match self {
            Filter::Exact(name, value) => {
                pass(attribute(event, name).is_some_and(|v| v == value.as_str()))
            }
            Filter::Prefix(name, value) => {
                pass(attribute(event, name).is_some_and(|v| v.starts_with(value.as_str())))
            }
            Filter::Suffix(name, value) => {
                pass(attribute(event, name).is_some_and(|v| v.ends_with(value.as_str())))
            }
            Filter::All(members) => {
                let mut result = Outcome::NoFilter;
                for m in members {
                    result = m.evaluate(event);
                    if result == Outcome::Fail {
                        return Outcome::Fail;
                    }
                }
                result
            }
            Filter::Any(members) => {
                let mut result = Outcome::NoFilter;
                for m in members {
                    match m.evaluate(event) {
                        Outcome::Pass => return Outcome::Pass,
                        Outcome::Fail => result = Outcome::Fail,
                        Outcome::NoFilter => {}
                    }
                }
                result
            }
            Filter::Not(inner) => match inner.evaluate(event) {
                Outcome::Pass => Outcome::Fail,
                Outcome::Fail => Outcome::Pass,
                Outcome::NoFilter => Outcome::NoFilter,
            },
            Filter::Sql(expression) => pass(expression.matches(&Attributes(event))),
            Filter::Attributes(pairs) => pass(pairs.iter().all(|(name, value)| {
                attribute(event, name).is_some_and(|v| value.is_empty() || v == value.as_str())
            })),
        }
    }

    /// Whether `event` is delivered (anything but a fail).
    pub fn matches(&self, event: &Event) -> bool {
        self.evaluate(event) != Outcome::Fail
    }

    /// A condition on the event's `type` without which the filter fails, if it has one: an
    /// `exact` or `prefix` on `type` (or a legacy `type` attribute with a value), alone or as a
    /// member of an `all` (which fails when any member fails). Lets many filters be indexed by
    /// type instead of evaluated one by one.
    pub fn type_condition(&self) -> Option<TypeCondition<'_>> {
        match self {
            Filter::Exact(name, value) if name == "type" => Some(TypeCondition::Exact(value)),
            Filter::Prefix(name, value) if name == "type" => Some(TypeCondition::Prefix(value)),
            Filter::Attributes(pairs) => pairs
                .iter()
                .find(|(name, value)| name == "type" && !value.is_empty())
                .map(|(_, value)| TypeCondition::Exact(value)),
            Filter::All(members) => {
                let conditions = members.iter().filter_map(Filter::type_condition);
                let mut prefix = None;
                for c in conditions {
                    match c {
                        TypeCondition::Exact(_) => return Some(c),
                        TypeCondition::Prefix(_) => prefix = prefix.or(Some(c)),
                    }
                }
                prefix
            }
            _ => None,
        }
    }
}

/// See [`Filter::type_condition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeCondition<'a> {
    /// `type` must be this.
    Exact(&'a str),
    /// `type` must start with this.
    Prefix(&'a str),
}

fn parse_members(json: &Json, path: &str, depth: usize) -> Result<Vec<Filter>, FilterError> {
    let Some(list) = json.as_array() else {
        return Err(refuse(path, "a list of filters"));
    };
    list.iter()
        .enumerate()
        .map(|(i, f)| parse_object(f, &format!("{path}[{i}]"), depth))
        .collect()
}

fn parse_object(json: &Json, path: &str, depth: usize) -> Result<Filter, FilterError> {
    if depth >= MAX_DEPTH {
        return Err(refuse(
            path,
            format!("filters nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    let Some(object) = json.as_object() else {
        return Err(refuse(
            path,
            "a filter object with one of exact, prefix, suffix, all, any, not, cesql",
        ));
    };
    let mut entries = object.iter();
    let (Some((dialect, body)), None) = (entries.next(), entries.next()) else {
        return Err(refuse(
            path,
            "exactly one of exact, prefix, suffix, all, any, not, cesql",
        ));
    };
    let here = format!("{path}.{dialect}");
    match dialect.as_str() {
        "exact" | "prefix" | "suffix" => {
            let (name, value) = one_pair(body, &here)?;
            Ok(match dialect.as_str() {
                "exact" => Filter::Exact(name, value),
                "prefix" => Filter::Prefix(name, value),
                _ => Filter::Suffix(name, value),
            })
        }
        "all" => Ok(Filter::All(parse_members(body, &here, depth + 1)?)),
        "any" => Ok(Filter::Any(parse_members(body, &here, depth + 1)?)),
        "not" => Ok(Filter::Not(Box::new(parse_object(body, &here, depth + 1)?))),
        "cesql" => {
            let Some(source) = body.as_str() else {
                return Err(refuse(&here, "a CESQL expression as a string"));
            };
            cesql::Expression::parse(source)
                .map(|e| Filter::Sql(Box::new(e)))
                .map_err(|e| refuse(&here, format!("not a CESQL expression: {e}")))
        }
        other => Err(refuse(
            path,
            format!("`{other}` is not one of exact, prefix, suffix, all, any, not, cesql"),
        )),
    }
}

/// The one `{"<attribute>": "<value>"}` of an `exact`, `prefix` or `suffix`.
fn one_pair(body: &Json, path: &str) -> Result<(String, String), FilterError> {
    let Some(map) = body.as_object() else {
        return Err(refuse(path, "an object with one attribute and its value"));
    };
    let mut entries = map.iter();
    let (Some((name, value)), None) = (entries.next(), entries.next()) else {
        return Err(refuse(path, "exactly one attribute and its value"));
    };
    if !is_attribute_name(name) {
        return Err(refuse(
            path,
            format!("`{name}` is not a CloudEvents attribute name ([a-z0-9]+)"),
        ));
    }
    match value.as_str() {
        Some(v) if !v.is_empty() => Ok((name.clone(), v.to_owned())),
        _ => Err(refuse(&format!("{path}.{name}"), "a non-empty string")),
    }
}

/// The canonical string form of attribute `name` of `event`, if it has it.
fn attribute<'e>(event: &'e Event, name: &str) -> Option<Cow<'e, str>> {
    Some(match name {
        "specversion" => Cow::Borrowed(event.specversion()),
        "id" => Cow::Borrowed(event.id()),
        "source" => Cow::Borrowed(event.source()),
        "type" => Cow::Borrowed(event.ty()),
        "datacontenttype" => Cow::Borrowed(event.datacontenttype()?),
        "dataschema" => Cow::Borrowed(event.dataschema()?),
        "subject" => Cow::Borrowed(event.subject()?),
        "time" => Cow::Borrowed(event.time()?),
        _ => match event.extension(name)? {
            ExtensionValue::String(s) => Cow::Borrowed(s.as_str()),
            other => Cow::Owned(other.to_string()),
        },
    })
}

/// An event as CESQL reads it: Integer and Boolean extensions keep their type, every other
/// attribute is its string form (CESQL spec 3.2).
struct Attributes<'e>(&'e Event);

impl cesql::Event for Attributes<'_> {
    fn attribute(&self, name: &str) -> Option<cesql::Value<'_>> {
        match self.0.extension(name) {
            Some(ExtensionValue::Integer(i)) => Some(cesql::Value::Integer(*i)),
            Some(ExtensionValue::Boolean(b)) => Some(cesql::Value::Boolean(*b)),
            _ => attribute(self.0, name).map(cesql::Value::String),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn event() -> Event {
        let mut e = Event::new("1", "/sensors/7", "com.example.reading").unwrap();
        e.set_subject(Some("room-1".into())).unwrap();
        e.set_extension("sequence", ExtensionValue::Integer(10))
            .unwrap();
        e.set_extension("region", ExtensionValue::String("eu-west".into()))
            .unwrap();
        e
    }

    fn outcome(filter: Json) -> Outcome {
        Filter::parse(&filter, "f").unwrap().evaluate(&event())
    }

    #[test]
    fn each_dialect_as_knative() {
        use Outcome::*;
        for (filter, expected) in [
            (json!({"exact": {"type": "com.example.reading"}}), Pass),
            (json!({"exact": {"type": "com.example"}}), Fail),
            (json!({"exact": {"sequence": "10"}}), Pass),
            // A missing attribute never matches exact, prefix or suffix.
            (json!({"exact": {"missing": "x"}}), Fail),
            (json!({"prefix": {"missing": "x"}}), Fail),
            (json!({"suffix": {"missing": "x"}}), Fail),
            (json!({"prefix": {"source": "/sensors/"}}), Pass),
            (json!({"prefix": {"source": "/actuators/"}}), Fail),
            (json!({"suffix": {"type": ".reading"}}), Pass),
            (json!({"suffix": {"region": "east"}}), Fail),
            (json!({"all": []}), NoFilter),
            (json!({"any": []}), NoFilter),
            (
                json!({"all": [{"prefix": {"type": "com."}}, {"exact": {"subject": "room-1"}}]}),
                Pass,
            ),
            (
                json!({"all": [{"prefix": {"type": "com."}}, {"exact": {"subject": "room-2"}}]}),
                Fail,
            ),
            (
                json!({"any": [{"exact": {"subject": "room-2"}}, {"exact": {"region": "eu-west"}}]}),
                Pass,
            ),
            (
                json!({"any": [{"exact": {"subject": "room-2"}}, {"exact": {"region": "us"}}]}),
                Fail,
            ),
            (json!({"any": [{"all": []}]}), NoFilter),
            (json!({"not": {"exact": {"subject": "room-2"}}}), Pass),
            (json!({"not": {"exact": {"subject": "room-1"}}}), Fail),
            (json!({"not": {"all": []}}), NoFilter),
            (
                json!({"not": {"any": [{"not": {"prefix": {"id": "1"}}}]}}),
                Pass,
            ),
            (
                json!({"cesql": "sequence > 9 AND region LIKE 'eu-%'"}),
                Pass,
            ),
            (json!({"cesql": "sequence > 10"}), Fail),
            // An evaluation error (a missing attribute) fails the event.
            (json!({"cesql": "missing = 'x' OR TRUE"}), Fail),
        ] {
            assert_eq!(outcome(filter.clone()), expected, "{filter}");
        }
    }

    #[test]
    fn a_list_is_all_and_the_legacy_map_is_exact_with_any_value() {
        let list = Filter::parse_list(
            &json!([{"exact": {"type": "com.example.reading"}}, {"prefix": {"subject": "room"}}]),
            "filters",
        )
        .unwrap();
        assert!(list.matches(&event()));
        assert!(
            Filter::parse_list(&json!([]), "filters")
                .unwrap()
                .matches(&event())
        );
        let legacy = |m: Json| Filter::attributes(&m, "filter.attributes").unwrap();
        assert!(legacy(json!({"type": "com.example.reading", "source": ""})).matches(&event()));
        assert!(!legacy(json!({"type": "com.example.reading", "source": "/x"})).matches(&event()));
        // "" is any value, but the attribute must exist.
        assert!(!legacy(json!({"dataschema": ""})).matches(&event()));
        assert!(legacy(json!({})).matches(&event()));
    }

    #[test]
    fn bad_filters_are_refused_naming_where() {
        for (filter, path, reason) in [
            (
                json!({"exact": {"type": "a", "source": "b"}}),
                "f.exact",
                "exactly one",
            ),
            (json!({"exact": {}}), "f.exact", "exactly one"),
            (
                json!({"prefix": {"type": ""}}),
                "f.prefix.type",
                "non-empty",
            ),
            (
                json!({"suffix": {"Type": "x"}}),
                "f.suffix",
                "attribute name",
            ),
            (
                json!({"exact": {"type": 7}}),
                "f.exact.type",
                "non-empty string",
            ),
            (
                json!({"exact": {"type": "a"}, "prefix": {"type": "b"}}),
                "f",
                "exactly one",
            ),
            (json!({}), "f", "exactly one"),
            (json!({"regex": {"type": "a"}}), "f", "`regex`"),
            (json!({"all": {"exact": {"type": "a"}}}), "f.all", "a list"),
            (
                json!({"any": [{"exact": {"type": "a"}}, 3]}),
                "f.any[1]",
                "a filter object",
            ),
            (
                json!({"not": [{"exact": {"type": "a"}}]}),
                "f.not",
                "a filter object",
            ),
            (json!({"cesql": "type ="}), "f.cesql", "CESQL"),
            (json!({"cesql": 1}), "f.cesql", "string"),
        ] {
            let e = Filter::parse(&filter, "f").unwrap_err();
            assert_eq!(e.path, path, "{filter}: {e}");
            assert!(e.reason.contains(reason), "{filter}: {e}");
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let mut deep = json!({"exact": {"type": "a"}});
        for _ in 0..MAX_DEPTH - 1 {
            deep = json!({"not": deep});
        }
        assert!(Filter::parse(&deep, "f").is_ok());
        let deeper = json!({"not": deep});
        let e = Filter::parse(&deeper, "f").unwrap_err();
        assert!(e.reason.contains("deeper"), "{e}");
    }

    /// Filter documents from config or the admin API are hostile input: any JSON is refused
    /// or made into a filter, never a panic, and a made filter evaluates without one.
    #[test]
    fn fuzz_event_filter() {
        let seeds: [&[u8]; 4] = [
            br#"{"all":[{"exact":{"type":"a"}},{"not":{"prefix":{"source":"/x"}}}]}"#,
            br#"{"any":[{"suffix":{"subject":".b"}},{"cesql":"sequence > 3 AND region LIKE 'e%'"}]}"#,
            br#"{"not":{"not":{"not":{"all":[]}}}}"#,
            br#"[{"exact":{"sequence":"10"}},{"any":[]}]"#,
        ];
        meshgate_fuzz::run(
            "event_filter",
            meshgate_fuzz::bytes("event_filter", &seeds, 256),
            |b| Some(b.to_vec()),
            |bytes| {
                let Ok(json) = serde_json::from_slice::<Json>(&bytes) else {
                    return Ok(());
                };
                let made = if json.is_array() {
                    Filter::parse_list(&json, "f")
                } else {
                    Filter::parse(&json, "f")
                };
                if let Ok(filter) = made {
                    let _ = filter.evaluate(&event());
                }
                let _ = Filter::attributes(&json, "f").map(|f| f.matches(&event()));
                Ok(())
            },
        );
    }

    #[test]
    fn type_conditions_are_necessary_conditions() {
        use serde_json::json;
        let cases = [
            (
                json!([{"exact": {"type": "a.b"}}]),
                Some(TypeCondition::Exact("a.b")),
            ),
            (
                json!([{"prefix": {"type": "a."}}, {"exact": {"type": "a.c"}}]),
                Some(TypeCondition::Exact("a.c")),
            ),
            (
                json!([{"prefix": {"type": "a."}}, {"cesql": "true"}]),
                Some(TypeCondition::Prefix("a.")),
            ),
            (
                json!([{"all": [{"exact": {"type": "x"}}]}]),
                Some(TypeCondition::Exact("x")),
            ),
            (json!([{"any": [{"exact": {"type": "x"}}]}]), None),
            (json!([{"not": {"exact": {"type": "x"}}}]), None),
            (json!([{"exact": {"source": "x"}}]), None),
        ];
        for (doc, want) in cases {
            let f = Filter::parse_list(&doc, "filters").unwrap();
            assert_eq!(f.type_condition(), want, "{doc}");
        }
        let legacy = Filter::attributes(&json!({"type": "t", "source": ""}), "a").unwrap();
        assert_eq!(legacy.type_condition(), Some(TypeCondition::Exact("t")));
        let any_type = Filter::attributes(&json!({"type": ""}), "a").unwrap();
        assert_eq!(any_type.type_condition(), None);
    }
}
