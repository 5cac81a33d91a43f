//! The compiled expression and its evaluation (spec section 3).
//!
//! Error semantics: a node that raises an error returns the value the spec defines for that
//! case (`5 / 0` is 0, `ABS(-2147483648)` is 2147483647, a failed cast is the target type's
//! zero value and the operator goes on with it: `NOT 10` is `true`), and reports the error. A
//! node whose operand reported an error stops there and returns the zero value of its own
//! return type (`missing * 5` is 0, `true AND (1 != 1 / 0)` is `false`): errors propagate up
//! as zero values, as spec 3.2 says for missing attributes, and the evaluation stops at the
//! first one (spec 4.1 "fail fast", which it recommends for filters).

use std::borrow::Cow;
use std::fmt;

use crate::error::{ErrorKind, EvalError, ParseError};
use crate::event::Event;
use crate::functions::{Body, Builtin, Functions, Overload};
use crate::like::Like;
use crate::parse::{self, Ast, BinOp};
use crate::value::{Cast, Type, Value, parse_bool, parse_int};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arith {
    Mul,
    Div,
    Mod,
    Add,
    Sub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
}

/// A compiled expression node.
#[derive(Debug, Clone)]
enum Node {
    Lit(Value<'static>),
    Attr(Box<str>),
    Exists(Box<str>),
    Not(Box<Node>),
    Neg(Box<Node>),
    Arith(Arith, Box<Node>, Box<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>),
    Eq {
        negated: bool,
        left: Box<Node>,
        right: Box<Node>,
    },
    Xor(Box<Node>, Box<Node>),
    /// `a AND b AND ...`, short-circuit, left to right.
    All(Vec<Node>),
    /// `a OR b OR ...`, short-circuit, left to right.
    Any(Vec<Node>),
    Like {
        negated: bool,
        operand: Box<Node>,
        like: Like,
        pattern: Box<str>,
    },
    In {
        negated: bool,
        operand: Box<Node>,
        set: Vec<Node>,
    },
    Call {
        name: Box<str>,
        overload: Overload,
        args: Vec<Node>,
    },
    /// A call that no function definition takes: `false` and a missing function error.
    MissingFunction {
        name: Box<str>,
        args: Vec<Node>,
    },
}

const FALSE: Value<'static> = Value::Boolean(false);
const ZERO: Value<'static> = Value::Integer(0);

/// Evaluates `node`; if it reported an error, returns `zero` from the enclosing function.
macro_rules! operand {
    ($node:expr, $event:expr, $errors:expr, $zero:expr) => {{
        let before = $errors.len();
        let value = $node.eval($event, $errors);
        if $errors.len() != before {
            return $zero;
        }
        value
    }};
}

impl Node {
    fn compile(ast: Ast, functions: &Functions) -> Node {
        let bx = |a: Box<Ast>| Box::new(Node::compile(*a, functions));
        match ast {
            Ast::Bool(b) => Node::Lit(Value::Boolean(b)),
            Ast::Int(i) => Node::Lit(Value::Integer(i)),
            Ast::Str(s) => Node::Lit(Value::String(Cow::Owned(s))),
            Ast::Attr(a) => Node::Attr(a.into()),
            Ast::Exists(a) => Node::Exists(a.into()),
            Ast::Not(x) => Node::Not(bx(x)),
            Ast::Neg(x) => Node::Neg(bx(x)),
            Ast::Binary(op, l, r) => {
                let (l, r) = (bx(l), bx(r));
                match op {
                    BinOp::Mul => Node::Arith(Arith::Mul, l, r),
                    BinOp::Div => Node::Arith(Arith::Div, l, r),
                    BinOp::Mod => Node::Arith(Arith::Mod, l, r),
                    BinOp::Add => Node::Arith(Arith::Add, l, r),
                    BinOp::Sub => Node::Arith(Arith::Sub, l, r),
                    BinOp::Lt => Node::Cmp(Cmp::Lt, l, r),
                    BinOp::Le => Node::Cmp(Cmp::Le, l, r),
                    BinOp::Gt => Node::Cmp(Cmp::Gt, l, r),
                    BinOp::Ge => Node::Cmp(Cmp::Ge, l, r),
                    BinOp::Eq | BinOp::NotEq => Node::Eq {
                        negated: op == BinOp::NotEq,
                        left: l,
                        right: r,
                    },
                    BinOp::Xor => Node::Xor(l, r),
                    // The parser makes chains of these; a pair is a chain of two.
                    BinOp::And => Node::All(vec![*l, *r]),
                    BinOp::Or => Node::Any(vec![*l, *r]),
                }
            }
            Ast::Chain(op, items) => {
                let items = items
                    .into_iter()
                    .map(|a| Node::compile(a, functions))
                    .collect();
                if op == BinOp::And {
                    Node::All(items)
                } else {
                    Node::Any(items)
                }
            }
            Ast::Like {
                negated,
                operand,
                pattern,
            } => Node::Like {
                negated,
                operand: bx(operand),
                like: Like::new(&pattern),
                pattern: pattern.into(),
            },
            Ast::In {
                negated,
                operand,
                set,
            } => Node::In {
                negated,
                operand: bx(operand),
                set: set
                    .into_iter()
                    .map(|a| Node::compile(a, functions))
                    .collect(),
            },
            Ast::Call { name, args } => {
                let overload = functions.resolve(&name, args.len()).cloned();
                let args = args
                    .into_iter()
                    .map(|a| Node::compile(a, functions))
                    .collect();
                match overload {
                    Some(overload) => Node::Call {
                        name: name.into(),
                        overload,
                        args,
                    },
                    None => Node::MissingFunction {
                        name: name.into(),
                        args,
                    },
                }
            }
        }
    }

