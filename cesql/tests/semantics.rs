//! Evaluation semantics the TCK does not cover: overflow, Unicode, error propagation, missing
//! and user functions, the canonical form.

use cesql::{ErrorKind, Expression, FunctionError, Functions, MapEvent, Signature, Type, Value};

fn event() -> MapEvent {
    MapEvent::new("myId", "https://example.com/x", "com.example.t")
        .with("sequence", "42")
        .with("count", 7)
        .with("flag", true)
        .with("word", "  héllo wörld  ")
}

/// The value and error kinds of `src` against [`event`].
fn eval(src: &str) -> (Value<'static>, Vec<ErrorKind>) {
    let expr = Expression::parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
    let event = event();
    let r = expr.evaluate(&event);
    (
        r.value.clone().into_owned(),
        r.errors.iter().map(|e| e.kind()).collect(),
    )
}

fn int(i: i32) -> Value<'static> {
    Value::Integer(i)
}

fn string(s: &str) -> Value<'static> {
    Value::String(s.to_owned().into())
}

#[test]
fn integer_overflow_is_a_math_error_with_the_saturated_value() {
    use ErrorKind::Math;
    assert_eq!(eval("2147483647 + 1"), (int(i32::MAX), vec![Math]));
    assert_eq!(eval("-2147483648 - 1"), (int(i32::MIN), vec![Math]));
    assert_eq!(eval("65536 * -65536"), (int(i32::MIN), vec![Math]));
    assert_eq!(eval("-2147483648 / -1"), (int(i32::MAX), vec![Math]));
    assert_eq!(eval("-(-2147483648)"), (int(i32::MAX), vec![Math]));
    // The remainder is 0, not an overflow.
    assert_eq!(eval("-2147483648 % -1"), (int(0), vec![]));
    assert_eq!(eval("-7 % 3"), (int(-1), vec![]));
    assert_eq!(eval("-7 / 2"), (int(-3), vec![]));
}

#[test]
fn string_functions_count_characters_not_bytes() {
    assert_eq!(eval("LENGTH('é€x')"), (int(3), vec![]));
    assert_eq!(eval("LEFT('é€x', 2)"), (string("é€"), vec![]));
    assert_eq!(eval("RIGHT('é€x', 2)"), (string("€x"), vec![]));
    assert_eq!(eval("SUBSTRING('héllo', 2, 3)"), (string("éll"), vec![]));
    assert_eq!(eval("SUBSTRING('héllo', -4)"), (string("éllo"), vec![]));
    assert_eq!(eval("UPPER('straße')"), (string("STRASSE"), vec![]));
    assert_eq!(eval("TRIM(word)"), (string("héllo wörld"), vec![]));
    // Unicode whitespace (U+3000) is trimmed, a control character is not.
    assert_eq!(eval("TRIM('\u{3000}a\u{3000}')"), (string("a"), vec![]));
    assert_eq!(eval("LENGTH(TRIM('\u{1}a'))"), (int(2), vec![]));
    assert_eq!(eval("'é€' LIKE '_€'"), (Value::Boolean(true), vec![]));
}

#[test]
fn substring_edges() {
    use ErrorKind::FunctionEvaluation as F;
    assert_eq!(eval("SUBSTRING('abc', 3)"), (string("c"), vec![]));
    assert_eq!(eval("SUBSTRING('abc', -3)"), (string("abc"), vec![]));
    assert_eq!(eval("SUBSTRING('abc', 4)"), (string(""), vec![F]));
    assert_eq!(eval("SUBSTRING('abc', 2, 0)"), (string(""), vec![]));
    assert_eq!(eval("SUBSTRING('abc', 2, -1)"), (string(""), vec![F]));
    assert_eq!(
        eval("SUBSTRING('abc', 2, 2147483647)"),
        (string("bc"), vec![])
    );
    assert_eq!(eval("SUBSTRING('', 0)"), (string(""), vec![]));
    assert_eq!(eval("SUBSTRING('', 1)"), (string(""), vec![F]));
}

#[test]
fn an_error_in_an_operand_gives_the_operators_zero_value() {
    use ErrorKind::{Cast, Math, MissingAttribute as Missing};
    let f = Value::Boolean(false);
    assert_eq!(eval("NOT (missing = 1)"), (f.clone(), vec![Missing]));
    assert_eq!(eval("CONCAT('a', missing)"), (string(""), vec![Missing]));
    assert_eq!(eval("LENGTH(missing)"), (int(0), vec![Missing]));
    assert_eq!(eval("ABS(1 / 0)"), (int(0), vec![Math]));
    assert_eq!(eval("missing OR TRUE"), (f.clone(), vec![Missing]));
    assert_eq!(
        eval("'a' IN ('b', missing, 'a')"),
        (f.clone(), vec![Missing])
    );
    // An operator's own failed cast gives the target type's zero value and goes on.
    assert_eq!(eval("'abc' = 0"), (Value::Boolean(true), vec![Cast]));
    assert_eq!(eval("'x' + 'y'"), (int(0), vec![Cast, Cast]));
    assert_eq!(eval("TRUE AND 1"), (f.clone(), vec![Cast]));
    // Short-circuit: the right operand is not evaluated.
    assert_eq!(eval("FALSE AND missing"), (f, vec![]));
    assert_eq!(eval("TRUE OR 1 / 0 = 0"), (Value::Boolean(true), vec![]));
}

