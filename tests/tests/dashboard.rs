//! The Grafana dashboard in `examples/grafana/meshgate.json` (issue 25 item 4) uses only
//! metric names meshgate has, and shows every one of them: each name in its queries is in
//! `meshgate_core::metrics::NAMES` (histograms with `_bucket`/`_sum`/`_count`) or in the
//! `/metrics` text of a running gateway (the `process_*` names), and each of `NAMES` is used.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::collections::BTreeSet;

use meshgate_tests::{metrics, start_gateway, test_config};

/// The metric names in a PromQL expression: runs of `[a-z0-9_]` starting with `meshgate_` or
/// `process_`.
fn names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && (rest.starts_with("meshgate_") || rest.starts_with("process_")) {
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            names.push(rest[..end].to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

fn exprs(panels: &[serde_json::Value], out: &mut Vec<String>) {
    for panel in panels {
        if let Some(targets) = panel["targets"].as_array() {
            out.extend(
                targets
                    .iter()
                    .filter_map(|t| t["expr"].as_str().map(str::to_owned)),
            );
        }
        if let Some(inner) = panel["panels"].as_array() {
            exprs(inner, out);
        }
    }
}

#[tokio::test]
async fn the_dashboard_uses_the_metrics_meshgate_has_and_shows_them_all() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/grafana/meshgate.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    exprs(dashboard["panels"].as_array().unwrap(), &mut queries);
    assert!(queries.len() > 20, "only {} queries", queries.len());

    let gw = start_gateway(test_config()).await;
    let scraped = metrics(gw.admin_addr.unwrap()).await;
    let known: BTreeSet<&str> = meshgate_core::metrics::NAMES.iter().copied().collect();
    let mut used = BTreeSet::new();
    for expr in &queries {
        for name in names_in(expr) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| known.contains(b)))
                .unwrap_or(&name)
                .to_owned();
            let exported = scraped.lines().any(|l| {
                l.strip_prefix(base.as_str())
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            });
            assert!(
                known.contains(base.as_str()) || exported,
                "the dashboard queries `{name}`, which meshgate does not have: {expr}"
            );
            used.insert(base);
        }
    }
    for name in &known {
        assert!(used.contains(*name), "no panel shows {name}");
    }
    gw.shutdown().await;
}
