//! Functions: the built-ins (spec 3.5) and user functions, with the spec's overloading rules.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::parse::is_function_name;
use crate::value::{Type, Value};

/// The built-in functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    Abs,
    Length,
    Concat,
    ConcatWs,
    Lower,
    Upper,
    Trim,
    Left,
    Right,
    Substring2,
    Substring3,
    Int,
    Bool,
    String,
    IsBool,
    IsInt,
}

/// Name, parameter types, variadic parameter type, return type.
type BuiltinSig = (&'static str, &'static [Type], Option<Type>, Type, Builtin);

const BUILTINS: &[BuiltinSig] = {
    use Type::{Any, Boolean, Integer, String};
    &[
        ("ABS", &[Integer], None, Integer, Builtin::Abs),
        ("LENGTH", &[String], None, Integer, Builtin::Length),
        ("CONCAT", &[], Some(String), String, Builtin::Concat),
        (
            "CONCAT_WS",
            &[String],
            Some(String),
            String,
            Builtin::ConcatWs,
        ),
        ("LOWER", &[String], None, String, Builtin::Lower),
        ("UPPER", &[String], None, String, Builtin::Upper),
        ("TRIM", &[String], None, String, Builtin::Trim),
        ("LEFT", &[String, Integer], None, String, Builtin::Left),
        ("RIGHT", &[String, Integer], None, String, Builtin::Right),
        (
            "SUBSTRING",
            &[String, Integer],
            None,
            String,
            Builtin::Substring2,
        ),
        (
            "SUBSTRING",
            &[String, Integer, Integer],
            None,
            String,
            Builtin::Substring3,
        ),
        ("INT", &[Any], None, Integer, Builtin::Int),
        ("BOOL", &[Any], None, Boolean, Builtin::Bool),
        ("STRING", &[Any], None, String, Builtin::String),
        ("IS_BOOL", &[Any], None, Boolean, Builtin::IsBool),
        ("IS_INT", &[Any], None, Boolean, Builtin::IsInt),
    ]
};

/// What a user function gives when it fails: a message, and the value to return if it has
/// one of the function's return type (otherwise the return type's zero value is used, spec
/// 3.5.3). The evaluation reports a [`crate::ErrorKind::FunctionEvaluation`] error either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionError {
    /// What went wrong.
    pub message: String,
    /// The value to return anyway.
    pub value: Option<Value<'static>>,
}

impl FunctionError {
    /// A failure without a value.
    pub fn new(message: impl Into<String>) -> Self {
        FunctionError {
            message: message.into(),
            value: None,
        }
    }
}

/// The body of a user function: its arguments, already cast to the parameter types.
pub type UserFn =
    dyn Fn(&[Value<'_>]) -> Result<Value<'static>, FunctionError> + Send + Sync + 'static;

/// A function's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The fixed parameters' types; arguments are cast to them (no cast for [`Type::Any`]).
    pub params: Vec<Type>,
    /// The type of any number of further arguments, for a variadic function.
    pub variadic: Option<Type>,
    /// The return type: the type of the zero value returned on errors.
    pub returns: Type,
}

impl Signature {
    /// A function of fixed arity.
    pub fn new(params: impl Into<Vec<Type>>, returns: Type) -> Self {
        Signature {
            params: params.into(),
            variadic: None,
            returns,
        }
    }

    /// A variadic function: `params`, then any number of `rest`.
    pub fn variadic(params: impl Into<Vec<Type>>, rest: Type, returns: Type) -> Self {
        Signature {
            params: params.into(),
            variadic: Some(rest),
            returns,
        }
    }

    fn accepts(&self, arity: usize) -> bool {
        match self.variadic {
            None => arity == self.params.len(),
            Some(_) => arity >= self.params.len(),
        }
    }

    /// The type of argument `i`.
    pub(crate) fn param(&self, i: usize) -> Type {
        self.params
            .get(i)
            .copied()
            .or(self.variadic)
            .unwrap_or(Type::Any)
    }
}

#[derive(Clone)]
pub(crate) enum Body {
    Builtin(Builtin),
    User(Arc<UserFn>),
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::Builtin(b) => write!(f, "{b:?}"),
            Body::User(_) => f.write_str("user function"),
        }
    }
}