    /// The static return type; [`Type::Any`] for an attribute (whose zero value is `false`).
    fn return_type(&self) -> Type {
        match self {
            Node::Lit(v) => v.kind(),
            Node::Attr(_) => Type::Any,
            Node::Neg(_) | Node::Arith(..) => Type::Integer,
            Node::Call { overload, .. } => overload.signature.returns,
            Node::Exists(_)
            | Node::Not(_)
            | Node::Cmp(..)
            | Node::Eq { .. }
            | Node::Xor(..)
            | Node::All(_)
            | Node::Any(_)
            | Node::Like { .. }
            | Node::In { .. }
            | Node::MissingFunction { .. } => Type::Boolean,
        }
    }

    fn eval<'a, E: Event + ?Sized>(
        &'a self,
        event: &'a E,
        errors: &mut Vec<EvalError>,
    ) -> Value<'a> {
        match self {
            Node::Lit(v) => v.borrowed(),
            Node::Attr(name) => event.attribute(name).unwrap_or_else(|| {
                errors.push(EvalError::new(
                    ErrorKind::MissingAttribute,
                    format!("the event has no attribute {name}"),
                ));
                FALSE
            }),
            Node::Exists(name) => Value::Boolean(event.has_attribute(name)),
            Node::Not(x) => {
                let v = operand!(x, event, errors, FALSE);
                Value::Boolean(!Cast::bool_implicit(&v, errors))
            }
            Node::Neg(x) => {
                let v = operand!(x, event, errors, ZERO);
                let i = Cast::int(&v, errors);
                Value::Integer(i.checked_neg().unwrap_or_else(|| {
                    errors.push(EvalError::new(ErrorKind::Math, "-(-2147483648) overflows"));
                    i32::MAX
                }))
            }
            Node::Arith(op, l, r) => {
                let a = operand!(l, event, errors, ZERO);
                let a = Cast::int(&a, errors);
                let b = operand!(r, event, errors, ZERO);
                let b = Cast::int(&b, errors);
                Value::Integer(arith(*op, a, b, errors))
            }
            Node::Cmp(op, l, r) => {
                let a = operand!(l, event, errors, FALSE);
                let a = Cast::int(&a, errors);
                let b = operand!(r, event, errors, FALSE);
                let b = Cast::int(&b, errors);
                Value::Boolean(match op {
                    Cmp::Lt => a < b,
                    Cmp::Le => a <= b,
                    Cmp::Gt => a > b,
                    Cmp::Ge => a >= b,
                })
            }
            Node::Eq {
                negated,
                left,
                right,
            } => {
                let x = operand!(left, event, errors, FALSE);
                let y = operand!(right, event, errors, FALSE);
                // `=` is ambiguous: the right operand's type picks the definition (spec 3.7).
                Value::Boolean(equal_as(&y, &x, errors) != *negated)
            }
            Node::Xor(l, r) => {
                let a = operand!(l, event, errors, FALSE);
                let a = Cast::bool_implicit(&a, errors);
                let b = operand!(r, event, errors, FALSE);
                let b = Cast::bool_implicit(&b, errors);
                Value::Boolean(a != b)
            }
            // Short-circuit (spec 3.4.2): the first false (true) operand decides.
            Node::All(items) | Node::Any(items) => {
                let decisive = matches!(self, Node::Any(_));
                for item in items {
                    let v = operand!(item, event, errors, FALSE);
                    if Cast::bool_implicit(&v, errors) == decisive {
                        return Value::Boolean(decisive);
                    }
                }
                Value::Boolean(!decisive)
            }
            Node::Like {
                negated,
                operand,
                like,
                ..
            } => {
                let v = operand!(operand, event, errors, FALSE);
                let s = Cast::into_string(v);
                Value::Boolean(like.matches(&s) != *negated)
            }
            Node::In {
                negated,
                operand,
                set,
            } => {
                let x = operand!(operand, event, errors, FALSE);
                for item in set {
                    let y = operand!(item, event, errors, FALSE);
                    // The left operand's type is the target type (spec 3.7).
                    if equal_as(&x, &y, errors) {
                        return Value::Boolean(!*negated);
                    }
                }
                Value::Boolean(*negated)
            }
            Node::Call { overload, args, .. } => call(overload, args, event, errors),
            Node::MissingFunction { name, args } => {
                errors.push(EvalError::new(
                    ErrorKind::MissingFunction,
                    format!("no function {name} takes {} arguments", args.len()),
                ));
                FALSE
            }
        }
    }
}

