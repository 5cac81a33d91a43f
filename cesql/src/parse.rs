//! Lexer and parser: CESQL text to an [`Ast`] (spec section 2, `CESQLParser.g4`).
//!
//! Precedence, highest first (spec 3.6): function calls and atoms, unary `NOT` and `-`,
//! `LIKE`, `EXISTS`, `IN`, `* / %`, `+ -`, comparisons, then `AND OR XOR` (one level). Equal
//! precedence associates left to right (spec 3.6 "evaluated left to right"; the ANTLR grammar
//! marks the logic operators `<assoc=right>`, which differs only for `AND`/`OR` mixed without
//! parentheses, and then the spec's text decides).

use crate::MAX_DEPTH;
use crate::error::{ParseError, ParseErrorKind};

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Mul,
    Div,
    Mod,
    Add,
    Sub,
    Eq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    Xor,
}

impl BinOp {
    /// Binding power: higher binds tighter.
    fn power(self) -> u8 {
        match self {
            BinOp::Mul | BinOp::Div | BinOp::Mod => 4,
            BinOp::Add | BinOp::Sub => 3,
            BinOp::Eq | BinOp::NotEq | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 2,
            BinOp::And | BinOp::Or | BinOp::Xor => 1,
        }
    }
}

const POWER_IN: u8 = 5;
const POWER_LIKE: u8 = 6;
/// The operand of a prefix operator is an atom or another prefix operation.
const POWER_PREFIX: u8 = 7;

/// The syntax tree of an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ast {
    Bool(bool),
    Int(i32),
    Str(String),
    /// An attribute, lower-cased.
    Attr(String),
    /// `EXISTS name`, lower-cased.
    Exists(String),
    Not(Box<Ast>),
    Neg(Box<Ast>),
    Binary(BinOp, Box<Ast>, Box<Ast>),
    /// A chain of `AND` (or of `OR`) at one level, left to right: `a AND b AND c` is one node,
    /// so that a long chain nests no deeper than one operator.
    Chain(BinOp, Vec<Ast>),
    Like {
        negated: bool,
        operand: Box<Ast>,
        pattern: String,
    },
    In {
        negated: bool,
        operand: Box<Ast>,
        set: Vec<Ast>,
    },
    /// A function call, the name upper-cased.
    Call {
        name: String,
        args: Vec<Ast>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    LParen,
    RParen,
    Comma,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Eq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    Xor,
    Not,
    Like,
    Exists,
    In,
    True,
    False,
    /// Digits, as a number (saturated: anything past `i32` is out of range anyway).
    Int(u64),
    Str(String),
    Word(String),
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Int(n) => format!("integer {n}"),
            Tok::Str(s) => format!("string {s:?}"),
            Tok::Word(w) => format!("{w:?}"),
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::Comma => "','".into(),
            Tok::Plus => "'+'".into(),
            Tok::Minus => "'-'".into(),
            Tok::Star => "'*'".into(),
            Tok::Slash => "'/'".into(),
            Tok::Percent => "'%'".into(),
            Tok::Eq => "'='".into(),
            Tok::NotEq => "'!='".into(),
            Tok::Lt => "'<'".into(),
            Tok::Le => "'<='".into(),
            Tok::Gt => "'>'".into(),
            Tok::Ge => "'>='".into(),
            Tok::And => "AND".into(),
            Tok::Or => "OR".into(),
            Tok::Xor => "XOR".into(),
            Tok::Not => "NOT".into(),
            Tok::Like => "LIKE".into(),
            Tok::Exists => "EXISTS".into(),
            Tok::In => "IN".into(),
            Tok::True => "TRUE".into(),
            Tok::False => "FALSE".into(),
        }
    }
}

/// Splits `src` into tokens with their byte offsets.
fn lex(src: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        let b = bytes[i];
        let tok = match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'(' => Tok::LParen,
            b')' => Tok::RParen,
            b',' => Tok::Comma,
            b'+' => Tok::Plus,
            b'-' => Tok::Minus,
            b'*' => Tok::Star,
            b'/' => Tok::Slash,
            b'%' => Tok::Percent,
            b'=' => Tok::Eq,
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                i += 1;
                Tok::NotEq
            }
            b'<' => match bytes.get(i + 1) {
                Some(b'=') => {
                    i += 1;
                    Tok::Le
                }
                Some(b'>') => {
                    i += 1;
                    Tok::NotEq
                }
                _ => Tok::Lt,
            },
            b'>' if bytes.get(i + 1) == Some(&b'=') => {
                i += 1;
                Tok::Ge
            }
            b'>' => Tok::Gt,
            b'\'' | b'"' => {
                let (s, end) = lex_string(src, i)?;
                out.push((Tok::Str(s), start));
                i = end;
                continue;
            }
            b if b.is_ascii_alphanumeric() || b == b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let word = &src[start..i];
                out.push((word_token(word), start));
                continue;
            }
            _ => {
                let c = src[i..].chars().next().unwrap_or('\u{fffd}');
                return Err(ParseError::new(ParseErrorKind::UnexpectedChar(c), i));
            }
        };
        out.push((tok, start));
        i += 1;
    }
    Ok(out)
}

