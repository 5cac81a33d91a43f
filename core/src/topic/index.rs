//! A topic filter index: which of many filters match a topic, at a cost that depends on the
//! topic's levels and on the filters that match, not on how many filters there are.
//!
//! A trie of filter levels, as brokers keep it (Mosquitto's subscription tree, nats-server's
//! sublist): each node has its literal children by level text, one `+` child, the values whose
//! filter ends at the node, and the values whose filter continues with `#` there. Matching walks
//! the topic's levels down the literal child and the `+` child of each node, collecting the
//! `#` values on the way; MQTT's rules are [`TopicFilter::matches`]'s: `#` matches its parent
//! level too (`a/#` matches `a`), and a filter starting with a wildcard matches no topic
//! starting with `$`. A linear scan at ~24 ns a filter made 10,000 idle device subscriptions
//! cost every publish 240 µs (issue 27).

use std::collections::HashMap;

use super::{FilterLevel, Topic, TopicFilter};

/// Values of type `V` under topic filters.
#[derive(Debug)]
pub struct TopicIndex<V> {
    root: Node<V>,
    len: usize,
}

#[derive(Debug)]
struct Node<V> {
    literal: HashMap<Box<str>, Node<V>>,
    plus: Option<Box<Node<V>>>,
    /// Values whose filter ends at this node.
    ends: Vec<V>,
    /// Values whose filter's next (and last) level is `#`.
    hash: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            literal: HashMap::new(),
            plus: None,
            ends: Vec::new(),
            hash: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.plus.is_none()
            && self.ends.is_empty()
            && self.hash.is_empty()
    }
}