/// Whether `other`, cast to the type of `target`, equals `target`.
fn equal_as(target: &Value<'_>, other: &Value<'_>, errors: &mut Vec<EvalError>) -> bool {
    match target {
        Value::Boolean(b) => Cast::bool_implicit(other, errors) == *b,
        Value::Integer(i) => Cast::int(other, errors) == *i,
        Value::String(s) => match other {
            Value::String(o) => o == s,
            _ => Cast::string(other) == *s,
        },
    }
}

fn arith(op: Arith, a: i32, b: i32, errors: &mut Vec<EvalError>) -> i32 {
    match op {
        Arith::Div | Arith::Mod if b == 0 => {
            let symbol = if op == Arith::Div { "/" } else { "%" };
            errors.push(EvalError::new(
                ErrorKind::Math,
                format!("{a} {symbol} 0: division by zero"),
            ));
            0
        }
        // -2147483648 % -1 is 0; Rust's checked_rem calls it an overflow.
        Arith::Mod => a.wrapping_rem(b),
        _ => {
            let (result, symbol) = match op {
                Arith::Mul => (a.checked_mul(b), "*"),
                Arith::Div => (a.checked_div(b), "/"),
                Arith::Add => (a.checked_add(b), "+"),
                _ => (a.checked_sub(b), "-"),
            };
            result.unwrap_or_else(|| {
                // Overflow: the saturated value, like ABS(-2147483648) (spec 3.5.2).
                errors.push(EvalError::new(
                    ErrorKind::Math,
                    format!("{a} {symbol} {b} overflows 32 bits"),
                ));
                let wide = match op {
                    Arith::Mul => i64::from(a) * i64::from(b),
                    Arith::Div => i64::from(a) / i64::from(b),
                    Arith::Add => i64::from(a) + i64::from(b),
                    _ => i64::from(a) - i64::from(b),
                };
                if wide > 0 { i32::MAX } else { i32::MIN }
            })
        }
    }
}

/// Evaluates argument `node` and casts it to `ty`; `None` if the argument reported an error.
fn arg<'a, E: Event + ?Sized>(
    node: &'a Node,
    ty: Type,
    event: &'a E,
    errors: &mut Vec<EvalError>,
) -> Option<Value<'a>> {
    let before = errors.len();
    let v = node.eval(event, errors);
    if errors.len() != before {
        return None;
    }
    Some(Cast::to(v, ty, errors))
}

fn arg_str<'a, E: Event + ?Sized>(
    node: &'a Node,
    event: &'a E,
    errors: &mut Vec<EvalError>,
) -> Option<Cow<'a, str>> {
    arg(node, Type::String, event, errors).map(Cast::into_string)
}

fn arg_int<'a, E: Event + ?Sized>(
    node: &'a Node,
    event: &'a E,
    errors: &mut Vec<EvalError>,
) -> Option<i32> {
    arg(node, Type::Integer, event, errors).map(|v| v.as_int().unwrap_or(0))
}