fn word_token(word: &str) -> Tok {
    if word.bytes().all(|b| b.is_ascii_digit()) {
        let n = word.bytes().fold(0u64, |n, d| {
            n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
        });
        return Tok::Int(n);
    }
    let keyword = |k: &str| word.eq_ignore_ascii_case(k);
    if keyword("AND") {
        Tok::And
    } else if keyword("OR") {
        Tok::Or
    } else if keyword("XOR") {
        Tok::Xor
    } else if keyword("NOT") {
        Tok::Not
    } else if keyword("LIKE") {
        Tok::Like
    } else if keyword("EXISTS") {
        Tok::Exists
    } else if keyword("IN") {
        Tok::In
    } else if keyword("TRUE") {
        Tok::True
    } else if keyword("FALSE") {
        Tok::False
    } else {
        Tok::Word(word.to_owned())
    }
}

/// A string literal from the quote at `start`: `\` followed by the quote is the quote (spec
/// 2.2), `\\` is one backslash, a doubled quote is the quote (SQL, as the ANTLR lexer allows);
/// any other `\x` stays as it is (so `'a\%'` keeps its backslash for LIKE). Returns the text
/// and the offset after the closing quote.
fn lex_string(src: &str, start: usize) -> Result<(String, usize), ParseError> {
    let quote = src.as_bytes()[start] as char;
    let mut out = String::new();
    let mut chars = src[start + 1..].char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some((_, n)) if n == quote || n == '\\' => out.push(n),
                Some((_, n)) => {
                    out.push('\\');
                    out.push(n);
                }
                None => break,
            }
        } else if c == quote {
            if chars.peek().is_some_and(|&(_, n)| n == quote) {
                chars.next();
                out.push(quote);
            } else {
                return Ok((out, start + 1 + at + 1));
            }
        } else {
            out.push(c);
        }
    }
    Err(ParseError::new(ParseErrorKind::UnterminatedString, start))
}

fn is_attribute_name(w: &str) -> bool {
    !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric())
}

pub(crate) fn is_function_name(w: &str) -> bool {
    let mut bytes = w.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphabetic() || b == b'_')
}

/// Parses a whole expression.
pub(crate) fn parse(src: &str) -> Result<Ast, ParseError> {
    let tokens = lex(src)?;
    let mut p = Parser {
        tokens,
        pos: 0,
        end: src.len(),
    };
    let (ast, _) = p.expr(0, 0)?;
    match p.tokens.get(p.pos) {
        None => Ok(ast),
        Some((t, at)) => Err(ParseError::new(
            ParseErrorKind::UnexpectedToken {
                found: t.describe(),
                expected: "an operator or the end of the expression",
            },
            *at,
        )),
    }
}

struct Parser {
    tokens: Vec<(Tok, usize)>,
    pos: usize,
    /// Offset of the end of the text, for errors at the end.
    end: usize,
}

