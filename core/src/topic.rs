//! The one address space shared by every protocol.
//!
//! A [`Topic`] is a list of levels. Its canonical text is the MQTT form (`a/b/c`), because MQTT is
//! the most permissive of the protocols: levels may be empty and may hold any character but `/`,
//! `+`, `#` and NUL. Other protocols get a reversible mapping:
//!
//! | protocol | topic `a/b.c/` | filter `a/+/#` |
//! |---|---|---|
//! | MQTT | `a/b.c/` | `a/+/#` |
//! | NATS (prefix `mg`) | `mg.a.b%2Ec.%` | `mg.a.*.>` and `mg.a.*` |
//! | AMQP routing key | `a.b%2Ec.%` | `a.*.#` |
//! | URL path | `a/b.c/` (segments percent-encoded) | — |
//!
//! In NATS and AMQP tokens `%`, `.`, `*`, `>`, `#`, space and control characters are written as
//! `%XX`; an empty level is the token `%` (which cannot otherwise occur, since `%` itself is
//! escaped).

use std::fmt;
use std::sync::Arc;

mod index;
pub use index::TopicIndex;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// Maximum length of a topic in bytes (MQTT's UTF-8 string limit).
pub const MAX_TOPIC_LEN: usize = 65_535;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    #[error("topic `{0}` contains a NUL character")]
    Nul(String),
    #[error("topic `{0}` contains a wildcard (`+` or `#`); wildcards are only allowed in filters")]
    Wildcard(String),
    #[error(
        "topic filter `{0}`: `#` must be the last level and alone in it, `+` alone in its level"
    )]
    BadWildcard(String),
    #[error("`{0}` is not a valid {1}")]
    Mapping(String, &'static str),
}

/// A concrete topic name (no wildcards). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", &*self.0)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::Nul(s.to_owned()));
    }
    Ok(())
}

impl Topic {
    /// Parses an MQTT topic name.
    pub fn from_mqtt(s: &str) -> Result<Topic, TopicError> {
        check_common(s)?;
        if s.contains(['+', '#']) {
            return Err(TopicError::Wildcard(s.to_owned()));
        }
        Ok(Topic(Arc::from(s)))
    }

    /// Builds a topic from its levels.
    pub fn from_levels<I, S>(levels: I) -> Result<Topic, TopicError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut s = String::new();
        for (i, level) in levels.into_iter().enumerate() {
            let level = level.as_ref();
            if level.contains('/') {
                return Err(TopicError::Mapping(
                    level.to_owned(),
                    "topic level (contains `/`)",
                ));
            }
            if i > 0 {
                s.push('/');
            }
            s.push_str(level);
        }
        Topic::from_mqtt(&s)
    }

    /// The MQTT form, which is also the canonical form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn levels(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The topic's text as a shared string (a reference count, no copy): the subject of the
    /// events wrapped on this topic.
    pub fn shared_str(&self) -> Arc<str> {
        self.0.clone()
    }

    /// The NATS subject `<prefix>.<escaped levels>`; an empty prefix gives no leading dot.
    pub fn to_nats_subject(&self, prefix: &str) -> String {
        let mut out = String::with_capacity(prefix.len() + self.0.len() + 8);
        self.push_nats_subject(prefix, &mut out);
        out
    }

    /// Appends [`Topic::to_nats_subject`] to `out`.
    pub fn push_nats_subject(&self, prefix: &str, out: &mut String) {
        if !prefix.is_empty() {
            out.push_str(prefix);
            out.push('.');
        }
        push_tokens(out, self.levels());
    }

    /// Reverses [`Topic::to_nats_subject`].
    pub fn from_nats_subject(prefix: &str, subject: &str) -> Result<Topic, TopicError> {
        let rest = if prefix.is_empty() {
            subject
        } else {
            subject
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('.'))
                .ok_or_else(|| {
                    TopicError::Mapping(subject.to_owned(), "subject under this prefix")
                })?
        };
        from_tokens(rest, "NATS subject")
    }

    /// The AMQP topic-exchange routing key (`.`-separated words).
    pub fn to_amqp_routing_key(&self) -> String {
        let mut out = String::with_capacity(self.0.len() + 8);
        push_tokens(&mut out, self.levels());
        out
    }

    pub fn from_amqp_routing_key(key: &str) -> Result<Topic, TopicError> {
        from_tokens(key, "AMQP routing key")
    }

    /// The URL path form: levels percent-encoded and joined by `/` (no leading slash).
    pub fn to_url_path(&self) -> String {
        let mut out = String::with_capacity(self.0.len() + 8);
        for (i, level) in self.levels().enumerate() {
            if i > 0 {
                out.push('/');
            }
            out.extend(utf8_percent_encode(level, PATH_SEGMENT));
        }
        out
    }

    /// Parses a URL path (without the route prefix or leading slash): each `/`-separated segment
    /// is one level, percent-decoded (strict UTF-8).
    pub fn from_url_path(path: &str) -> Result<Topic, TopicError> {
        let mut levels = Vec::new();
        for segment in path.split('/') {
            let level = percent_decode_str(segment)
                .decode_utf8()
                .map_err(|_| TopicError::Mapping(path.to_owned(), "URL path (invalid UTF-8)"))?;
            levels.push(level.into_owned());
        }
        Topic::from_levels(levels)
    }
}