/// One definition of a function name.
#[derive(Debug, Clone)]
pub(crate) struct Overload {
    pub(crate) signature: Signature,
    pub(crate) body: Body,
}

/// Why a function cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterError {
    /// The name is not `[A-Za-z][A-Za-z_]*` (spec 2.4).
    InvalidName(String),
    /// A function of that name already takes that many arguments (spec 3.5: no two functions
    /// with the same name and arity, built-ins included).
    Conflict(String),
    /// A second variadic definition, or one whose fixed parameters are not more than every
    /// other definition's arity (spec 3.5).
    Variadic(String),
}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegisterError::InvalidName(n) => write!(f, "{n:?} is not a CESQL function name"),
            RegisterError::Conflict(n) => {
                write!(f, "a function {n} of the same arity is already defined")
            }
            RegisterError::Variadic(n) => write!(
                f,
                "function {n}: at most one variadic definition, with more fixed parameters \
                 than any other definition has"
            ),
        }
    }
}

impl std::error::Error for RegisterError {}

/// The functions an expression can call: the built-ins and any registered user functions.
/// Names are case-insensitive. Give it to [`crate::Expression::parse_with`]: calls are
/// resolved when the expression is compiled.
///
/// ```
/// use cesql::{Expression, FunctionError, Functions, MapEvent, Signature, Type, Value};
///
/// let mut functions = Functions::builtin();
/// functions
///     .register("IS_EVEN", Signature::new([Type::Integer], Type::Boolean), |args| {
///         match args {
///             [Value::Integer(n)] => Ok(Value::Boolean(n % 2 == 0)),
///             _ => Err(FunctionError::new("one Integer expected")),
///         }
///     })
///     .unwrap();
/// let expr = Expression::parse_with("is_even(sequence)", &functions).unwrap();
/// let event = MapEvent::new("1", "/s", "t").with("sequence", "42");
/// assert!(expr.matches(&event));
/// ```
#[derive(Debug, Clone)]
pub struct Functions {
    by_name: HashMap<String, Vec<Overload>>,
}

impl Default for Functions {
    fn default() -> Self {
        Functions::builtin()
    }
}

impl Functions {
    /// The built-in functions of the spec (3.5: `ABS`, `LENGTH`, `CONCAT`, `CONCAT_WS`,
    /// `LOWER`, `UPPER`, `TRIM`, `LEFT`, `RIGHT`, `SUBSTRING` with 2 and 3 arguments), the
    /// casting functions `INT`, `BOOL`, `STRING` (used by the spec's examples and the TCK), and
    /// `IS_BOOL`, `IS_INT` (from the spec's drafts: whether the argument casts without error).
    pub fn builtin() -> Self {
        let mut by_name: HashMap<String, Vec<Overload>> = HashMap::new();
        for &(name, params, variadic, returns, b) in BUILTINS {
            by_name.entry(name.to_owned()).or_default().push(Overload {
                signature: Signature {
                    params: params.to_vec(),
                    variadic,
                    returns,
                },
                body: Body::Builtin(b),
            });
        }
        Functions { by_name }
    }