fn fn_error(errors: &mut Vec<EvalError>, message: String) {
    errors.push(EvalError::new(ErrorKind::FunctionEvaluation, message));
}

/// Characters `from..to` of `s` (character indices, `to` clamped to the length).
fn chars_slice(s: Cow<'_, str>, from: usize, to: usize) -> Cow<'_, str> {
    let byte = |n: usize| s.char_indices().nth(n).map_or(s.len(), |(i, _)| i);
    let (start, end) = (byte(from), byte(to.max(from)));
    match s {
        Cow::Borrowed(b) => Cow::Borrowed(&b[start..end]),
        Cow::Owned(o) if start == 0 && end == o.len() => Cow::Owned(o),
        Cow::Owned(o) => Cow::Owned(o[start..end].to_owned()),
    }
}

fn char_len(s: &str) -> usize {
    s.chars().count()
}

/// Runs a function on `args`; a failed argument gives the return type's zero value.
fn call<'a, E: Event + ?Sized>(
    overload: &'a Overload,
    args: &'a [Node],
    event: &'a E,
    errors: &mut Vec<EvalError>,
) -> Value<'a> {
    let returns = overload.signature.returns;
    let zero = returns.zero();
    let body = match &overload.body {
        Body::Builtin(b) => *b,
        Body::User(f) => {
            let mut values = Vec::with_capacity(args.len());
            for (i, a) in args.iter().enumerate() {
                match arg(a, overload.signature.param(i), event, errors) {
                    Some(v) => values.push(v),
                    None => return zero,
                }
            }
            return match f(&values) {
                Ok(v) if returns == Type::Any || v.kind() == returns => v,
                Ok(v) => {
                    fn_error(errors, format!("returned a {}, not a {returns}", v.kind()));
                    zero
                }
                Err(e) => {
                    fn_error(errors, e.message);
                    match e.value {
                        Some(v) if returns == Type::Any || v.kind() == returns => v,
                        _ => zero,
                    }
                }
            };
        }
    };
    macro_rules! get {
        ($e:expr) => {
            match $e {
                Some(v) => v,
                None => return zero,
            }
        };
    }
    let [first, ..] = args else {
        // Only CONCAT takes no argument.
        return Value::String(Cow::Borrowed(""));
    };
    match body {
        Builtin::Abs => {
            let i = get!(arg_int(first, event, errors));
            Value::Integer(i.checked_abs().unwrap_or_else(|| {
                errors.push(EvalError::new(
                    ErrorKind::Math,
                    "ABS(-2147483648) overflows",
                ));
                i32::MAX
            }))
        }
        Builtin::Length => {
            let s = get!(arg_str(first, event, errors));
            Value::Integer(i32::try_from(char_len(&s)).unwrap_or(i32::MAX))
        }
        Builtin::Concat | Builtin::ConcatWs => {
            let (sep, items) = if body == Builtin::ConcatWs {
                (Some(get!(arg_str(first, event, errors))), &args[1..])
            } else {
                (None, args)
            };
            if let ([only], None) = (items, &sep) {
                return Value::String(get!(arg_str(only, event, errors)));
            }
            let mut out = String::new();
            for (i, a) in items.iter().enumerate() {
                let s = get!(arg_str(a, event, errors));
                if i > 0
                    && let Some(sep) = &sep
                {
                    out.push_str(sep);
                }
                out.push_str(&s);
            }
            Value::String(Cow::Owned(out))
        }
        Builtin::Lower => Value::String(get!(arg_str(first, event, errors)).to_lowercase().into()),
        Builtin::Upper => Value::String(get!(arg_str(first, event, errors)).to_uppercase().into()),
        Builtin::Trim => {
            let s = get!(arg_str(first, event, errors));
            Value::String(match s {
                Cow::Borrowed(b) => Cow::Borrowed(b.trim()),
                Cow::Owned(o) => Cow::Owned(o.trim().to_owned()),
            })
        }
        Builtin::Left | Builtin::Right => {
            let s = get!(arg_str(first, event, errors));
            let n = get!(arg_int(&args[1], event, errors));
            let Ok(n) = usize::try_from(n) else {
                let name = if body == Builtin::Left {
                    "LEFT"
                } else {
                    "RIGHT"
                };
                fn_error(errors, format!("{name}: negative length {n}"));
                return Value::String(s);
            };
            let len = char_len(&s);
            Value::String(if n >= len {
                s
            } else if body == Builtin::Left {
                chars_slice(s, 0, n)
            } else {
                chars_slice(s, len - n, len)
            })
        }
        Builtin::Substring2 | Builtin::Substring3 => {
            let s = get!(arg_str(first, event, errors));
            let pos = get!(arg_int(&args[1], event, errors));
            let count = if body == Builtin::Substring3 {
                Some(get!(arg_int(&args[2], event, errors)))
            } else {
                None
            };
            let len = i64::try_from(char_len(&s)).unwrap_or(i64::MAX);
            let pos = i64::from(pos);
            if pos > len || pos < -len || count.is_some_and(|c| c < 0) {
                fn_error(
                    errors,
                    format!("SUBSTRING: position {pos} or length out of range (string of {len})"),
                );
                return Value::String(Cow::Borrowed(""));
            }
            if pos == 0 {
                return Value::String(Cow::Borrowed(""));
            }
            let start = if pos > 0 { pos - 1 } else { len + pos };
            let end = count.map_or(len, |c| (start + i64::from(c)).min(len));
            let to_usize = |n: i64| usize::try_from(n).unwrap_or(0);
            Value::String(chars_slice(s, to_usize(start), to_usize(end)))
        }
        Builtin::Int => {
            let v = get!(arg(first, Type::Any, event, errors));
            Value::Integer(Cast::int(&v, errors))
        }
        Builtin::Bool => {
            let v = get!(arg(first, Type::Any, event, errors));
            Value::Boolean(Cast::bool_explicit(&v, errors))
        }
        Builtin::String => {
            let v = get!(arg(first, Type::Any, event, errors));
            Value::String(Cast::into_string(v))
        }
        Builtin::IsBool | Builtin::IsInt => {
            let v = get!(arg(first, Type::Any, event, errors));
            Value::Boolean(match (body, &v) {
                (Builtin::IsBool, Value::Boolean(_)) | (Builtin::IsInt, Value::Integer(_)) => true,
                (Builtin::IsBool, Value::String(s)) => parse_bool(s).is_some(),
                (Builtin::IsInt, Value::String(s)) => parse_int(s).is_some(),
                _ => false,
            })
        }
    }
}

