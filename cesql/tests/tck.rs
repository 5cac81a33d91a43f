//! Runs every case of the official CESQL TCK (`tck/*.yaml`, vendored from the CloudEvents spec
//! repository; format in `tck/README.md`): parse errors, values, and evaluation errors by kind.
//!
//! The YAML is read with yaml-rust2's event parser so that a scalar's style is known: plain
//! scalars follow the YAML 1.2 core schema (`true`, `True`, `TRUE` are Booleans, `-10` an
//! Integer), quoted ones are strings (`'true'`).

use std::path::{Path, PathBuf};

use cesql::{Expression, MapEvent, Value};
use yaml_rust2::Event as YamlEvent;
use yaml_rust2::parser::{EventReceiver, Parser};
use yaml_rust2::scanner::TScalarStyle;

#[derive(Debug, Clone)]
enum Yaml {
    Scalar { text: String, plain: bool },
    Seq(Vec<Yaml>),
    Map(Vec<(String, Yaml)>),
}

impl Yaml {
    fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn text(&self) -> &str {
        match self {
            Yaml::Scalar { text, .. } => text,
            other => panic!("scalar expected, found {other:?}"),
        }
    }

    /// The scalar as a CESQL value, by the YAML 1.2 core schema.
    fn value(&self) -> Value<'static> {
        let Yaml::Scalar { text, plain } = self else {
            panic!("scalar expected, found {self:?}");
        };
        if *plain {
            match text.as_str() {
                "true" | "True" | "TRUE" => return Value::Boolean(true),
                "false" | "False" | "FALSE" => return Value::Boolean(false),
                _ => {}
            }
            let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                let n: i32 = text.parse().expect("TCK integer fits 32 bits");
                return Value::Integer(n);
            }
        }
        Value::String(text.clone().into())
    }
}

enum Frame {
    Seq(Vec<Yaml>),
    Map(Vec<(String, Yaml)>, Option<String>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Yaml>,
}

impl Builder {
    fn add(&mut self, node: Yaml) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq(items)) => items.push(node),
            Some(Frame::Map(entries, key)) => match key.take() {
                None => *key = Some(node.text().to_owned()),
                Some(k) => entries.push((k, node)),
            },
        }
    }
}

impl EventReceiver for Builder {
    fn on_event(&mut self, ev: YamlEvent) {
        match ev {
            YamlEvent::Scalar(text, style, _, _) => self.add(Yaml::Scalar {
                text,
                plain: style == TScalarStyle::Plain,
            }),
            YamlEvent::SequenceStart(..) => self.stack.push(Frame::Seq(Vec::new())),
            YamlEvent::MappingStart(..) => self.stack.push(Frame::Map(Vec::new(), None)),
            YamlEvent::SequenceEnd | YamlEvent::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Seq(items)) => Yaml::Seq(items),
                    Some(Frame::Map(entries, _)) => Yaml::Map(entries),
                    None => panic!("unbalanced YAML events"),
                };
                self.add(node);
            }
            _ => {}
        }
    }
}

fn load(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).expect("read TCK file");
    let mut builder = Builder::default();
    Parser::new_from_str(&text)
        .load(&mut builder, false)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    builder.root.expect("a YAML document")
}

fn tck_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tck");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tck/ folder")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The event of a case: `event` as given, else a valid event with `eventOverrides` applied.
fn event_of(case: &Yaml) -> MapEvent {
    let mut event = match case.get("event") {
        Some(Yaml::Map(_)) => MapEvent::empty(),
        _ => MapEvent::new("myId", "localhost.localdomain", "myType"),
    };
    for key in ["event", "eventOverrides"] {
        if let Some(Yaml::Map(entries)) = case.get(key) {
            for (name, value) in entries {
                event.set(name, value.value());
            }
        }
    }
    event
}

/// Runs one case: `Err` says how it failed.
fn run_case(case: &Yaml) -> Result<(), String> {
    let source = case.get("expression").ok_or("no expression")?.text();
    let expected_error = case.get("error").map(|e| e.text().to_owned());
    let parsed = Expression::parse(source);
    if expected_error.as_deref() == Some("parse") {
        return match parsed {
            Err(_) => Ok(()),
            Ok(e) => Err(format!("parsed as {e}, expected a parse error")),
        };
    }
    let expr = parsed.map_err(|e| format!("{e}"))?;
    let event = event_of(case);
    let result = expr.evaluate(&event);
    if let Some(expected) = case.get("result").map(Yaml::value)
        && result.value != expected
    {
        return Err(format!(
            "value {:?}, expected {expected:?} (errors {:?})",
            result.value, result.errors
        ));
    }
    let kinds: Vec<&str> = result.errors.iter().map(|e| e.kind().tck_name()).collect();
    let want: Vec<&str> = expected_error.iter().map(String::as_str).collect();
    if kinds != want {
        return Err(format!("errors {:?}, expected {want:?}", result.errors));
    }
    // Filter semantics follow from the value and the errors.
    let passes = result.value == Value::Boolean(true) && result.errors.is_empty();
    if expr.matches(&event) != passes {
        return Err("matches() disagrees with evaluate()".into());
    }
    Ok(())
}

#[test]
fn every_tck_case_passes() {
    let files = tck_files();
    assert_eq!(files.len(), 18, "the TCK of commit c2845a4 has 18 files");
    let mut total = 0;
    let mut failures = Vec::new();
    for file in &files {
        let doc = load(file);
        let Some(Yaml::Seq(cases)) = doc.get("tests") else {
            panic!("{}: no tests", file.display());
        };
        for case in cases {
            total += 1;
            let name = case.get("name").map_or("?", Yaml::text);
            if let Err(why) = run_case(case) {
                let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
                failures.push(format!("{} / {name}: {why}", stem.unwrap_or_default()));
            }
        }
    }
    println!(
        "CESQL TCK: {} of {total} cases pass",
        total - failures.len()
    );
    assert!(total > 250, "only {total} cases read");
    assert!(
        failures.is_empty(),
        "TCK failures:\n{}",
        failures.join("\n")
    );
}
