//! CloudEvents SQL Expression Language (CESQL) v1.0.0: a parser, the type system with the
//! spec's implicit casts, every built-in function, and an evaluator with the spec's error
//! semantics. It passes the official CESQL TCK (vendored in `tck/`, run by `tests/tck.rs`).
//!
//! An expression is parsed and compiled once ([`Expression::parse`]) and then evaluated
//! against any number of events. Evaluation never fails and never panics: it gives a
//! [`Value`] and the errors raised ([`Evaluation`]); when used as a filter, an event passes
//! only if the value is `true` and there was no error ([`Expression::matches`]).
//!
//! Events are read through the [`Event`] trait (an attribute's value by name, and whether
//! it exists), so any event type can be filtered; [`MapEvent`] is a ready-made one.
//!
//! ```
//! use cesql::{ErrorKind, Expression, MapEvent, Value};
//!
//! let filter = Expression::parse("type LIKE 'com.example.%' AND int(sequence) > 9").unwrap();
//! let event = MapEvent::new("1", "/sensors/7", "com.example.reading").with("sequence", "10");
//! assert!(filter.matches(&event));
//!
//! // A missing attribute is an error, and the operator's zero value.
//! let expr = Expression::parse("missing * 5").unwrap();
//! let result = expr.evaluate(&event);
//! assert_eq!(result.value, Value::Integer(0));
//! assert_eq!(result.errors[0].kind(), ErrorKind::MissingAttribute);
//! ```
//!
//! # What is implemented, and the choices the spec leaves open
//!
//! - Syntax (spec 2): keywords and function names in any case; attribute names too (`SOURCE`
//!   is `source`, as the TCK expects); `'…'` and `"…"` strings where `\'` / `\"` is the quote,
//!   `\\` a backslash, a doubled quote the quote, and any other `\x` stays as written (so
//!   LIKE sees `\%` and `\_`). A sign directly before digits belongs to the integer literal
//!   (`4-1` is a subtraction, `-2147483648` a literal); literals outside 32 bits are parse
//!   errors. `LIKE`'s pattern must be a string literal. Nesting is limited to [`MAX_DEPTH`].
//! - Precedence (spec 3.6): calls, unary `NOT` and `-`, `LIKE`, `EXISTS`, `IN`, `* / %`,
//!   `+ -`, comparisons, then `AND`, `OR`, `XOR` on one level, left to right. So `NOT a = b`
//!   is `(NOT a) = b`, and `a OR b AND c` is `(a OR b) AND c`: write the parentheses.
//! - Types and casts (spec 3.1, 3.7): Boolean, 32-bit Integer, String. `=` and `!=` cast the
//!   left operand to the right one's type; `IN` casts the set to the left operand's type;
//!   other operators and functions cast to their parameter types. The implicit cast of an
//!   Integer to Boolean is a cast error (value `false`), as the TCK requires (`NOT 10` is
//!   `true` with a cast error), although spec 3.7's table lists it; `BOOL(10)` is `true`.
//! - Errors (spec 3.3): the node that raises an error returns the value the spec gives it
//!   (`5 / 0` is 0, `ABS(-2147483648)` is 2147483647); any operator or function whose operand
//!   raised one returns its own zero value, so errors surface as zero values, and evaluation
//!   stops at the first error (spec 4.1 "fail fast"). Integer overflow of `+ - * /` and
//!   unary `-` is a math error with the saturated value, like `ABS`.
//! - Functions (spec 3.5): `ABS`, `LENGTH`, `CONCAT`, `CONCAT_WS`, `LOWER`, `UPPER`, `TRIM`,
//!   `LEFT`, `RIGHT`, `SUBSTRING` (2 and 3 arguments), and `INT`, `BOOL`, `STRING`, `IS_BOOL`,
//!   `IS_INT`; user functions through [`Functions::register`], with the spec's overloading
//!   rules. Calls are resolved at compile time.

mod error;
mod event;
mod expr;
mod functions;
mod like;
mod parse;
mod value;

pub use error::{ErrorKind, EvalError, ParseError, ParseErrorKind};
pub use event::{Event, MapEvent};
pub use expr::{Evaluation, Expression};
pub use functions::{FunctionError, Functions, RegisterError, Signature, UserFn};
pub use value::{Type, Value, parse_bool, parse_int};

/// The deepest nesting an expression may have (operators, function calls and parentheses;
/// a chain of `AND` or of `OR` counts as one level however long): deeper is a parse error, so
/// that parsing and evaluation recurse a bounded number of times.
pub const MAX_DEPTH: usize = 64;
