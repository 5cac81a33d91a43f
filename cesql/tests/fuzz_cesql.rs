//! Fuzz target `fuzz_cesql`: random and mutated text, random soups of CESQL tokens, and
//! generated well-formed expressions into
//! the parser and the evaluator: no panic; a parse error's position is inside the text; an
//! evaluation's value has the expression's static type, and `matches` agrees with it; the canonical form (`Display`) parses back to an expression that
//! evaluates the same.

use cesql::{Expression, MapEvent, ParseErrorKind, Type};
use meshgate_fuzz::proptest::prelude::*;

const SEEDS: &[&[u8]] = &[
    b"int(hop) < int(ttl) and int(hop) < 1000",
    b"(firstname = 'Francesco' AND lastname = 'Guardiani') OR subject = 'Francesco Guardiani'",
    b"myext LIKE 'abc%123\\%456\\_d_f'",
    b"source IN (id, \"http://localhost/source\") XOR NOT EXISTS time",
    b"SUBSTRING('Sakila', -5, 3) || CONCAT_WS(',', 'a', LEFT(type, -2), RIGHT(id, 10))",
    b"ABS(-2147483648) + 2147483647 * --'10' / 0 % missing",
    b"'a\"b\\'c' <> \"a'b\\\"c\" AND TRUE != 'true' AND 5 + TRUE >= -1",
    b"LOWER(UPPER(TRIM('  \xc3\xa9\xe2\x82\xac  '))) NOT IN (1, BOOL(0), STRING(IS_INT('x')))",
];

/// Tokens for the soup strategy: every keyword, operator and function, a few literals and
/// attributes (present ones of each type, and a missing one).
const TOKENS: &[&str] = &[
    "(",
    ")",
    ",",
    "+",
    "-",
    "*",
    "/",
    "%",
    "=",
    "!=",
    "<>",
    "<",
    "<=",
    ">",
    ">=",
    "AND",
    "or",
    "XOR",
    "NOT",
    "LIKE",
    "EXISTS",
    "IN",
    "TRUE",
    "false",
    "0",
    "1",
    "-1",
    "2147483647",
    "-2147483648",
    "'abc'",
    "'a%'",
    "'_\\%'",
    "''",
    "\"TRUE\"",
    "'10'",
    "'é€'",
    "id",
    "source",
    "sequence",
    "flag",
    "missing",
    "ABS",
    "LENGTH",
    "CONCAT",
    "CONCAT_WS",
    "LOWER",
    "UPPER",
    "TRIM",
    "LEFT",
    "RIGHT",
    "SUBSTRING",
    "INT",
    "BOOL",
    "STRING",
    "IS_BOOL",
    "IS_INT",
    "NOPE",
];

const LEAVES: &[&str] = &[
    "TRUE",
    "false",
    "0",
    "1",
    "-1",
    "7",
    "2147483647",
    "-2147483648",
    "'abc'",
    "'10'",
    "''",
    "\"TRUE\"",
    "'é€ '",
    "id",
    "source",
    "sequence",
    "flag",
    "text",
    "missing",
    "EXISTS flag",
    "EXISTS missing",
];

const BINARY: &[&str] = &[
    "+", "-", "*", "/", "%", "=", "!=", "<>", "<", "<=", ">", ">=", "AND", "OR", "XOR",
];

const FUNCTIONS: &[&str] = &[
    "ABS",
    "LENGTH",
    "CONCAT",
    "CONCAT_WS",
    "LOWER",
    "UPPER",
    "TRIM",
    "LEFT",
    "RIGHT",
    "SUBSTRING",
    "INT",
    "BOOL",
    "STRING",
    "IS_BOOL",
    "IS_INT",
    "NOPE",
];

const PATTERNS: &[&str] = &[
    "'%'", "'a%'", "'%c'", "'_b_'", "'1_'", "'t%e'", "'\\%'", "''",
];

/// Well-formed expressions (most parse), with and without parentheses.
fn expressions() -> impl Strategy<Value = String> {
    let leaf = proptest::sample::select(LEAVES).prop_map(str::to_owned);
    leaf.prop_recursive(5, 48, 3, |inner| {
        prop_oneof![
            (
                inner.clone(),
                proptest::sample::select(BINARY),
                inner.clone(),
                any::<bool>()
            )
                .prop_map(|(a, op, b, paren)| if paren {
                    format!("({a} {op} {b})")
                } else {
                    format!("{a} {op} {b}")
                }),
            (
                proptest::sample::select(&["NOT ", "-", "- "][..]),
                inner.clone()
            )
                .prop_map(|(op, a)| format!("{op}{a}")),
            (
                inner.clone(),
                any::<bool>(),
                proptest::sample::select(PATTERNS)
            )
                .prop_map(|(a, not, p)| format!("{a} {}LIKE {p}", if not { "NOT " } else { "" })),
            (
                inner.clone(),
                any::<bool>(),
                proptest::collection::vec(inner.clone(), 1..4)
            )
                .prop_map(|(a, not, set)| format!(
                    "{a} {}IN ({})",
                    if not { "NOT " } else { "" },
                    set.join(", ")
                )),
            (
                proptest::sample::select(FUNCTIONS),
                proptest::collection::vec(inner, 0..4)
            )
                .prop_map(|(f, args)| format!("{f}({})", args.join(", "))),
        ]
    })
}

fn event() -> MapEvent {
    MapEvent::new("abc", "https://example.com/a", "com.example.t")
        .with("sequence", 10)
        .with("flag", true)
        .with("text", "10")
}

fn check(input: Vec<u8>) -> Result<(), String> {
    let text = String::from_utf8_lossy(&input);
    let expr = match Expression::parse(&text) {
        Ok(expr) => expr,
        Err(e) => {
            return if e.position() <= text.len() {
                Ok(())
            } else {
                Err(format!("{e}: position past the end ({})", text.len()))
            };
        }
    };
    let event = event();
    let result = expr.evaluate(&event);
    let ty = expr.return_type();
    if ty != Type::Any && result.value.kind() != ty {
        return Err(format!("{text:?}: value {:?}, type {ty}", result.value));
    }
    if expr.matches(&event) != result.passes() {
        return Err(format!("{text:?}: matches() disagrees with evaluate()"));
    }
    let canonical = expr.to_string();
    match Expression::parse(&canonical) {
        Ok(again) => {
            let other = again.evaluate(&event);
            let kinds =
                |r: &cesql::Evaluation<'_>| r.errors.iter().map(|e| e.kind()).collect::<Vec<_>>();
            if other.value != result.value || kinds(&other) != kinds(&result) {
                return Err(format!(
                    "{text:?} gives {result:?}; its canonical form {canonical:?} gives {other:?}"
                ));
            }
        }
        // The canonical form's parentheses nest deeper than the input did.
        Err(e) if *e.kind() == ParseErrorKind::TooDeep => {}
        Err(e) => return Err(format!("{text:?}: canonical form {canonical:?}: {e}")),
    }
    Ok(())
}

#[test]
fn fuzz_cesql() {
    let soup = proptest::collection::vec(proptest::sample::select(TOKENS), 1..24)
        .prop_map(|tokens| tokens.join(" ").into_bytes());
    let inputs = prop_oneof![
        1 => meshgate_fuzz::bytes("fuzz_cesql", SEEDS, 96),
        1 => soup,
        2 => expressions().prop_map(String::into_bytes),
    ];
    meshgate_fuzz::run("fuzz_cesql", inputs, |b| Some(b.to_vec()), check);
}