#[test]
fn implicit_casts_follow_the_operand_types() {
    let t = Value::Boolean(true);
    // `=` casts to the right operand's type; `<` and arithmetic to Integer.
    assert_eq!(eval("sequence = 42"), (t.clone(), vec![]));
    assert_eq!(eval("count = '7'"), (t.clone(), vec![]));
    assert_eq!(eval("flag = 'TRUE'"), (Value::Boolean(false), vec![]));
    assert_eq!(eval("'TRUE' = flag"), (t.clone(), vec![]));
    assert_eq!(eval("sequence > count"), (t.clone(), vec![]));
    assert_eq!(eval("sequence + count"), (int(49), vec![]));
    // IN casts the set to the left operand's type; LIKE casts its operand to String.
    assert_eq!(eval("count IN ('6', '7')"), (t.clone(), vec![]));
    assert_eq!(eval("flag LIKE 't%'"), (t.clone(), vec![]));
    assert_eq!(eval("CONCAT(count, flag)"), (string("7true"), vec![]));
    // Precedence: logic operators are one level, left to right.
    assert_eq!(
        eval("TRUE OR FALSE AND FALSE"),
        (Value::Boolean(false), vec![])
    );
    assert_eq!(eval("FALSE AND FALSE OR TRUE"), (t, vec![]));
}

#[test]
fn missing_functions_are_known_at_compile_time() {
    let expr = Expression::parse("NOPE(1) OR LENGTH() = 0 OR LENGTH('a') = 1").unwrap();
    let mut missing = expr.missing_functions();
    missing.sort();
    assert_eq!(missing, ["LENGTH/0", "NOPE/1"]);
    assert_eq!(
        eval("nope(1)"),
        (Value::Boolean(false), vec![ErrorKind::MissingFunction])
    );
    assert!(
        Expression::parse("LENGTH('a')")
            .unwrap()
            .missing_functions()
            .is_empty()
    );
}

#[test]
fn user_functions_get_cast_arguments_and_their_errors_are_reported() {
    let mut functions = Functions::builtin();
    functions
        .register(
            "TWICE",
            Signature::new([Type::Integer], Type::Integer),
            |args| match args {
                [Value::Integer(n)] => {
                    n.checked_mul(2)
                        .map(Value::Integer)
                        .ok_or_else(|| FunctionError {
                            message: "overflow".into(),
                            value: Some(Value::Integer(i32::MAX)),
                        })
                }
                _ => Err(FunctionError::new("one Integer expected")),
            },
        )
        .unwrap();
    functions
        .register("LIAR", Signature::new([], Type::Boolean), |_| {
            Ok(Value::Integer(1))
        })
        .unwrap();
    functions
        .register(
            "JOIN",
            Signature::variadic([Type::String], Type::String, Type::String),
            |args| {
                Ok(Value::String(
                    args.iter()
                        .map(|a| a.to_string())
                        .collect::<String>()
                        .into(),
                ))
            },
        )
        .unwrap();
    let event = event();
    let run = |src: &str| {
        let expr = Expression::parse_with(src, &functions).unwrap();
        let r = expr.evaluate(&event);
        let kinds: Vec<ErrorKind> = r.errors.iter().map(|e| e.kind()).collect();
        (r.value.into_owned(), kinds)
    };
    assert_eq!(run("twice(sequence)"), (int(84), vec![]));
    assert_eq!(
        run("TWICE(2000000000)"),
        (int(i32::MAX), vec![ErrorKind::FunctionEvaluation])
    );
    assert_eq!(run("TWICE('x')"), (int(0), vec![ErrorKind::Cast]));
    assert_eq!(
        run("TWICE(missing)"),
        (int(0), vec![ErrorKind::MissingAttribute])
    );
    assert_eq!(
        run("LIAR()"),
        (Value::Boolean(false), vec![ErrorKind::FunctionEvaluation])
    );
    assert_eq!(run("JOIN('a', 1, TRUE)"), (string("a1true"), vec![]));
    assert_eq!(
        run("JOIN()"),
        (Value::Boolean(false), vec![ErrorKind::MissingFunction])
    );
}

#[test]
fn canonical_form_shows_the_parse() {
    let show = |s: &str| Expression::parse(s).unwrap().to_string();
    assert_eq!(show("a OR b AND c"), "((a OR b) AND c)");
    assert_eq!(show("NOT a = -b"), "((NOT a) = (-(b)))");
    assert_eq!(show("1 + 2 * 3 IN (7)"), "(1 + (2 * (3 IN (7))))");
    assert_eq!(show("x NOT LIKE 'it''s\\%'"), "(x NOT LIKE 'it\\'s\\\\%')");
    assert_eq!(
        show("EXISTS SOURCE xor concat()"),
        "((EXISTS source) XOR CONCAT())"
    );
}

#[test]
fn return_types_are_static() {
    let ty = |s: &str| Expression::parse(s).unwrap().return_type();
    assert_eq!(ty("a"), Type::Any);
    assert_eq!(ty("a + 1"), Type::Integer);
    assert_eq!(ty("LOWER(a)"), Type::String);
    assert_eq!(ty("a LIKE 'x'"), Type::Boolean);
    assert_eq!(ty("NOPE(a)"), Type::Boolean);
}

#[test]
fn expressions_are_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Expression>();
    assert_send_sync::<Functions>();
}
