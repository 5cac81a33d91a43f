//! `LIKE` patterns (spec 3.4.3), compiled once: `%` is any run of characters, `_` one
//! character, `\%` and `\_` the characters themselves, `\\` a backslash; any other character
//! (a lone `\` included) is itself. Case sensitive.

/// One piece of a segment between two `%`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Exactly this text.
    Text(String),
    /// This many characters, any.
    Any(usize),
}

/// The text between two `%` (or an end of the pattern): pieces of fixed length in characters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    pieces: Vec<Piece>,
}

impl Segment {
    fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The segment's only text, when it has no `_`.
    fn plain(&self) -> Option<&str> {
        match self.pieces.as_slice() {
            [] => Some(""),
            [Piece::Text(t)] => Some(t),
            _ => None,
        }
    }

    fn chars(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.chars().count(),
                Piece::Any(n) => *n,
            })
            .sum()
    }

    /// Matches the segment at the start of `text`: the byte length matched.
    fn match_prefix(&self, text: &str) -> Option<usize> {
        let mut at = 0;
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => {
                    if !text[at..].starts_with(t.as_str()) {
                        return None;
                    }
                    at += t.len();
                }
                Piece::Any(n) => {
                    let mut chars = text[at..].char_indices();
                    for _ in 0..*n {
                        chars.next()?;
                    }
                    at = chars.next().map_or(text.len(), |(i, _)| at + i);
                }
            }
        }
        Some(at)
    }

    /// The leftmost match in `text`: (start, end) in bytes.
    fn find(&self, text: &str) -> Option<(usize, usize)> {
        if let Some(plain) = self.plain() {
            return text.find(plain).map(|i| (i, i + plain.len()));
        }
        text.char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(text.len()))
            .find_map(|i| self.match_prefix(&text[i..]).map(|n| (i, i + n)))
    }
}

/// A compiled `LIKE` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Like {
    /// The segments between `%`s; one segment means no `%`.
    segments: Vec<Segment>,
}

impl Like {
    pub(crate) fn new(pattern: &str) -> Self {
        let mut segments = Vec::new();
        let mut pieces: Vec<Piece> = Vec::new();
        let push_char = |pieces: &mut Vec<Piece>, c: char| match pieces.last_mut() {
            Some(Piece::Text(t)) => t.push(c),
            _ => pieces.push(Piece::Text(c.to_string())),
        };
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.peek() {
                    Some(&n @ ('%' | '_' | '\\')) => {
                        chars.next();
                        push_char(&mut pieces, n);
                    }
                    _ => push_char(&mut pieces, '\\'),
                },
                '%' => segments.push(Segment {
                    pieces: std::mem::take(&mut pieces),
                }),
                '_' => match pieces.last_mut() {
                    Some(Piece::Any(n)) => *n += 1,
                    _ => pieces.push(Piece::Any(1)),
                },
                c => push_char(&mut pieces, c),
            }
        }
        segments.push(Segment { pieces });
        Like { segments }
    }

    pub(crate) fn matches(&self, text: &str) -> bool {
        let (first, rest) = match self.segments.split_first() {
            Some(split) => split,
            None => return text.is_empty(),
        };
        let Some((last, middle)) = rest.split_last() else {
            // No `%`: the whole text.
            return first.match_prefix(text) == Some(text.len());
        };
        let Some(mut at) = first.match_prefix(text) else {
            return false;
        };
        // The last segment is anchored at the end: it takes its length in characters.
        let tail_start = if last.is_empty() {
            text.len()
        } else {
            let n = last.chars();
            let Some(start) = nth_char_from_end(text, n) else {
                return false;
            };
            if start < at || last.match_prefix(&text[start..]) != Some(text.len() - start) {
                return false;
            }
            start
        };
        if at > tail_start {
            return false;
        }
        // Middle segments: leftmost matches, in order, within what the ends leave.
        for seg in middle {
            if seg.is_empty() {
                continue;
            }
            match seg.find(&text[at..tail_start]) {
                Some((_, end)) => at += end,
                None => return false,
            }
        }
        true
    }
}

/// The byte offset where the last `n` characters of `text` start.
fn nth_char_from_end(text: &str, n: usize) -> Option<usize> {
    if n == 0 {
        return Some(text.len());
    }
    text.char_indices().rev().nth(n - 1).map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain backtracking matcher over characters, to check the compiled one against.
    fn reference(pattern: &str, text: &str) -> bool {
        #[derive(Clone, Copy, PartialEq)]
        enum T {
            C(char),
            One,
            Many,
        }
        let mut toks = Vec::new();
        let mut cs = pattern.chars().peekable();
        while let Some(c) = cs.next() {
            toks.push(match c {
                '\\' => match cs.peek() {
                    Some(&n @ ('%' | '_' | '\\')) => {
                        cs.next();
                        T::C(n)
                    }
                    _ => T::C('\\'),
                },
                '%' => T::Many,
                '_' => T::One,
                c => T::C(c),
            });
        }
        let text: Vec<char> = text.chars().collect();
        fn go(p: &[T], t: &[char]) -> bool {
            match p.first() {
                None => t.is_empty(),
                Some(T::Many) => (0..=t.len()).any(|i| go(&p[1..], &t[i..])),
                Some(T::One) => !t.is_empty() && go(&p[1..], &t[1..]),
                Some(T::C(c)) => t.first() == Some(c) && go(&p[1..], &t[1..]),
            }
        }
        go(&toks, &text)
    }

    #[test]
    fn examples_from_the_spec() {
        let l = Like::new("_b%");
        assert!(l.matches("ab") && l.matches("abc") && l.matches("abcd1"));
        assert!(!l.matches("b") && !l.matches("acd") && !l.matches("aBc"));
        let l = Like::new(r"abc\%");
        assert!(l.matches("abc%") && !l.matches("abcd"));
    }

    #[test]
    fn agrees_with_a_backtracking_matcher() {
        let patterns = [
            "", "%", "%%", "_", "__", "a", "a%", "%a", "%a%", "a%b", "a_b", "%_%", "_%_", "a%a",
            "%ab%ba%", "%a_a%", r"\%", r"a\_%", r"\\%", r"\a", "%\\", "é_€%", "%_é", "a%%b", "%b_",
            "_%b%_",
        ];
        let alphabet = ['a', 'b', 'é', '%', '_', '\\'];
        let mut texts = vec![String::new()];
        for len in 1..=4 {
            let mut n: usize = 1;
            for _ in 0..len {
                n *= alphabet.len();
            }
            for mut k in 0..n {
                let mut s = String::new();
                for _ in 0..len {
                    s.push(alphabet[k % alphabet.len()]);
                    k /= alphabet.len();
                }
                texts.push(s);
            }
        }
        for p in patterns {
            let like = Like::new(p);
            for t in &texts {
                assert_eq!(like.matches(t), reference(p, t), "{t:?} LIKE {p:?}");
            }
        }
    }
}
