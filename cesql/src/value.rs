//! The three primitive types of CESQL (spec 3.1) and the casts between them (spec 3.7).

use std::borrow::Cow;
use std::fmt;

use crate::error::{ErrorKind, EvalError};

/// A CESQL type. [`Type::Any`] is only a parameter type: the casting functions (`INT`, `BOOL`,
/// `STRING`, ...) and user functions that take any value as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Type {
    /// `true` or `false`; zero value `false`.
    Boolean,
    /// A 32-bit signed integer; zero value `0`.
    Integer,
    /// A sequence of Unicode characters; zero value `""`.
    String,
    /// Any of the three (parameters only: no cast is applied).
    Any,
}

impl Type {
    /// The zero value of the type (spec 3.1); `false` for [`Type::Any`], as the spec says for a
    /// return type that cannot be determined (3.2).
    pub fn zero(self) -> Value<'static> {
        match self {
            Type::Boolean | Type::Any => Value::Boolean(false),
            Type::Integer => Value::Integer(0),
            Type::String => Value::String(Cow::Borrowed("")),
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Boolean => "Boolean",
            Type::Integer => "Integer",
            Type::String => "String",
            Type::Any => "Any",
        })
    }
}

/// A CESQL value: what an attribute, a literal, an operator or a function gives. Strings
/// borrow from the event or the expression where they can.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value<'a> {
    /// A Boolean.
    Boolean(bool),
    /// An Integer (32-bit signed).
    Integer(i32),
    /// A String.
    String(Cow<'a, str>),
}

impl<'a> Value<'a> {
    /// The value's type.
    pub fn kind(&self) -> Type {
        match self {
            Value::Boolean(_) => Type::Boolean,
            Value::Integer(_) => Type::Integer,
            Value::String(_) => Type::String,
        }
    }

    /// The same value, owning its string.
    pub fn into_owned(self) -> Value<'static> {
        match self {
            Value::Boolean(b) => Value::Boolean(b),
            Value::Integer(i) => Value::Integer(i),
            Value::String(s) => Value::String(Cow::Owned(s.into_owned())),
        }
    }

    /// A value borrowing this one's string.
    pub fn borrowed(&self) -> Value<'_> {
        match self {
            Value::Boolean(b) => Value::Boolean(*b),
            Value::Integer(i) => Value::Integer(*i),
            Value::String(s) => Value::String(Cow::Borrowed(s)),
        }
    }

    /// The Boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Boolean(b) => Some(*b),
            _ => None,
        }
    }

    /// The Integer, if this is one.
    pub fn as_int(&self) -> Option<i32> {
        match self {
            Value::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// The String, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

impl From<bool> for Value<'_> {
    fn from(b: bool) -> Self {
        Value::Boolean(b)
    }
}

impl From<i32> for Value<'_> {
    fn from(i: i32) -> Self {
        Value::Integer(i)
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(s: &'a str) -> Self {
        Value::String(Cow::Borrowed(s))
    }
}

impl From<String> for Value<'_> {
    fn from(s: String) -> Self {
        Value::String(Cow::Owned(s))
    }
}

impl fmt::Display for Value<'_> {
    /// The value as CESQL's `STRING()` writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Boolean(b) => write!(f, "{b}"),
            Value::Integer(i) => write!(f, "{i}"),
            Value::String(s) => f.write_str(s),
        }
    }
}

/// String -> Integer (spec 3.7): base 10, an optional leading `+` or `-`, 32 bits; `None` when
/// the string is not such an integer or overflows.
pub fn parse_int(s: &str) -> Option<i32> {
    let bytes = s.as_bytes();
    let (negative, digits) = match bytes.first() {
        Some(b'-') => (true, &bytes[1..]),
        Some(b'+') => (false, &bytes[1..]),
        _ => (false, bytes),
    };
    if digits.is_empty() {
        return None;
    }
    // Accumulated negatively so that i32::MIN fits.
    let mut n: i32 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_sub(i32::from(d - b'0'))?;
    }
    if negative { Some(n) } else { n.checked_neg() }
}