    /// The built-ins, made once.
    pub(crate) fn shared_builtin() -> &'static Functions {
        static BUILTIN: OnceLock<Functions> = OnceLock::new();
        BUILTIN.get_or_init(Functions::builtin)
    }

    /// Adds a user function. Its arguments are cast to `signature`'s parameter types before
    /// `body` sees them (a failed cast is a cast error and the parameter type's zero value).
    /// A result of another type than `signature.returns` counts as a failure (spec 3.5.3).
    pub fn register<F>(
        &mut self,
        name: &str,
        signature: Signature,
        body: F,
    ) -> Result<(), RegisterError>
    where
        F: Fn(&[Value<'_>]) -> Result<Value<'static>, FunctionError> + Send + Sync + 'static,
    {
        if !is_function_name(name) {
            return Err(RegisterError::InvalidName(name.to_owned()));
        }
        let upper = name.to_ascii_uppercase();
        let existing = self.by_name.get(&upper).map(Vec::as_slice).unwrap_or(&[]);
        let mut all: Vec<&Signature> = existing.iter().map(|o| &o.signature).collect();
        all.push(&signature);
        let fixed: Vec<usize> = all
            .iter()
            .filter(|s| s.variadic.is_none())
            .map(|s| s.params.len())
            .collect();
        let variadic: Vec<usize> = all
            .iter()
            .filter(|s| s.variadic.is_some())
            .map(|s| s.params.len())
            .collect();
        for (i, a) in fixed.iter().enumerate() {
            if fixed[..i].contains(a) {
                return Err(RegisterError::Conflict(upper));
            }
        }
        match variadic.as_slice() {
            [] => {}
            [v] if fixed.iter().all(|a| a < v) => {}
            _ => return Err(RegisterError::Variadic(upper)),
        }
        self.by_name.entry(upper).or_default().push(Overload {
            signature,
            body: Body::User(Arc::new(body)),
        });
        Ok(())
    }

    /// The definition of `name` (upper case) for `arity` arguments: the fixed one, else the
    /// variadic one.
    pub(crate) fn resolve(&self, name: &str, arity: usize) -> Option<&Overload> {
        let overloads = self.by_name.get(name)?;
        overloads
            .iter()
            .find(|o| o.signature.variadic.is_none() && o.signature.accepts(arity))
            .or_else(|| overloads.iter().find(|o| o.signature.accepts(arity)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &[Value<'_>]) -> Result<Value<'static>, FunctionError> {
        Ok(Value::Boolean(true))
    }

    #[test]
    fn overloading_rules_of_the_spec() {
        let mut f = Functions::builtin();
        let s = |n: usize| Signature::new(vec![Type::String; n], Type::Integer);
        let v = |n: usize| Signature::variadic(vec![Type::String; n], Type::String, Type::Integer);
        assert!(f.register("abc", s(1), ok).is_ok());
        assert!(f.register("ABC", s(2), ok).is_ok());
        assert!(matches!(
            f.register("Abc", s(2), ok),
            Err(RegisterError::Conflict(_))
        ));
        // ABC(x...) with no fixed parameters cannot coexist with ABC(x) and ABC(x, y).
        assert!(matches!(
            f.register("ABC", v(0), ok),
            Err(RegisterError::Variadic(_))
        ));
        assert!(matches!(
            f.register("ABC", v(2), ok),
            Err(RegisterError::Variadic(_))
        ));
        assert!(f.register("ABC", v(3), ok).is_ok());
        assert!(matches!(
            f.register("ABC", v(4), ok),
            Err(RegisterError::Variadic(_))
        ));
        assert!(matches!(
            f.register("ABC", s(3), ok),
            Err(RegisterError::Variadic(_))
        ));
        assert_eq!(
            f.resolve("ABC", 2).map(|o| o.signature.params.len()),
            Some(2)
        );
        assert_eq!(
            f.resolve("ABC", 5).map(|o| o.signature.params.len()),
            Some(3)
        );
        assert!(f.resolve("ABC", 0).is_none());
        // Built-ins count: LENGTH(x) exists, CONCAT is variadic from 0.
        assert!(matches!(
            f.register("length", s(1), ok),
            Err(RegisterError::Conflict(_))
        ));
        assert!(matches!(
            f.register("concat", s(0), ok),
            Err(RegisterError::Variadic(_))
        ));
        assert!(f.register("CONCAT_WS", s(0), ok).is_ok());
        for bad in ["", "1A", "_A", "A1", "A-B", "É"] {
            assert!(matches!(
                f.register(bad, s(1), ok),
                Err(RegisterError::InvalidName(_))
            ));
        }
    }
}