/// A compiled CESQL expression: parse it once, evaluate it against many events.
///
/// `Send + Sync`: one compiled expression can be shared by every task that filters.
#[derive(Debug, Clone)]
pub struct Expression {
    root: Node,
}

/// The result of an evaluation: a value, always, and the errors raised (spec 3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation<'a> {
    /// The value (the zero value of the expression's type when an error stopped it).
    pub value: Value<'a>,
    /// The errors raised: once an operand reports one, nothing more is evaluated, so there
    /// are several only when one operator's own casts fail (`'a' + 'b'`).
    pub errors: Vec<EvalError>,
}

impl Evaluation<'_> {
    /// Whether an event passes a filter with this result: the value is the Boolean `true`
    /// and there is no error (spec 1.2).
    pub fn passes(&self) -> bool {
        self.value == Value::Boolean(true) && self.errors.is_empty()
    }
}

impl Expression {
    /// Parses and compiles `src` with the built-in functions.
    pub fn parse(src: &str) -> Result<Expression, ParseError> {
        Expression::parse_with(src, Functions::shared_builtin())
    }

    /// Parses and compiles `src` with `functions` (built-ins and user functions); calls are
    /// resolved now. A call that no definition takes compiles to `false` and a
    /// [`ErrorKind::MissingFunction`] error at evaluation (spec 3.5); see
    /// [`Expression::missing_functions`] to refuse such expressions up front.
    pub fn parse_with(src: &str, functions: &Functions) -> Result<Expression, ParseError> {
        let ast = parse::parse(src)?;
        Ok(Expression {
            root: Node::compile(ast, functions),
        })
    }

    /// Evaluates the expression against `event`.
    pub fn evaluate<'a, E: Event + ?Sized>(&'a self, event: &'a E) -> Evaluation<'a> {
        let mut errors = Vec::new();
        let value = self.root.eval(event, &mut errors);
        Evaluation { value, errors }
    }

    /// Whether `event` passes the expression as a filter: `true` and no error (spec 1.2).
    pub fn matches<E: Event + ?Sized>(&self, event: &E) -> bool {
        let mut errors = Vec::new();
        let value = self.root.eval(event, &mut errors);
        errors.is_empty() && value == Value::Boolean(true)
    }