/// String -> Boolean (spec 3.7): `true` or `false` in any case.
pub fn parse_bool(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("true") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// The casts, pushing a [`ErrorKind::Cast`] error where one fails.
pub(crate) struct Cast;

impl Cast {
    /// To Integer: Boolean is 1 or 0; a String that is no integer is 0 and an error.
    pub(crate) fn int(v: &Value<'_>, errors: &mut Vec<EvalError>) -> i32 {
        match v {
            Value::Integer(i) => *i,
            Value::Boolean(b) => i32::from(*b),
            Value::String(s) => parse_int(s).unwrap_or_else(|| {
                errors.push(EvalError::new(
                    ErrorKind::Cast,
                    format!("cannot cast the string {s:?} to Integer"),
                ));
                0
            }),
        }
    }

    /// Implicit cast to Boolean (operands of NOT, AND, OR, XOR, `=` with a Boolean on the right,
    /// IN with a Boolean on the left, Boolean parameters): a String `true`/`false` in any case.
    /// An Integer is refused with an error and `false`, as the TCK requires (`NOT 10` is `true`
    /// with a cast error); the explicit `BOOL(x)` casts it (see [`Cast::bool_explicit`]).
    pub(crate) fn bool_implicit(v: &Value<'_>, errors: &mut Vec<EvalError>) -> bool {
        match v {
            Value::Boolean(b) => *b,
            Value::String(s) => parse_bool(s).unwrap_or_else(|| {
                errors.push(EvalError::new(
                    ErrorKind::Cast,
                    format!("cannot cast the string {s:?} to Boolean"),
                ));
                false
            }),
            Value::Integer(i) => {
                errors.push(EvalError::new(
                    ErrorKind::Cast,
                    format!("no implicit cast of the Integer {i} to Boolean (use BOOL)"),
                ));
                false
            }
        }
    }

    /// `BOOL(x)`: the spec 3.7 table, Integer -> Boolean included (`0` is `false`).
    pub(crate) fn bool_explicit(v: &Value<'_>, errors: &mut Vec<EvalError>) -> bool {
        match v {
            Value::Integer(i) => *i != 0,
            other => Self::bool_implicit(other, errors),
        }
    }

    /// To String: never fails.
    pub(crate) fn string<'a>(v: &Value<'a>) -> Cow<'a, str> {
        match v {
            Value::String(s) => s.clone(),
            Value::Boolean(true) => Cow::Borrowed("true"),
            Value::Boolean(false) => Cow::Borrowed("false"),
            Value::Integer(i) => Cow::Owned(i.to_string()),
        }
    }

    /// [`Cast::string`], taking the value (no copy of a borrowed or owned string).
    pub(crate) fn into_string(v: Value<'_>) -> Cow<'_, str> {
        match v {
            Value::String(s) => s,
            other => Self::string(&other).into_owned().into(),
        }
    }

    /// Implicit cast to `to` ([`Type::Any`]: as it is).
    pub(crate) fn to<'a>(v: Value<'a>, to: Type, errors: &mut Vec<EvalError>) -> Value<'a> {
        match (to, &v) {
            (Type::Any, _)
            | (Type::Boolean, Value::Boolean(_))
            | (Type::Integer, Value::Integer(_))
            | (Type::String, Value::String(_)) => v,
            (Type::Boolean, _) => Value::Boolean(Self::bool_implicit(&v, errors)),
            (Type::Integer, _) => Value::Integer(Self::int(&v, errors)),
            (Type::String, _) => Value::String(Self::into_string(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_int_bounds_and_signs() {
        assert_eq!(parse_int("2147483647"), Some(i32::MAX));
        assert_eq!(parse_int("-2147483648"), Some(i32::MIN));
        assert_eq!(parse_int("2147483648"), None);
        assert_eq!(parse_int("-2147483649"), None);
        assert_eq!(parse_int("+7"), Some(7));
        assert_eq!(parse_int("007"), Some(7));
        for bad in ["", "+", "-", " 1", "1 ", "1a", "0x1", "١"] {
            assert_eq!(parse_int(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parse_bool_any_case_only_exact_words() {
        assert_eq!(parse_bool("TrUe"), Some(true));
        assert_eq!(parse_bool("FALSE"), Some(false));
        assert_eq!(parse_bool("yes"), None);
        assert_eq!(parse_bool("true "), None);
    }

    #[test]
    fn implicit_and_explicit_boolean_casts_differ_on_integers() {
        let mut errors = Vec::new();
        assert!(Cast::bool_explicit(&Value::Integer(-50), &mut errors));
        assert!(!Cast::bool_explicit(&Value::Integer(0), &mut errors));
        assert!(errors.is_empty());
        assert!(!Cast::bool_implicit(&Value::Integer(1), &mut errors));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].kind(), ErrorKind::Cast);
    }
}