impl<V> Default for TopicIndex<V> {
    fn default() -> Self {
        TopicIndex {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V> TopicIndex<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of values held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `value` under `filter` (a filter may hold many values).
    pub fn insert(&mut self, filter: &TopicFilter, value: V) {
        let mut node = &mut self.root;
        for level in filter.levels() {
            node = match level {
                FilterLevel::Literal(l) => node.literal.entry(Box::from(l)).or_default(),
                FilterLevel::Single => node.plus.get_or_insert_with(Box::default),
                FilterLevel::Multi => {
                    push_first_exact(&mut node.hash, value);
                    self.len += 1;
                    return;
                }
            };
        }
        push_first_exact(&mut node.ends, value);
        self.len += 1;
    }

    /// Removes and returns the first value under `filter` for which `which` is true; empty
    /// branches are pruned.
    pub fn remove(&mut self, filter: &TopicFilter, which: impl FnMut(&V) -> bool) -> Option<V> {
        let levels: Vec<FilterLevel<'_>> = filter.levels().collect();
        let removed = remove_in(&mut self.root, &levels, which);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f` with every value whose filter matches `topic`, each once.
    pub fn for_each_match<'a>(&'a self, topic: &Topic, mut f: impl FnMut(&'a V)) {
        let dollar = topic.as_str().starts_with('$');
        let levels: smallvec_levels::Levels<'_> = smallvec_levels::Levels::of(topic);
        visit(&self.root, levels.as_slice(), true, dollar, &mut f);
    }

    /// Calls `f` with every value and its filter's text (the levels it was inserted under,
    /// joined by `/`), in no particular order; the values of one filter one after another. For
    /// listings (the admin API), not for the publish path: it visits the whole trie.
    pub fn for_each(&self, mut f: impl FnMut(&str, &V)) {
        let mut filter = String::new();
        walk(&self.root, &mut filter, true, &mut f);
    }

    /// Removes every value.
    pub fn clear(&mut self) {
        self.root = Node::default();
        self.len = 0;
    }
}

/// Pushes `value`, allocating room for exactly one when `values` has none: most filters hold
/// one subscription (a device's own topic), and `Vec::push` makes room for four (a 64-byte
/// memory backbone entry: 192 bytes never used, per distinct filter).
fn push_first_exact<V>(values: &mut Vec<V>, value: V) {
    if values.capacity() == 0 {
        values.reserve_exact(1);
    }
    values.push(value);
}

fn remove_in<V>(
    node: &mut Node<V>,
    levels: &[FilterLevel<'_>],
    mut which: impl FnMut(&V) -> bool,
) -> Option<V> {
    let Some((first, rest)) = levels.split_first() else {
        let at = node.ends.iter().position(&mut which)?;
        return Some(node.ends.swap_remove(at));
    };
    match first {
        FilterLevel::Multi => {
            let at = node.hash.iter().position(&mut which)?;
            Some(node.hash.swap_remove(at))
        }
        FilterLevel::Single => {
            let child = node.plus.as_deref_mut()?;
            let removed = remove_in(child, rest, which);
            if child.is_empty() {
                node.plus = None;
            }
            removed
        }
        FilterLevel::Literal(l) => {
            let child = node.literal.get_mut(*l)?;
            let removed = remove_in(child, rest, which);
            if child.is_empty() {
                node.literal.remove(*l);
            }
            removed
        }
    }
}

/// `levels`: the topic's levels not matched yet. `root`: at the first level, where wildcards
/// do not match a `$` topic.
fn visit<'a, V>(
    node: &'a Node<V>,
    levels: &[&str],
    root: bool,
    dollar: bool,
    f: &mut impl FnMut(&'a V),
) {
    let wild = !(root && dollar);
    if wild {
        // `…/#` matches here (its parent level) and everything below.
        node.hash.iter().for_each(&mut *f);
    }
    let Some((first, rest)) = levels.split_first() else {
        node.ends.iter().for_each(&mut *f);
        return;
    };
    if let Some(child) = node.literal.get(*first) {
        visit(child, rest, false, dollar, f);
    }
    if wild && let Some(child) = node.plus.as_deref() {
        visit(child, rest, false, dollar, f);
    }
}

/// [`TopicIndex::for_each`] below `node`, whose filter so far is `filter` (`root`: no level
/// yet, so the next one is not preceded by `/`).
fn walk<V>(node: &Node<V>, filter: &mut String, root: bool, f: &mut impl FnMut(&str, &V)) {
    for value in &node.ends {
        f(filter, value);
    }
    // The filter one level further down: `filter` until `truncate`.
    let down = |filter: &mut String, level: &str| {
        let len = filter.len();
        if !root {
            filter.push('/');
        }
        filter.push_str(level);
        len
    };
    if !node.hash.is_empty() {
        let len = down(filter, "#");
        for value in &node.hash {
            f(filter, value);
        }
        filter.truncate(len);
    }
    for (level, child) in &node.literal {
        let len = down(filter, level);
        walk(child, filter, false, f);
        filter.truncate(len);
    }
    if let Some(child) = node.plus.as_deref() {
        let len = down(filter, "+");
        walk(child, filter, false, f);
        filter.truncate(len);
    }
}

/// A topic's levels without a heap allocation for the usual depth.
mod smallvec_levels {
    use super::Topic;

    const INLINE: usize = 16;

    // Lives on the stack for one match: the inline variant is the point (no allocation per
    // publish), so its size is intended.
    #[allow(clippy::large_enum_variant)]
    pub(super) enum Levels<'a> {
        Inline([&'a str; INLINE], usize),
        Heap(Vec<&'a str>),
    }

    impl<'a> Levels<'a> {
        pub(super) fn of(topic: &'a Topic) -> Levels<'a> {
            let mut inline = [""; INLINE];
            let mut n = 0;
            for level in topic.levels() {
                if n == INLINE {
                    return Levels::Heap(topic.levels().collect());
                }
                inline[n] = level;
                n += 1;
            }
            Levels::Inline(inline, n)
        }

        pub(super) fn as_slice(&self) -> &[&'a str] {
            match self {
                Levels::Inline(a, n) => &a[..*n],
                Levels::Heap(v) => v,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::parse(s).expect("valid filter")
    }

    fn topic(s: &str) -> Topic {
        Topic::from_mqtt(s).expect("valid topic")
    }

    fn matches(index: &TopicIndex<u32>, t: &str) -> Vec<u32> {
        let mut out = Vec::new();
        index.for_each_match(&topic(t), |v| out.push(*v));
        out.sort_unstable();
        out
    }

    #[test]
    fn wildcards_parent_levels_and_dollar_topics() {
        let mut index = TopicIndex::new();
        for (i, f) in [
            "a/b", "a/+", "a/#", "#", "+/b", "+", "$SYS/#", "a/b/c", "a/+/c",
        ]
        .iter()
        .enumerate()
        {
            index.insert(&filter(f), i as u32);
        }
        assert_eq!(index.len(), 9);
        assert_eq!(matches(&index, "a/b"), [0, 1, 2, 3, 4]);
        assert_eq!(
            matches(&index, "a"),
            [2, 3, 5],
            "a/# matches its parent level"
        );
        assert_eq!(matches(&index, "a/b/c"), [2, 3, 7, 8]);
        assert_eq!(
            matches(&index, "$SYS/x"),
            [6],
            "no wildcard first level for $ topics"
        );
        assert_eq!(matches(&index, "x/y/z"), [3]);
        assert_eq!(index.remove(&filter("a/#"), |v| *v == 2), Some(2));
        assert_eq!(index.remove(&filter("a/#"), |v| *v == 2), None);
        assert_eq!(matches(&index, "a"), [3, 5]);
        assert_eq!(index.len(), 8);
    }

    #[test]
    fn removing_the_last_value_prunes_the_branch() {
        let mut index = TopicIndex::new();
        index.insert(&filter("dev/1/cmd"), 1);
        index.insert(&filter("dev/+/cmd"), 2);
        assert_eq!(index.remove(&filter("dev/1/cmd"), |_| true), Some(1));
        assert_eq!(index.remove(&filter("dev/+/cmd"), |_| true), Some(2));
        assert!(index.is_empty());
        assert!(index.root.is_empty(), "{:?}", index.root);
    }

    #[test]
    fn every_value_is_visited_with_its_filter() {
        let mut index = TopicIndex::new();
        let filters = [
            "a/b", "a/+", "a/#", "#", "+/b", "+", "$SYS/#", "/a", "a//b", "a/b", "+/+/#",
        ];
        for (i, f) in filters.iter().enumerate() {
            index.insert(&filter(f), i);
        }
        let mut seen = Vec::new();
        index.for_each(|f, v| seen.push((f.to_owned(), *v)));
        seen.sort_unstable_by_key(|(_, v)| *v);
        let expected: Vec<(String, usize)> = filters
            .iter()
            .enumerate()
            .map(|(i, f)| ((*f).to_owned(), i))
            .collect();
        assert_eq!(seen, expected);
        // The values of one filter come one after another.
        let mut order = Vec::new();
        index.for_each(|f, _| order.push(f.to_owned()));
        let at: Vec<usize> = order
            .iter()
            .enumerate()
            .filter(|(_, f)| *f == "a/b")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(at.len(), 2);
        assert_eq!(at[1], at[0] + 1, "{order:?}");
        index.remove(&filter("a/b"), |v| *v == 0);
        let mut after = 0;
        index.for_each(|_, _| after += 1);
        assert_eq!(after, filters.len() - 1);
        assert_eq!(after, index.len());
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("".to_owned()),
            Just("$s".to_owned())
        ]
    }

    fn filter_text() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec(prop_oneof![level(), Just("+".to_owned())], 1..4),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash {
                    levels.push("#".to_owned());
                }
                levels.join("/")
            })
    }

    proptest! {
        /// The index finds exactly what `TopicFilter::matches` finds over a list, also after
        /// removals.
        #[test]
        fn agrees_with_a_linear_scan(
            filters in proptest::collection::vec(filter_text(), 0..24),
            topics in proptest::collection::vec(proptest::collection::vec(level(), 1..5), 1..12),
            removed in proptest::collection::vec(any::<bool>(), 24),
        ) {
            let filters: Vec<TopicFilter> =
                filters.iter().filter_map(|f| TopicFilter::parse(f).ok()).collect();
            let mut index = TopicIndex::new();
            for (i, f) in filters.iter().enumerate() {
                index.insert(f, i);
            }
            let mut live: Vec<usize> = (0..filters.len()).collect();
            for (i, f) in filters.iter().enumerate() {
                if removed[i] {
                    prop_assert_eq!(index.remove(f, |v| *v == i), Some(i));
                    live.retain(|v| *v != i);
                }
            }
            prop_assert_eq!(index.len(), live.len());
            for levels in topics {
                let Ok(t) = Topic::from_mqtt(&levels.join("/")) else { continue };
                let mut found = Vec::new();
                index.for_each_match(&t, |v| found.push(*v));
                found.sort_unstable();
                let expected: Vec<usize> =
                    live.iter().copied().filter(|i| filters[*i].matches(&t)).collect();
                prop_assert_eq!(found, expected, "topic {}", t);
            }
        }
    }
}