    /// The type of the expression's value, known when it is compiled; [`Type::Any`] when the
    /// expression is a bare attribute. A filter wants [`Type::Boolean`].
    pub fn return_type(&self) -> Type {
        self.root.return_type()
    }

    /// The calls that no function definition takes, as `NAME/arity`: each evaluates to
    /// `false` with a missing function error. Empty for a well-formed expression.
    pub fn missing_functions(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            match node {
                Node::Lit(_) | Node::Attr(_) | Node::Exists(_) => {}
                Node::Not(x) | Node::Neg(x) | Node::Like { operand: x, .. } => stack.push(x),
                Node::Arith(_, l, r)
                | Node::Cmp(_, l, r)
                | Node::Xor(l, r)
                | Node::Eq {
                    left: l, right: r, ..
                } => {
                    stack.push(l);
                    stack.push(r);
                }
                Node::In { operand, set, .. } => {
                    stack.push(operand);
                    stack.extend(set);
                }
                Node::Call { args, .. } | Node::All(args) | Node::Any(args) => stack.extend(args),
                Node::MissingFunction { name, args } => {
                    out.push(format!("{name}/{}", args.len()));
                    stack.extend(args);
                }
            }
        }
        out
    }
}

impl std::str::FromStr for Expression {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Expression::parse(s)
    }
}

fn write_str_literal(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("'")?;
    for c in s.chars() {
        match c {
            '\'' => f.write_str("\\'")?,
            '\\' => f.write_str("\\\\")?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("'")
}

fn write_list(f: &mut fmt::Formatter<'_>, items: &[Node]) -> fmt::Result {
    f.write_str("(")?;
    for (i, n) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{n}")?;
    }
    f.write_str(")")
}

impl fmt::Display for Node {
    /// A canonical form: every operation in parentheses; parses back to the same expression.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Lit(Value::String(s)) => write_str_literal(f, s),
            Node::Lit(Value::Boolean(b)) => f.write_str(if *b { "TRUE" } else { "FALSE" }),
            Node::Lit(Value::Integer(i)) => write!(f, "{i}"),
            Node::Attr(a) => f.write_str(a),
            Node::Exists(a) => write!(f, "(EXISTS {a})"),
            Node::Not(x) => write!(f, "(NOT {x})"),
            Node::Neg(x) => write!(f, "(-({x}))"),
            Node::Arith(op, l, r) => {
                let s = match op {
                    Arith::Mul => "*",
                    Arith::Div => "/",
                    Arith::Mod => "%",
                    Arith::Add => "+",
                    Arith::Sub => "-",
                };
                write!(f, "({l} {s} {r})")
            }
            Node::Cmp(op, l, r) => {
                let s = match op {
                    Cmp::Lt => "<",
                    Cmp::Le => "<=",
                    Cmp::Gt => ">",
                    Cmp::Ge => ">=",
                };
                write!(f, "({l} {s} {r})")
            }
            Node::Eq {
                negated,
                left,
                right,
            } => write!(f, "({left} {} {right})", if *negated { "!=" } else { "=" }),
            Node::Xor(l, r) => write!(f, "({l} XOR {r})"),
            Node::All(items) | Node::Any(items) => {
                let op = if matches!(self, Node::All(_)) {
                    " AND "
                } else {
                    " OR "
                };
                f.write_str("(")?;
                for (i, n) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(op)?;
                    }
                    write!(f, "{n}")?;
                }
                f.write_str(")")
            }
            Node::Like {
                negated,
                operand,
                pattern,
                ..
            } => {
                write!(f, "({operand} {}LIKE ", if *negated { "NOT " } else { "" })?;
                write_str_literal(f, pattern)?;
                f.write_str(")")
            }
            Node::In {
                negated,
                operand,
                set,
            } => {
                write!(f, "({operand} {}IN ", if *negated { "NOT " } else { "" })?;
                write_list(f, set)?;
                f.write_str(")")
            }
            Node::Call { name, args, .. } | Node::MissingFunction { name, args } => {
                f.write_str(name)?;
                write_list(f, args)
            }
        }
    }
}

impl fmt::Display for Expression {
    /// The expression in a canonical form (every operation in parentheses), which parses back
    /// to an expression that evaluates the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.root)
    }
}