/// Characters escaped in URL path segments: everything but RFC 3986 `pchar` minus `%`.
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

fn token_needs_escape(c: char) -> bool {
    matches!(c, '%' | '.' | '*' | '>' | '#' | ' ') || c.is_control() || c.is_whitespace()
}

fn push_token(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push('%');
        return;
    }
    for c in level.chars() {
        if token_needs_escape(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xF)]));
            }
        } else {
            out.push(c);
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_tokens<'a>(out: &mut String, levels: impl Iterator<Item = &'a str>) {
    for (i, level) in levels.enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_token(out, level);
    }
}

fn from_tokens(s: &str, what: &'static str) -> Result<Topic, TopicError> {
    let bad = || TopicError::Mapping(s.to_owned(), what);
    if s.is_empty() {
        return Err(bad());
    }
    // Levels written straight into the topic, no `String` per level: this runs for every
    // message received from NATS.
    let mut topic = String::with_capacity(s.len());
    for (i, token) in s.split('.').enumerate() {
        if i > 0 {
            topic.push('/');
        }
        if token == "%" {
            continue;
        }
        if token.is_empty() || token == "*" || token == ">" || token == "#" {
            return Err(bad());
        }
        let level = percent_decode_str(token).decode_utf8().map_err(|_| bad())?;
        if level.contains('/') {
            return Err(TopicError::Mapping(
                level.into_owned(),
                "topic level (contains `/`)",
            ));
        }
        topic.push_str(&level);
    }
    Topic::from_mqtt(&topic)
}

/// One level of a topic filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterLevel<'a> {
    Literal(&'a str),
    /// `+`: exactly one level.
    Single,
    /// `#`: this level and every level below, including none (`a/#` matches `a`).
    Multi,
}