/// A parsed subexpression and the height of its tree.
type Sub = (Ast, usize);

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|(t, _)| t)
    }

    fn peek_at(&self, ahead: usize) -> Option<&Tok> {
        self.tokens.get(self.pos + ahead).map(|(t, _)| t)
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |(_, at)| *at)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.pos).map(|(t, _)| t.clone());
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn unexpected(&self, expected: &'static str) -> ParseError {
        match self.tokens.get(self.pos) {
            Some((t, at)) => ParseError::new(
                ParseErrorKind::UnexpectedToken {
                    found: t.describe(),
                    expected,
                },
                *at,
            ),
            None => ParseError::new(ParseErrorKind::UnexpectedEnd { expected }, self.end),
        }
    }

    fn expect(&mut self, tok: &Tok, expected: &'static str) -> Result<(), ParseError> {
        if self.peek() == Some(tok) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }

    fn check_height(&self, height: usize, at: usize) -> Result<usize, ParseError> {
        if height > MAX_DEPTH {
            Err(ParseError::new(ParseErrorKind::TooDeep, at))
        } else {
            Ok(height)
        }
    }

    /// An expression whose operators bind at least as tightly as `min`.
    fn expr(&mut self, min: u8, depth: usize) -> Result<Sub, ParseError> {
        self.check_height(depth, self.offset())?;
        let (mut lhs, mut height) = self.prefix(depth)?;
        loop {
            let at = self.offset();
            let (negated, postfix) = match (self.peek(), self.peek_at(1)) {
                (Some(Tok::Like), _) => (false, Some(Tok::Like)),
                (Some(Tok::In), _) => (false, Some(Tok::In)),
                (Some(Tok::Not), Some(Tok::Like)) => (true, Some(Tok::Like)),
                (Some(Tok::Not), Some(Tok::In)) => (true, Some(Tok::In)),
                _ => (false, None),
            };
            if let Some(op) = postfix {
                let power = if op == Tok::Like {
                    POWER_LIKE
                } else {
                    POWER_IN
                };
                if power < min {
                    break;
                }
                self.pos += if negated { 2 } else { 1 };
                if op == Tok::Like {
                    let pattern = match self.peek() {
                        Some(Tok::Str(s)) => s.clone(),
                        Some(_) => {
                            return Err(ParseError::new(
                                ParseErrorKind::LikePatternNotString,
                                self.offset(),
                            ));
                        }
                        None => return Err(self.unexpected("a string literal (LIKE pattern)")),
                    };
                    self.pos += 1;
                    height = self.check_height(height + 1, at)?;
                    lhs = Ast::Like {
                        negated,
                        operand: Box::new(lhs),
                        pattern,
                    };
                } else {
                    self.expect(&Tok::LParen, "'(' (the set of IN)")?;
                    let (set, set_height) = self.list(depth)?;
                    height = self.check_height(height.max(set_height) + 1, at)?;
                    lhs = Ast::In {
                        negated,
                        operand: Box::new(lhs),
                        set,
                    };
                }
                continue;
            }
            let op = match self.peek() {
                Some(Tok::Star) => BinOp::Mul,
                Some(Tok::Slash) => BinOp::Div,
                Some(Tok::Percent) => BinOp::Mod,
                Some(Tok::Plus) => BinOp::Add,
                Some(Tok::Minus) => BinOp::Sub,
                Some(Tok::Eq) => BinOp::Eq,
                Some(Tok::NotEq) => BinOp::NotEq,
                Some(Tok::Lt) => BinOp::Lt,
                Some(Tok::Le) => BinOp::Le,
                Some(Tok::Gt) => BinOp::Gt,
                Some(Tok::Ge) => BinOp::Ge,
                Some(Tok::And) => BinOp::And,
                Some(Tok::Or) => BinOp::Or,
                Some(Tok::Xor) => BinOp::Xor,
                _ => break,
            };
            if op.power() < min {
                break;
            }
            self.pos += 1;
            let (rhs, rhs_height) = self.expr(op.power() + 1, depth + 1)?;
            lhs = match (op, lhs) {
                (BinOp::And | BinOp::Or, Ast::Chain(chain_op, mut items)) if chain_op == op => {
                    height = self.check_height(height.max(rhs_height + 1), at)?;
                    items.push(rhs);
                    Ast::Chain(op, items)
                }
                (BinOp::And | BinOp::Or, lhs) => {
                    height = self.check_height(height.max(rhs_height) + 1, at)?;
                    Ast::Chain(op, vec![lhs, rhs])
                }
                (_, lhs) => {
                    height = self.check_height(height.max(rhs_height) + 1, at)?;
                    Ast::Binary(op, Box::new(lhs), Box::new(rhs))
                }
            };
        }
        Ok((lhs, height))
    }

    /// `( expr, expr, ... )` after its `(`; at least one expression.
    fn list(&mut self, depth: usize) -> Result<(Vec<Ast>, usize), ParseError> {
        let mut items = Vec::new();
        let mut height = 0;
        loop {
            let (e, h) = self.expr(0, depth + 1)?;
            items.push(e);
            height = height.max(h);
            match self.peek() {
                Some(Tok::Comma) => self.pos += 1,
                Some(Tok::RParen) => {
                    self.pos += 1;
                    return Ok((items, height));
                }
                _ => return Err(self.unexpected("',' or ')'")),
            }
        }
    }

    /// An atom, a parenthesised expression, a function call, `EXISTS name`, or a prefix
    /// operator and its operand.
    fn prefix(&mut self, depth: usize) -> Result<Sub, ParseError> {
        let at = self.offset();
        let Some(tok) = self.next() else {
            return Err(self.unexpected("an expression"));
        };
        let leaf = |ast| Ok((ast, 1));
        match tok {
            Tok::True => leaf(Ast::Bool(true)),
            Tok::False => leaf(Ast::Bool(false)),
            Tok::Str(s) => leaf(Ast::Str(s)),
            Tok::Int(n) => leaf(Ast::Int(int_literal(n, false, at)?)),
            // A sign directly before digits is part of the literal (spec 2.2), so that
            // -2147483648 is a literal; otherwise `-` negates (and `+` is no operator).
            Tok::Minus | Tok::Plus if matches!(self.peek(), Some(Tok::Int(_))) => {
                let Some(Tok::Int(n)) = self.next() else {
                    return Err(self.unexpected("an integer"));
                };
                leaf(Ast::Int(int_literal(n, tok == Tok::Minus, at)?))
            }
            Tok::Minus => {
                let (e, h) = self.expr(POWER_PREFIX, depth + 1)?;
                Ok((Ast::Neg(Box::new(e)), self.check_height(h + 1, at)?))
            }
            Tok::Not => {
                let (e, h) = self.expr(POWER_PREFIX, depth + 1)?;
                Ok((Ast::Not(Box::new(e)), self.check_height(h + 1, at)?))
            }
            Tok::Exists => match self.peek() {
                Some(Tok::Word(w)) if is_attribute_name(w) => {
                    let name = w.to_ascii_lowercase();
                    self.pos += 1;
                    leaf(Ast::Exists(name))
                }
                _ => Err(self.unexpected("an attribute name after EXISTS")),
            },
            Tok::LParen => {
                let sub = self.expr(0, depth + 1)?;
                self.expect(&Tok::RParen, "')'")?;
                Ok(sub)
            }
            Tok::Word(w) if self.peek() == Some(&Tok::LParen) => {
                if !is_function_name(&w) {
                    return Err(ParseError::new(ParseErrorKind::InvalidIdentifier(w), at));
                }
                self.pos += 1;
                let (args, h) = if self.peek() == Some(&Tok::RParen) {
                    self.pos += 1;
                    (Vec::new(), 0)
                } else {
                    self.list(depth)?
                };
                Ok((
                    Ast::Call {
                        name: w.to_ascii_uppercase(),
                        args,
                    },
                    self.check_height(h + 1, at)?,
                ))
            }
            Tok::Word(w) => {
                if is_attribute_name(&w) {
                    leaf(Ast::Attr(w.to_ascii_lowercase()))
                } else {
                    Err(ParseError::new(ParseErrorKind::InvalidIdentifier(w), at))
                }
            }
            _ => {
                self.pos -= 1;
                Err(self.unexpected("an expression"))
            }
        }
    }
}

