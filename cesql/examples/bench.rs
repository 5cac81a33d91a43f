//! CESQL evaluation speed: nanoseconds per evaluation of typical TCK expressions against a
//! `MapEvent`, and per parse + compile (done once per filter, not per event).
//!
//! ```text
//! cargo run --release -p meshgate-cesql --example bench [-- <milliseconds per expression>]
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use cesql::{Expression, MapEvent};

/// (what, expression); every one is evaluated against the same event.
const CASES: &[(&str, &str)] = &[
    ("exact", "id = 'myId'"),
    ("prefix LIKE", "source LIKE 'https://%'"),
    ("suffix LIKE", "type LIKE '%.error'"),
    ("LIKE with escapes", r"myext LIKE 'abc%123\%456\_d_f'"),
    ("cast =", "sequence = 5"),
    ("INT() <", "int(hop) < int(ttl) and int(hop) < 1000"),
    ("implicit cast <", "hop < ttl"),
    (
        "IN",
        "source IN (id, 'http://localhost/source', 'https://example.com')",
    ),
    ("EXISTS", "EXISTS subject AND NOT EXISTS time"),
    (
        "DNF",
        "(id = 'myId' AND type LIKE '%.success') OR (id = 'notmyId' AND source LIKE 'http://%' \
         AND type LIKE '%.warning')",
    ),
    (
        "CNF",
        "(id = 'myId' OR type LIKE '%.success') AND (id = 'notmyId' OR source LIKE 'https://%' \
         OR type LIKE '%.warning')",
    ),
    (
        "string functions",
        "LOWER(SUBSTRING(type, 1, 7)) = 'example'",
    ),
    ("CONCAT", "CONCAT(id, '/', subject) = 'myId/Francesco'"),
    ("arithmetic", "4 * 2 + 4 / 2"),
    ("missing attribute", "missing = 'x'"),
    ("division by zero", "5 / 0"),
];

fn event() -> MapEvent {
    MapEvent::new("myId", "https://example.com/a", "example.event.warning")
        .with("subject", "Francesco")
        .with("myext", "abc123123%456_dzf")
        .with("sequence", "5")
        .with("hop", "5")
        .with("ttl", "10")
}

/// Runs `f` for about `budget` and returns the nanoseconds per call.
fn per_call(budget: Duration, mut f: impl FnMut()) -> f64 {
    let mut batch: u64 = 1_000;
    let mut total = Duration::ZERO;
    let mut calls: u64 = 0;
    while total < budget {
        let start = Instant::now();
        for _ in 0..batch {
            f();
        }
        total += start.elapsed();
        calls += batch;
        batch = batch.saturating_mul(2).min(4_000_000);
    }
    total.as_nanos() as f64 / calls as f64
}

fn main() {
    let millis = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    let budget = Duration::from_millis(millis);
    let event = event();
    println!("CESQL, ns per call ({millis} ms per figure, MapEvent with 10 attributes)");
    println!(
        "{:<20} {:>10} {:>14} {:>8}  expression",
        "case", "evaluate", "parse+compile", "result"
    );
    let mut worst: f64 = 0.0;
    for (what, src) in CASES {
        let expr = match Expression::parse(src) {
            Ok(expr) => expr,
            Err(e) => {
                eprintln!("{what}: {e}");
                std::process::exit(1);
            }
        };
        // Warm up, then measure.
        per_call(Duration::from_millis(20), || {
            black_box(black_box(&expr).evaluate(black_box(&event)));
        });
        let eval_ns = per_call(budget, || {
            black_box(black_box(&expr).evaluate(black_box(&event)));
        });
        let compile_ns = per_call(budget / 3, || {
            black_box(Expression::parse(black_box(src)).is_ok());
        });
        let result = expr.evaluate(&event);
        let shown = if result.errors.is_empty() {
            result.value.to_string()
        } else {
            format!("{}+err", result.value)
        };
        worst = worst.max(eval_ns);
        println!("{what:<20} {eval_ns:>10.1} {compile_ns:>14.1} {shown:>8}  {src}");
    }
    println!("slowest evaluation: {worst:.1} ns");
}