/// A topic filter in MQTT syntax. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(Arc<str>);

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicFilter({:?})", &*self.0)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TopicFilter {
    /// Parses an MQTT topic filter (`+` and `#` wildcards, MQTT 3.1.1 §4.7).
    pub fn parse(s: &str) -> Result<TopicFilter, TopicError> {
        check_common(s)?;
        let count = s.split('/').count();
        for (i, level) in s.split('/').enumerate() {
            let ok = match level {
                "#" => i + 1 == count,
                "+" => true,
                l => !l.contains(['+', '#']),
            };
            if !ok {
                return Err(TopicError::BadWildcard(s.to_owned()));
            }
        }
        Ok(TopicFilter(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The filter's text, shared (no copy).
    pub fn shared_str(&self) -> Arc<str> {
        self.0.clone()
    }

    pub fn levels(&self) -> impl Iterator<Item = FilterLevel<'_>> {
        self.0.split('/').map(|l| match l {
            "+" => FilterLevel::Single,
            "#" => FilterLevel::Multi,
            l => FilterLevel::Literal(l),
        })
    }

    pub fn has_wildcards(&self) -> bool {
        self.levels().any(|l| !matches!(l, FilterLevel::Literal(_)))
    }

    /// Does `topic` match this filter? Topics starting with `$` are not matched by a filter
    /// starting with a wildcard (MQTT 3.1.1 §4.7.2).
    pub fn matches(&self, topic: &Topic) -> bool {
        // Byte by byte rather than through `levels()`: this runs for every subscription on every
        // publish (and for ACL rules), and `str::split` showed up in the MQTT benchmark profile.
        let (f, t) = (self.0.as_bytes(), topic.as_str().as_bytes());
        if t.first() == Some(&b'$') && matches!(f.first(), Some(b'+' | b'#')) {
            return false;
        }
        let level_end = |s: &[u8], from: usize| {
            s[from..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(s.len(), |p| from + p)
        };
        // `i`: start of the current filter level; `j`: start of the current topic level, or
        // `None` once the topic has no levels left.
        let (mut i, mut j) = (0, Some(0));
        loop {
            let fe = level_end(f, i);
            let level = &f[i..fe];
            if level == b"#" {
                return true;
            }
            let Some(start) = j else { return false };
            let te = level_end(t, start);
            if level != b"+" && level != &t[start..te] {
                return false;
            }
            match (fe == f.len(), te == t.len()) {
                (true, topic_done) => return topic_done,
                (false, true) => j = None,
                (false, false) => j = Some(te + 1),
            }
            i = fe + 1;
        }
    }

    /// Is every topic matched by `other` also matched by `self`? Used by the authorizer to
    /// decide whether a requested subscription stays inside what a principal may see.
    ///
    /// The `$` rule applies as in [`TopicFilter::matches`]: a filter starting with a wildcard
    /// matches no `$…` topic, so it does not cover a filter whose first level is a literal
    /// starting with `$` (ACL `#` does not grant `$SYS/#`).
    pub fn covers(&self, other: &TopicFilter) -> bool {
        if matches!(self.0.as_bytes().first(), Some(b'+' | b'#'))
            && other.0.as_bytes().first() == Some(&b'$')
        {
            return false;
        }
        let mut mine = self.levels();
        let mut theirs = other.levels();
        loop {
            match (mine.next(), theirs.next()) {
                (Some(FilterLevel::Multi), _) => return true,
                (
                    Some(FilterLevel::Single),
                    Some(FilterLevel::Single | FilterLevel::Literal(_)),
                ) => {}
                (Some(FilterLevel::Literal(a)), Some(FilterLevel::Literal(b))) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// Is there a topic that both `self` and `other` match? Used by the authorizer to tell
    /// whether a deny rule touches a requested subscription (whose deliveries are then checked
    /// one by one). The `$` rule of [`TopicFilter::matches`] applies: `#` and `$SYS/#` share no
    /// topic.
    pub fn intersects(&self, other: &TopicFilter) -> bool {
        let wild_first = |f: &TopicFilter| matches!(f.0.as_bytes().first(), Some(b'+' | b'#'));
        let dollar_first = |f: &TopicFilter| f.0.as_bytes().first() == Some(&b'$');
        if (wild_first(self) && dollar_first(other)) || (wild_first(other) && dollar_first(self)) {
            return false;
        }
        let mut mine = self.levels();
        let mut theirs = other.levels();
        loop {
            match (mine.next(), theirs.next()) {
                // `a/#` matches `a` too, so `#` meets whatever is left, even nothing.
                (Some(FilterLevel::Multi), _) | (_, Some(FilterLevel::Multi)) => return true,
                (None, None) => return true,
                (Some(FilterLevel::Single), Some(_)) | (Some(_), Some(FilterLevel::Single)) => {}
                (Some(FilterLevel::Literal(a)), Some(FilterLevel::Literal(b))) if a == b => {}
                _ => return false,
            }
        }
    }

    /// The filter as NATS subjects. MQTT's `a/#` also matches `a`, NATS's `a.>` does not, so
    /// such a filter needs two subjects.
    pub fn to_nats_subjects(&self, prefix: &str) -> Vec<String> {
        let mut parts: Vec<String> = Vec::new();
        if !prefix.is_empty() {
            parts.push(prefix.to_owned());
        }
        let mut wrote_level = false;
        for level in self.levels() {
            match level {
                FilterLevel::Multi => {
                    let mut subjects = Vec::with_capacity(2);
                    if wrote_level {
                        subjects.push(parts.join("."));
                    }
                    parts.push(">".to_owned());
                    subjects.push(parts.join("."));
                    return subjects;
                }
                FilterLevel::Single => parts.push("*".to_owned()),
                FilterLevel::Literal(l) => {
                    let mut token = String::new();
                    push_token(&mut token, l);
                    parts.push(token);
                }
            }
            wrote_level = true;
        }
        vec![parts.join(".")]
    }

    /// The filter as an AMQP topic-exchange binding key (`*` one word, `#` zero or more).
    pub fn to_amqp_binding_key(&self) -> String {
        let mut out = String::new();
        for (i, level) in self.levels().enumerate() {
            if i > 0 {
                out.push('.');
            }
            match level {
                FilterLevel::Single => out.push('*'),
                FilterLevel::Multi => out.push('#'),
                FilterLevel::Literal(l) => push_token(&mut out, l),
            }
        }
        out
    }

    /// Replaces `{user}` in a filter template with a principal's name (ACL templates).
    pub fn from_template(template: &str, user: &str) -> Result<TopicFilter, TopicError> {
        TopicFilter::parse(&template.replace("{user}", user))
    }
}

impl From<Topic> for TopicFilter {
    fn from(t: Topic) -> Self {
        TopicFilter(t.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> Topic {
        Topic::from_mqtt(s).unwrap()
    }
    fn f(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    /// The level-by-level definition [`TopicFilter::matches`] must agree with.
    fn reference_matches(filter: &TopicFilter, topic: &Topic) -> bool {
        if topic.as_str().starts_with('$')
            && matches!(
                filter.levels().next(),
                Some(FilterLevel::Single | FilterLevel::Multi)
            )
        {
            return false;
        }
        let (mut fl, mut tl) = (filter.levels(), topic.levels());
        loop {
            match (fl.next(), tl.next()) {
                (Some(FilterLevel::Multi), _) => return true,
                (Some(FilterLevel::Single), Some(_)) => {}
                (Some(FilterLevel::Literal(a)), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn filter_syntax() {
        for ok in ["#", "+", "a/#", "+/+/c", "a//b", "/"] {
            assert!(TopicFilter::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["a#", "a/#/b", "a+/b", "", "a/b#"] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad}");
        }
        assert!(Topic::from_mqtt("a/+").is_err());
    }

    #[test]
    fn matching() {
        assert!(f("a/#").matches(&t("a")));
        assert!(f("a/#").matches(&t("a/b/c")));
        assert!(f("a/+").matches(&t("a/b")));
        assert!(!f("a/+").matches(&t("a/b/c")));
        assert!(!f("a/+").matches(&t("a")));
        assert!(f("+/+").matches(&t("/finance")));
        assert!(!f("#").matches(&t("$SYS/x")));
        assert!(f("$SYS/#").matches(&t("$SYS/x")));
        assert!(f("a//b").matches(&t("a//b")));
        assert!(f("a/+").matches(&t("a/")));
        assert!(!f("+").matches(&t("/")));
        assert!(f("#").matches(&t("/")));
        assert!(!f("a/#").matches(&t("ab")));
        assert!(!f("a/b").matches(&t("a/bc")));
        assert!(!f("a/bc").matches(&t("a/b")));
        assert!(f("+/#").matches(&t("a")));
    }

    #[test]
    fn covering() {
        assert!(f("#").covers(&f("a/+/c")));
        assert!(f("a/+").covers(&f("a/b")));
        assert!(!f("a/+").covers(&f("a/#")));
        assert!(f("a/#").covers(&f("a/b/#")));
        assert!(!f("a/b").covers(&f("a/+")));
    }

    #[test]
    fn f16_covering_keeps_the_dollar_rule_of_matching() {
        // `#` and `+/…` match no `$…` topic, so they grant no `$…` subscription.
        assert!(!f("#").covers(&f("$SYS/#")));
        assert!(!f("#").covers(&f("$SYS/broker/load")));
        assert!(!f("+/x").covers(&f("$x/x")));
        assert!(!f("+/#").covers(&f("$share/#")));
        assert!(!f("#").matches(&t("$SYS/a")), "as matching says");
        // A filter that names the `$` level explicitly does.
        assert!(f("$SYS/#").covers(&f("$SYS/broker/load")));
        assert!(f("$SYS/+").covers(&f("$SYS/a")));
        // Wildcard requests match no `$…` topic either, so `#` still covers them.
        assert!(f("#").covers(&f("+/x")));
        assert!(f("#").covers(&f("#")));
        // Covering implies matching on every `$` topic too.
        for topic in ["$SYS/a", "$x/x", "$SYS/broker/load"] {
            for (mine, theirs) in [("#", "$SYS/#"), ("$SYS/#", "$SYS/a"), ("+/x", "$x/x")] {
                if f(mine).covers(&f(theirs)) && f(theirs).matches(&t(topic)) {
                    assert!(
                        f(mine).matches(&t(topic)),
                        "{mine} covers {theirs} but misses {topic}"
                    );
                }
            }
        }
    }

    #[test]
    fn intersecting() {
        assert!(f("test/#").intersects(&f("test/nosubscribe")));
        assert!(f("test/nosubscribe").intersects(&f("test/#")));
        assert!(f("+/+").intersects(&f("test/nosubscribe")));
        assert!(f("a").intersects(&f("a/#")), "a/# matches a");
        assert!(f("a/+").intersects(&f("+/b")));
        assert!(f("#").intersects(&f("+")));
        assert!(!f("a/+").intersects(&f("a")));
        assert!(!f("a/b").intersects(&f("a/c")));
        assert!(!f("a/+").intersects(&f("a/b/c")));
        // The `$` rule: wildcards at the first level meet no `$…` topic.
        assert!(!f("#").intersects(&f("$SYS/#")));
        assert!(!f("$SYS/x").intersects(&f("+/x")));
        assert!(f("$SYS/+").intersects(&f("$SYS/#")));
    }

    /// Every topic of up to 4 levels over a few level names (a `$` one, and one no filter
    /// below names): enough to find a topic common to two filters of up to 4 levels.
    fn small_topics() -> Vec<Topic> {
        let names = ["a", "b", "$s", "z"];
        let mut all: Vec<Vec<&str>> = vec![vec![]];
        let mut out = Vec::new();
        for _ in 0..4 {
            all = all
                .iter()
                .flat_map(|p| {
                    names.iter().map(move |n| {
                        let mut v = p.clone();
                        v.push(*n);
                        v
                    })
                })
                .collect();
            out.extend(all.iter().map(|levels| Topic::from_levels(levels).unwrap()));
        }
        out
    }

    fn small_filter() -> impl Strategy<Value = TopicFilter> {
        proptest::collection::vec(prop_oneof!["a", "b", "\\$s", "\\+", "#"], 1..5)
            .prop_filter_map("bad wildcard", |levels| {
                TopicFilter::parse(&levels.join("/")).ok()
            })
    }

    #[test]
    fn nats_and_amqp_forms() {
        assert_eq!(t("a/b.c/").to_nats_subject("mg"), "mg.a.b%2Ec.%");
        assert_eq!(
            f("a/+/#").to_nats_subjects("mg"),
            vec!["mg.a.*", "mg.a.*.>"]
        );
        assert_eq!(f("#").to_nats_subjects("mg"), vec!["mg.>"]);
        assert_eq!(f("#").to_nats_subjects(""), vec![">"]);
        assert_eq!(f("a/+/#").to_amqp_binding_key(), "a.*.#");
        assert_eq!(t("x y/*").to_amqp_routing_key(), "x%20y.%2A");
        assert!(Topic::from_nats_subject("mg", "other.a").is_err());
        assert!(Topic::from_nats_subject("mg", "mg.a..b").is_err());
    }

    fn level() -> impl Strategy<Value = String> {
        // Any characters MQTT allows in a level, including the ones other protocols reserve.
        proptest::string::string_regex("[a-zA-Z0-9 .*>%$~_\\-\u{e9}\u{20ac}\u{1f600}\t]{0,6}")
            .unwrap()
    }

    fn topic() -> impl Strategy<Value = Topic> {
        proptest::collection::vec(level(), 1..6)
            .prop_filter_map("empty topic", |levels| Topic::from_levels(levels).ok())
    }

    proptest! {
        #[test]
        fn nats_round_trip(topic in topic()) {
            let subject = topic.to_nats_subject("meshgate");
            prop_assert!(!subject.contains(' '));
            prop_assert!(subject.split('.').all(|tok| !tok.is_empty() && tok != "*" && tok != ">"));
            prop_assert_eq!(Topic::from_nats_subject("meshgate", &subject).unwrap(), topic);
        }

        #[test]
        fn amqp_round_trip(topic in topic()) {
            let key = topic.to_amqp_routing_key();
            prop_assert!(key.split('.').all(|w| w != "*" && w != "#"));
            prop_assert_eq!(Topic::from_amqp_routing_key(&key).unwrap(), topic);
        }

        #[test]
        fn url_round_trip(topic in topic()) {
            let path = topic.to_url_path();
            prop_assert!(!path.contains(['?', '#', ' ']));
            prop_assert_eq!(Topic::from_url_path(&path).unwrap(), topic);
        }

        #[test]
        fn levels_round_trip(topic in topic()) {
            let levels: Vec<String> = topic.levels().map(str::to_owned).collect();
            prop_assert_eq!(Topic::from_levels(levels).unwrap(), topic);
        }

        #[test]
        fn matches_agrees_with_level_by_level_matching(
            topic in topic(),
            other in topic(),
            same in any::<bool>(),
            cut in 0usize..6,
            wild in proptest::collection::vec(0u8..4, 0..6),
        ) {
            // A filter made from the topic itself (or another one), shortened or not, with some
            // levels replaced by wildcards.
            let base = if same { &topic } else { &other };
            let mut levels: Vec<String> = base.levels().map(str::to_owned).collect();
            if cut < levels.len() && cut > 0 {
                levels.truncate(cut);
            }
            let last = levels.len().saturating_sub(1);
            for (n, w) in wild.iter().enumerate() {
                if let Some(l) = levels.get_mut(n) {
                    match w {
                        1 => *l = "+".into(),
                        2 if n == last => *l = "#".into(),
                        _ => {}
                    }
                }
            }
            if let Ok(filter) = TopicFilter::parse(&levels.join("/")) {
                prop_assert_eq!(filter.matches(&topic), reference_matches(&filter, &topic));
                let same = TopicFilter::from(topic.clone());
                prop_assert!(same.matches(&topic));
            }
        }

        #[test]
        fn intersects_and_covers_agree_with_matching(a in small_filter(), b in small_filter()) {
            let topics = small_topics();
            let common = topics.iter().any(|t| a.matches(t) && b.matches(t));
            prop_assert_eq!(a.intersects(&b), common, "{} and {}", a, b);
            prop_assert_eq!(b.intersects(&a), common, "{} and {}", b, a);
            if a.covers(&b) {
                for t in topics.iter().filter(|t| b.matches(t)) {
                    prop_assert!(a.matches(t), "{} covers {} but misses {}", a, b, t);
                }
            }
        }

        #[test]
        fn a_topic_as_filter_matches_itself(topic in topic()) {
            prop_assert!(TopicFilter::from(topic.clone()).matches(&topic));
        }
    }
}
