//! Parse errors (with their position) and evaluation errors (spec 3.3).

use std::fmt;

/// The kinds of error of spec 3.3; evaluation gives all but [`ErrorKind::Parse`], which is a
/// [`ParseError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The expression does not parse.
    Parse,
    /// A mathematical operation failed: division or modulo by zero, overflow.
    Math,
    /// An implicit or explicit type cast failed.
    Cast,
    /// The expression addresses an attribute that the event does not have.
    MissingAttribute,
    /// No function of that name takes that many arguments.
    MissingFunction,
    /// A function failed (e.g. `LEFT(x, -1)`).
    FunctionEvaluation,
    /// Any other error.
    Generic,
}

impl ErrorKind {
    /// The name the CESQL TCK gives the kind (`parse`, `math`, `cast`, `missingAttribute`,
    /// `missingFunction`, `functionEvaluation`, `generic`).
    pub fn tck_name(self) -> &'static str {
        match self {
            ErrorKind::Parse => "parse",
            ErrorKind::Math => "math",
            ErrorKind::Cast => "cast",
            ErrorKind::MissingAttribute => "missingAttribute",
            ErrorKind::MissingFunction => "missingFunction",
            ErrorKind::FunctionEvaluation => "functionEvaluation",
            ErrorKind::Generic => "generic",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Parse => "parse error",
            ErrorKind::Math => "math error",
            ErrorKind::Cast => "cast error",
            ErrorKind::MissingAttribute => "missing attribute",
            ErrorKind::MissingFunction => "missing function",
            ErrorKind::FunctionEvaluation => "function evaluation error",
            ErrorKind::Generic => "error",
        })
    }
}

/// An error raised while evaluating an expression; the evaluation still has a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError {
    kind: ErrorKind,
    message: String,
}

impl EvalError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        EvalError {
            kind,
            message: message.into(),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What happened.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for EvalError {}

/// Why an expression does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// A character that starts no token.
    UnexpectedChar(char),
    /// A string literal without its closing quote.
    UnterminatedString,
    /// An integer literal outside the 32-bit signed range.
    IntegerOutOfRange,
    /// A word that is neither an attribute name (`[a-zA-Z0-9]+`) nor a function name
    /// (`[a-zA-Z][a-zA-Z_]*`).
    InvalidIdentifier(String),
    /// A token where another was expected (`expected` says what).
    UnexpectedToken {
        /// The token found.
        found: String,
        /// What the grammar allows there.
        expected: &'static str,
    },
    /// The expression ends where more was expected.
    UnexpectedEnd {
        /// What the grammar allows there.
        expected: &'static str,
    },
    /// The right side of `LIKE` is not a string literal (spec 3.4.3).
    LikePatternNotString,
    /// Nested deeper than [`crate::MAX_DEPTH`].
    TooDeep,
}

/// An expression that does not parse: why, and where (a byte offset into the expression).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    kind: ParseErrorKind,
    position: usize,
}

impl ParseError {
    pub(crate) fn new(kind: ParseErrorKind, position: usize) -> Self {
        ParseError { kind, position }
    }

    /// Why.
    pub fn kind(&self) -> &ParseErrorKind {
        &self.kind
    }

    /// The byte offset in the expression where the error was found.
    pub fn position(&self) -> usize {
        self.position
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CESQL parse error at offset {}: ", self.position)?;
        match &self.kind {
            ParseErrorKind::UnexpectedChar(c) => write!(f, "unexpected character {c:?}"),
            ParseErrorKind::UnterminatedString => f.write_str("string literal is not closed"),
            ParseErrorKind::IntegerOutOfRange => {
                f.write_str("integer literal is outside the 32-bit signed range")
            }
            ParseErrorKind::InvalidIdentifier(w) => {
                write!(f, "{w:?} is neither an attribute nor a function name")
            }
            ParseErrorKind::UnexpectedToken { found, expected } => {
                write!(f, "found {found}, expected {expected}")
            }
            ParseErrorKind::UnexpectedEnd { expected } => {
                write!(f, "the expression ends, expected {expected}")
            }
            ParseErrorKind::LikePatternNotString => {
                f.write_str("the pattern of LIKE must be a string literal")
            }
            ParseErrorKind::TooDeep => write!(f, "nested deeper than {}", crate::MAX_DEPTH),
        }
    }
}

impl std::error::Error for ParseError {}
