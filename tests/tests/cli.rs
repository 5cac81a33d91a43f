//! The command line, run as a user would: validate, version, run on embedded defaults.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::process::Command;
use std::time::Duration;

use meshgate_tests::{binary, spawn};

#[test]
fn version_and_help() {
    let out = Command::new(binary()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "meshgate {} (features: amqp,mqtt,nats,websocket)",
            env!("CARGO_PKG_VERSION")
        )
    );
    let out = Command::new(binary()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["run", "validate", "defaults", "MESHGATE__"] {
        assert!(help.contains(word), "--help mentions {word}: {help}");
    }
}

#[test]
fn validate_reports_every_problem_with_its_key() {
    let dir = std::env::temp_dir().join(format!("meshgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[http]\nlisten = \"nowhere\"\nmax_body_size = 100\nbogus = 1\n\n[websocket]\nslow_consumer = \"sometimes\"\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["validate", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "http.listen",
        "http.max_body_size",
        "http.bogus",
        "websocket.slow_consumer",
    ] {
        assert!(err.contains(key), "stderr names {key}:\n{err}");
    }
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let out = Command::new(binary())
        .args(["validate", "-c"])
        .arg(examples.join("meshgate.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The Docker image's configuration: all interfaces, no anonymous access.
    let out = Command::new(binary())
        .args(["validate", "-c"])
        .arg(examples.join("docker.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(binary())
        .args(["run", "-c"])
        .arg(dir.join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_env_override_names_the_variable() {
    let out = Command::new(binary())
        .arg("run")
        .env("MESHGATE__HTTP__LISTNE", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MESHGATE__HTTP__LISTNE"));
}

/// `meshgate run` with no file: the README's first command. Needs ports 8080 and 9090.
#[tokio::test]
async fn run_on_embedded_defaults_says_where_it_listens() {
    for port in [8080, 9090] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is busy; this test checks the embedded defaults and needs it free"
        );
    }
    let mut gw = spawn(&[], &[]);
    let banner = gw.banner.join("\n");
    assert!(
        banner.contains("POST http://127.0.0.1:8080/events/{topic}"),
        "{banner}"
    );
    assert!(banner.contains("ws://127.0.0.1:8080/ws"), "{banner}");
    assert!(banner.contains("http://127.0.0.1:9090/"), "{banner}");
    let health = reqwest::get("http://127.0.0.1:9090/healthz").await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = reqwest::get("http://127.0.0.1:9090/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    let page = reqwest::get("http://127.0.0.1:8080/").await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/ws"));
    let r = reqwest::Client::new()
        .post("http://127.0.0.1:8080/events/demo/hello")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let metrics = reqwest::get("http://127.0.0.1:9090/metrics")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("meshgate_events_received_total{adapter=\"http\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("meshgate_publish_latency_seconds_bucket"));
    assert!(
        metrics.contains(&format!(
            "meshgate_build_info{{version=\"{}\",features=\"amqp,mqtt,nats,websocket\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
    // The process collector's metrics, with this process's figures.
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
    assert!(value("process_start_time_seconds") > 1.7e9);
    assert!(value("process_cpu_seconds_total") >= 0.0);
    gw.signal("INT");
    assert!(gw.wait_exit(Duration::from_secs(10)).success());
}

/// (soft, hard) `Max open files` of process `pid` ("self" for this one).
fn open_file_limits(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut numbers = line["Max open files".len()..]
        .split_whitespace()
        .map(|n| n.parse::<u64>().unwrap());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// Started with a soft open-file limit of 256 (as a service manager might), meshgate raises it
/// to the hard limit before it listens: every connection is a descriptor.
#[test]
fn the_open_file_soft_limit_is_raised_to_the_hard_limit() {
    let (_, hard) = open_file_limits("self");
    assert!(
        hard > 256,
        "this test needs a hard open-file limit above 256"
    );
    // `prlimit` sets the limits, then runs meshgate in its own process (same pid).
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile=256:{hard}"))
        .arg("--")
        .arg(binary())
        .arg("run")
        .env("MESHGATE__HTTP__LISTEN", "127.0.0.1:0")
        .env("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0")
        .env("MESHGATE__MQTT__LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) runs");
    let pid = child.id().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Until prlimit has exec'd meshgate, the limits read are prlimit's (or this process's).
    let comm = || std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    while comm().trim() != "meshgate" && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(comm().trim(), "meshgate", "prlimit ran meshgate");
    let mut seen = (0, 0);
    while std::time::Instant::now() < deadline {
        seen = open_file_limits(&pid);
        if seen.0 == hard {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen, (hard, hard), "soft limit raised to the hard one");
}

/// Anonymous access on a listener other machines can reach refuses to start (issue 22 item 6),
/// in `validate` and `run` alike, naming the listener and the ways out; the explicit switch
/// starts it.
#[test]
fn anonymous_access_on_a_public_address_needs_the_explicit_switch() {
    for command in ["validate", "run"] {
        let mut cmd = Command::new(binary());
        cmd.arg(command);
        if command == "validate" {
            cmd.args(["-c", "/dev/null"]);
        }
        let out = cmd
            .env("MESHGATE__HTTP__LISTEN", "0.0.0.0:0")
            .env("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{command}");
        let err = String::from_utf8_lossy(&out.stderr);
        for says in [
            "http.listen 0.0.0.0:0",
            "auth.anonymous.enabled = false",
            "auth.allow_anonymous_on_public = true",
        ] {
            assert!(err.contains(says), "{command}: {says}:\n{err}");
        }
    }
    let out = Command::new(binary())
        .args(["validate", "-c", "/dev/null"])
        .env("MESHGATE__HTTP__LISTEN", "0.0.0.0:0")
        .env("MESHGATE__AUTH__ALLOW_ANONYMOUS_ON_PUBLIC", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