fn int_literal(magnitude: u64, negative: bool, at: usize) -> Result<i32, ParseError> {
    let value = if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    };
    value
        .and_then(|v| i32::try_from(v).ok())
        .ok_or_else(|| ParseError::new(ParseErrorKind::IntegerOutOfRange, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Ast {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn bin(op: BinOp, l: Ast, r: Ast) -> Ast {
        Ast::Binary(op, Box::new(l), Box::new(r))
    }

    fn attr(n: &str) -> Ast {
        Ast::Attr(n.into())
    }

    #[test]
    fn precedence_and_associativity() {
        use BinOp::*;
        assert_eq!(
            p("1 + 2 * 3"),
            bin(Add, Ast::Int(1), bin(Mul, Ast::Int(2), Ast::Int(3)))
        );
        assert_eq!(
            p("1 - 2 - 3"),
            bin(Sub, bin(Sub, Ast::Int(1), Ast::Int(2)), Ast::Int(3))
        );
        // Logic operators share one level, left to right.
        assert_eq!(
            p("a OR b AND c"),
            Ast::Chain(
                And,
                vec![Ast::Chain(Or, vec![attr("a"), attr("b")]), attr("c")]
            )
        );
        assert_eq!(
            p("a AND b OR c"),
            Ast::Chain(
                Or,
                vec![Ast::Chain(And, vec![attr("a"), attr("b")]), attr("c")]
            )
        );
        assert_eq!(
            p("a AND b AND c"),
            Ast::Chain(And, vec![attr("a"), attr("b"), attr("c")])
        );
        assert_eq!(
            p("a XOR b XOR c"),
            bin(Xor, bin(Xor, attr("a"), attr("b")), attr("c"))
        );
        assert_eq!(
            p("a = 1 AND b"),
            Ast::Chain(And, vec![bin(Eq, attr("a"), Ast::Int(1)), attr("b")])
        );
        // Unary operators bind tighter than everything but calls and atoms.
        assert_eq!(
            p("NOT a = b"),
            bin(Eq, Ast::Not(Box::new(attr("a"))), attr("b"))
        );
        // LIKE and IN bind tighter than binary operators.
        assert_eq!(
            p("a = b LIKE 'x'"),
            bin(
                Eq,
                attr("a"),
                Ast::Like {
                    negated: false,
                    operand: Box::new(attr("b")),
                    pattern: "x".into()
                }
            )
        );
    }

    #[test]
    fn signs_and_minus() {
        use BinOp::*;
        assert_eq!(p("4-1"), bin(Sub, Ast::Int(4), Ast::Int(1)));
        assert_eq!(p("4 - -1"), bin(Sub, Ast::Int(4), Ast::Int(-1)));
        assert_eq!(p("--10"), Ast::Neg(Box::new(Ast::Int(-10))));
        assert_eq!(p("-2147483648"), Ast::Int(i32::MIN));
        assert_eq!(p("+7"), Ast::Int(7));
        assert_eq!(p("-'10'"), Ast::Neg(Box::new(Ast::Str("10".into()))));
        for bad in ["2147483648", "-2147483649", "99999999999999999999999"] {
            assert_eq!(
                parse(bad).map_err(|e| e.kind().clone()),
                Err(ParseErrorKind::IntegerOutOfRange)
            );
        }
        assert!(parse("+a").is_err());
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(p(r#"'a"b\'c'"#), Ast::Str("a\"b'c".into()));
        assert_eq!(p(r#""a'b\"c""#), Ast::Str("a'b\"c".into()));
        assert_eq!(p("'it''s'"), Ast::Str("it's".into()));
        assert_eq!(p(r"'a\%b\\'"), Ast::Str(r"a\%b\".into()));
        assert_eq!(p(r"'a\c'"), Ast::Str(r"a\c".into()));
        assert_eq!(p("'é€'"), Ast::Str("é€".into()));
        let e = parse("'abc").unwrap_err();
        assert_eq!(
            (e.kind(), e.position()),
            (&ParseErrorKind::UnterminatedString, 0)
        );
        assert!(parse(r"'abc\'").is_err());
    }

    #[test]
    fn keywords_and_identifiers_ignore_case() {
        assert_eq!(p("tRuE"), Ast::Bool(true));
        assert_eq!(p("EXISTS SOURCE"), Ast::Exists("source".into()));
        assert_eq!(
            p("concat_ws(',')"),
            Ast::Call {
                name: "CONCAT_WS".into(),
                args: vec![Ast::Str(",".into())]
            }
        );
        assert_eq!(p("ext1"), attr("ext1"));
        assert_eq!(p("1ab"), attr("1ab"));
    }

    #[test]
    fn errors_have_kinds_and_positions() {
        let kind = |s: &str| {
            parse(s)
                .map(|_| ())
                .map_err(|e| (e.kind().clone(), e.position()))
        };
        assert_eq!(
            kind("ABC("),
            Err((
                ParseErrorKind::UnexpectedEnd {
                    expected: "an expression"
                },
                4
            ))
        );
        assert_eq!(
            kind("x LIKE 123"),
            Err((ParseErrorKind::LikePatternNotString, 7))
        );
        assert_eq!(kind("a # b"), Err((ParseErrorKind::UnexpectedChar('#'), 2)));
        assert_eq!(
            kind("my_ext = 1"),
            Err((ParseErrorKind::InvalidIdentifier("my_ext".into()), 0))
        );
        assert_eq!(
            kind("f1(2)"),
            Err((ParseErrorKind::InvalidIdentifier("f1".into()), 0))
        );
        assert!(kind("a IN ()").is_err());
        assert!(kind("EXISTS 'a'").is_err());
        assert!(kind("1 2").is_err());
        assert!(kind("").is_err());
        assert!(kind("a NOT b").is_err());
        assert!(kind("TRUE(1)").is_err());
    }

    #[test]
    fn depth_is_bounded() {
        let deep = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
        assert_eq!(parse(&deep).unwrap_err().kind(), &ParseErrorKind::TooDeep);
        let long = vec!["1"; 10_000].join(" + ");
        assert_eq!(parse(&long).unwrap_err().kind(), &ParseErrorKind::TooDeep);
        let nots = format!("{}TRUE", "NOT ".repeat(10_000));
        assert_eq!(parse(&nots).unwrap_err().kind(), &ParseErrorKind::TooDeep);
        let ok = vec!["1"; MAX_DEPTH].join(" + ");
        assert!(parse(&ok).is_ok());
        // A chain of AND or OR is one level, however long.
        let chain = vec!["a = 1"; 10_000].join(" OR ");
        assert!(parse(&chain).is_ok());
    }
}
