//! Triggers: HTTP ingress → memory backbone → trigger → HTTP subscriber, against the same
//! load generator POSTing straight to the subscriber.
//!
//! Everything runs in this process on loopback (gateway, load generator and subscriber share
//! the machine's cores). The subscriber ("sink") is a small axum server that answers 200 and
//! counts; the load generator is `C` reqwest clients (one keep-alive connection each) POSTing
//! 256-byte binary-mode CloudEvents in a closed loop (each waits for its answer).
//!
//! Sections (all by default; `--only a,b` picks some; `memory` runs first, before the others
//! raise the process's RSS high-water mark):
//! - `raw`: the generator POSTs straight to the sink: the ceiling of this machine.
//! - `one`: the generator POSTs to the gateway's ingress; one trigger (`#`, an `exact` type
//!   filter that matches, `maxConcurrency` 64) delivers to the sink.
//! - `many`: the same with `--triggers` (10,000) more triggers whose filters never match.
//! - `latency`: events paced at `--rate` per second for `--latency-secs`, the send time in a
//!   `sentns` extension: sink arrival minus send, by the trigger path and by the raw path.
//! - `memory`: a trigger whose subscriber accepts connections and never answers, with
//!   `delivery.maxPendingBytes` 1 MiB; `--events` events published; RSS and the trigger's gauges.
//!
//! CESQL evaluation speed is measured by `cargo run --release -p meshgate-cesql --example bench`.
//!
//! Usage: `ulimit -n 20000; cargo run --release -p meshgate-bench --bin triggers --
//! [--duration 10] [--concurrency 32] [--triggers 10000] [--rate 1000] [--latency-secs 10]
//! [--events 50000] [--only raw,one,many,latency,memory]`

/// The meshgate binary's allocator (gateway/src/main.rs, decision 0021), so that the gateway in
/// this process runs as it does in production (glibc malloc was a quarter of the profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use meshgate_bench::{process_cpu, rss_kib};

/// The CloudEvent type the one delivering trigger matches.
const MATCH_TYPE: &str = "com.example.match";
/// Size of each event's data.
const PAYLOAD: usize = 256;
/// What every section's trigger path publishes to.
const TOPIC: &str = "bench/t";

/// The clock of `sentns`: nanoseconds since the first call, the same for every task.
fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------------------------
// Command line

struct Args {
    duration: u64,
    concurrency: usize,
    triggers: usize,
    rate: u64,
    latency_secs: u64,
    events: u64,
    only: Option<Vec<String>>,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let mut a = Args {
            duration: 10,
            concurrency: 32,
            triggers: 10_000,
            rate: 1_000,
            latency_secs: 10,
            events: 50_000,
            only: None,
        };
        let mut it = argv.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| anyhow::anyhow!("{flag}: a value is missing"))
            };
            match flag.as_str() {
                "--duration" => a.duration = value()?.parse()?,
                "--concurrency" => a.concurrency = value()?.parse()?,
                "--triggers" => a.triggers = value()?.parse()?,
                "--rate" => a.rate = value()?.parse()?,
                "--latency-secs" => a.latency_secs = value()?.parse()?,
                "--events" => a.events = value()?.parse()?,
                "--only" => {
                    a.only = Some(value()?.split(',').map(str::to_owned).collect());
                }
                "-h" | "--help" => {
                    println!(
                        "usage: triggers [--duration S] [--concurrency C] [--triggers N] \
                         [--rate R] [--latency-secs S] [--events N] \
                         [--only raw,one,many,latency,memory]"
                    );
                    std::process::exit(0);
                }
                other => anyhow::bail!("unknown argument {other} (--help)"),
            }
        }
        anyhow::ensure!(
            a.duration > 0 && a.concurrency > 0 && a.rate > 0 && a.latency_secs > 0,
            "--duration, --concurrency, --rate and --latency-secs must be positive"
        );
        if let Some(only) = &a.only {
            for s in only {
                anyhow::ensure!(
                    ["raw", "one", "many", "latency", "memory"].contains(&s.as_str()),
                    "--only {s}: expected raw, one, many, latency or memory"
                );
            }
        }
        Ok(a)
    }

    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == section))
    }
}

// ---------------------------------------------------------------------------------------------
// The subscriber

/// What the sink saw.
#[derive(Default)]
struct SinkState {
    received: AtomicU64,
    /// Record `(sent, latency)` in nanoseconds for events carrying `ce-sentns`.
    record: AtomicBool,
    samples: Mutex<Vec<(u64, u64)>>,
}

async fn sink_handler(
    State(s): State<Arc<SinkState>>,
    headers: HeaderMap,
    _body: Bytes,
) -> StatusCode {
    let now = now_ns();
    s.received.fetch_add(1, Ordering::Relaxed);
    if s.record.load(Ordering::Relaxed)
        && let Some(sent) = headers
            .get("ce-sentns")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        && let Ok(mut v) = s.samples.lock()
    {
        v.push((sent, now.saturating_sub(sent)));
    }
    StatusCode::OK
}

/// The sink on a loopback port: its URL and what it counts.
async fn start_sink() -> anyhow::Result<(String, Arc<SinkState>)> {
    let state = Arc::new(SinkState::default());
    let app = axum::Router::new()
        .route("/sink", axum::routing::post(sink_handler))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("sink stopped: {e}");
        }
    });
    Ok((format!("http://{addr}/sink"), state))
}

/// A subscriber that accepts connections, reads nothing and never answers.
async fn start_dead_subscriber() -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    Ok((format!("http://{addr}/dead"), task))
}

// ---------------------------------------------------------------------------------------------
// The load generator

/// Counts of a generator run.
#[derive(Default)]
struct Counts {
    /// 2xx answers.
    accepted: AtomicU64,
    /// Other answers and transport errors.
    refused: AtomicU64,
}

/// One binary-mode CloudEvent POST: type `ty`, the send time in `ce-sentns`.
fn post(
    client: &reqwest::Client,
    url: &str,
    id: &str,
    ty: &str,
    data: &Bytes,
) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/bench")
        .header("ce-type", ty)
        .header("ce-sentns", now_ns().to_string())
        .header("content-type", "text/plain")
        .body(data.clone())
}

/// `concurrency` closed-loop publishers (one client, one keep-alive connection each) POSTing to
/// `url` until `stop`, or until `limit` events were sent by all of them together.
fn generator(
    url: &str,
    concurrency: usize,
    stop: &Arc<AtomicBool>,
    counts: &Arc<Counts>,
    limit: Option<u64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let data = Bytes::from(vec![b'x'; PAYLOAD]);
    let issued = Arc::new(AtomicU64::new(0));
    (0..concurrency)
        .map(|p| {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .tcp_nodelay(true)
                .build()
                .unwrap_or_default();
            let (url, stop, counts, data, issued) = (
                url.to_owned(),
                stop.clone(),
                counts.clone(),
                data.clone(),
                issued.clone(),
            );
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if limit.is_some_and(|l| issued.fetch_add(1, Ordering::Relaxed) >= l) {
                        break;
                    }
                    let r = post(&client, &url, &format!("{p}-{i}"), MATCH_TYPE, &data)
                        .send()
                        .await;
                    match r {
                        Ok(resp) if resp.status().is_success() => {
                            counts.accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            counts.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect()
}

/// One throughput measurement.
struct Rates {
    /// 2xx answers to the generator per second (over the measured window).
    accepted: f64,
    /// Events the sink received per second (same window).
    received: f64,
    /// Process CPU (all threads: generator, gateway, sink) per event received, µs.
    cpu_us_per_event: f64,
    /// Non-2xx answers or errors over the whole run.
    refused: u64,
    /// Accepted but not received once the run settled (whole run).
    undelivered: u64,
}

/// Runs the generator against `url` for a 1 s warm-up then `seconds` measured.
async fn throughput(
    url: &str,
    sink: &SinkState,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<Rates> {
    let received_before = sink.received.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let tasks = generator(url, concurrency, &stop, &counts, None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = std::process::id();
    let (a0, r0, c0, t0) = (
        counts.accepted.load(Ordering::Relaxed),
        sink.received.load(Ordering::Relaxed),
        process_cpu(pid),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (a1, r1, c1, secs) = (
        counts.accepted.load(Ordering::Relaxed),
        sink.received.load(Ordering::Relaxed),
        process_cpu(pid),
        t0.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let accepted = counts.accepted.load(Ordering::Relaxed);
    // The tail still on its way through the triggers.
    let got = || sink.received.load(Ordering::Relaxed) - received_before;
    let mut last = u64::MAX;
    while got() < accepted && got() != last {
        last = got();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(Rates {
        accepted: (a1 - a0) as f64 / secs,
        received: (r1 - r0) as f64 / secs,
        cpu_us_per_event: (c1 - c0).as_micros() as f64 / (r1 - r0).max(1) as f64,
        refused: counts.refused.load(Ordering::Relaxed),
        undelivered: accepted.saturating_sub(got()),
    })
}

/// Latency samples (ns) of events paced at `rate`/s for `seconds` (plus 1 s of warm-up not
/// recorded), POSTed to `url` one task each (so a slow answer does not hold the pace back).
async fn paced_latency(
    url: &str,
    sink: &SinkState,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(Vec<u64>, u64)> {
    if let Ok(mut v) = sink.samples.lock() {
        v.clear();
    }
    sink.record.store(true, Ordering::Relaxed);
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap_or_default();
    let data = Bytes::from(vec![b'x'; PAYLOAD]);
    let refused = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let warm_until = now_ns() + 1_000_000_000;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..rate * (seconds + 1) {
        tick.tick().await;
        let req = post(&client, url, &format!("lat-{i}"), MATCH_TYPE, &data);
        let refused = refused.clone();
        tasks.spawn(async move {
            if !matches!(req.send().await, Ok(r) if r.status().is_success()) {
                refused.fetch_add(1, Ordering::Relaxed);
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_millis(500)).await;
    sink.record.store(false, Ordering::Relaxed);
    let samples = sink
        .samples
        .lock()
        .map(|v| {
            v.iter()
                .filter(|(sent, _)| *sent >= warm_until)
                .map(|(_, lat)| *lat)
                .collect()
        })
        .unwrap_or_default();
    Ok((samples, refused.load(Ordering::Relaxed)))
}

/// p50, p99, max (µs, fractional) of nanosecond samples.
fn summary(mut v: Vec<u64>) -> (f64, f64, f64, usize) {
    v.sort_unstable();
    let at = |p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |n| *n as f64 / 1000.0)
    };
    (at(0.50), at(0.99), at(1.0), v.len())
}

// ---------------------------------------------------------------------------------------------
// The gateway

fn trigger(doc: serde_json::Value) -> anyhow::Result<meshgate_config::TriggerConfig> {
    meshgate_config::parse_trigger(None, &doc).map_err(|p| anyhow::anyhow!("trigger {doc}: {p:?}"))
}

/// The delivering trigger: everything, filtered on the type, to the sink.
fn matching_trigger(sink: &str) -> anyhow::Result<meshgate_config::TriggerConfig> {
    trigger(serde_json::json!({
        "name": "match",
        "topic": "#",
        "filters": [{"exact": {"type": MATCH_TYPE}}],
        "subscriber": {"uri": sink, "maxConcurrency": 64},
        "delivery": {"retry": 0, "timeout": "PT5S"},
    }))
}

/// A gateway in this process: web listener on a loopback port, admin off, memory backbone.
async fn start_gateway(
    triggers: Vec<meshgate_config::TriggerConfig>,
) -> anyhow::Result<(meshgate::RunningGateway, String)> {
    let mut config = meshgate_config::Config::default();
    config.http.listen = "127.0.0.1:0".parse::<SocketAddr>()?;
    config.http.max_in_flight = 4096;
    config.admin.enabled = false;
    config.gateway.shutdown_grace = Duration::from_secs(1);
    config.triggers = triggers;
    let gateway = meshgate::start(config).await?;
    let addr = gateway
        .web_addr
        .ok_or_else(|| anyhow::anyhow!("no web listener"))?;
    Ok((gateway, format!("http://{addr}/events/{TOPIC}")))
}

/// The value of the first sample of `name` whose labels contain `labels` in the registry's
/// text rendering.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
                && labels.iter().all(|lb| l.contains(lb))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------------

fn rate_row(what: &str, r: &Rates, ratio: &str) {
    println!(
        "| {what} | {:.0} | {:.0} | {ratio} | {:.0} | {} | {} |",
        r.accepted, r.received, r.cpu_us_per_event, r.refused, r.undelivered
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let _ = now_ns();
    let (sink_url, sink) = start_sink().await?;
    println!(
        "meshgate triggers benchmark: HTTP POST (256 B, binary mode) -> memory backbone -> trigger -> HTTP subscriber"
    );
    println!(
        "{} s measured per row (after 1 s of warm-up), {} closed-loop keep-alive publishers, \
         gateway, generator and subscriber in one process on loopback ({} CPUs)\n",
        args.duration,
        args.concurrency,
        std::thread::available_parallelism().map_or(0, usize::from)
    );

    // 5: memory with a dead subscriber, first: the other sections leave the allocator's
    // high-water mark behind, which would hide what this one adds.
    if args.wants("memory") {
        let (dead_url, dead) = start_dead_subscriber().await?;
        const MAX_PENDING: u64 = 1 << 20;
        let t = trigger(serde_json::json!({
            "name": "dead",
            "topic": "#",
            "subscriber": {"uri": dead_url},
            "delivery": {"retry": 0, "timeout": "PT30S", "maxPendingBytes": MAX_PENDING},
        }))?;
        let max_concurrency = t.subscriber.max_concurrency;
        let (gateway, ingress) = start_gateway(vec![t]).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pid = std::process::id();
        let rss_before = rss_kib(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let started = Instant::now();
        for task in generator(
            &ingress,
            args.concurrency,
            &stop,
            &counts,
            Some(args.events),
        ) {
            task.await?;
        }
        let secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_after = rss_kib(pid);
        let text = gateway.registry.render();
        let get = |name: &str, labels: &[&str]| {
            let mut l = vec!["trigger=\"dead\""];
            l.extend_from_slice(labels);
            metric(&text, name, &l).unwrap_or(f64::NAN)
        };
        let pending = get("meshgate_trigger_pending_bytes", &[]);
        let in_flight = get("meshgate_trigger_in_flight", &[]);
        let overflow = get("meshgate_trigger_events_total", &["outcome=\"overflow\""]);
        let accepted = counts.accepted.load(Ordering::Relaxed);
        println!(
            "Dead subscriber (accepts, never answers; timeout PT30S, maxPendingBytes {MAX_PENDING}, \
             maxConcurrency {max_concurrency}): {} events published in {secs:.1} s \
             ({accepted} accepted, {} refused)",
            args.events,
            counts.refused.load(Ordering::Relaxed),
        );
        println!("\n| figure | value |");
        println!("|---|---:|");
        println!("| process RSS before | {} KiB |", rss_before);
        println!("| process RSS after | {} KiB |", rss_after);
        println!(
            "| RSS growth | {} KiB |",
            rss_after as i64 - rss_before as i64
        );
        println!("| meshgate_trigger_pending_bytes | {pending:.0} |");
        println!("| meshgate_trigger_in_flight | {in_flight:.0} |");
        println!("| meshgate_trigger_events_total{{outcome=\"overflow\"}} | {overflow:.0} |");
        let held = accepted as f64 - overflow;
        println!("| queued + in flight (accepted - overflow) | {held:.0} |");
        println!(
            "| pending bytes counted per queued event | {:.0} |",
            pending / (held - in_flight).max(1.0)
        );
        println!(
            "\nbound: events held for the trigger = what fits in maxPendingBytes ({MAX_PENDING} B, \
             counted as the event's JSON size bound + 64 B) + {max_concurrency} in flight \
             (maxConcurrency); the rest is dropped and counted as overflow\n"
        );
        gateway.shutdown().await;
        dead.abort();
    }
    // 1-3: throughput.
    let mut raw = None;
    let mut one = None;
    if args.wants("raw") || args.wants("one") || args.wants("many") {
        println!(
            "| path | accepted/s | received by the subscriber/s | vs raw | CPU µs/event (process) | refused | undelivered |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
    }
    if args.wants("raw") {
        let r = throughput(&sink_url, &sink, args.concurrency, args.duration).await?;
        rate_row("raw: generator -> subscriber", &r, "100%");
        raw = Some(r.received);
    }
    let vs_raw = |rate: f64| {
        raw.map_or_else(
            || "-".to_owned(),
            |raw| format!("{:.0}%", 100.0 * rate / raw),
        )
    };
    if args.wants("one") {
        let (gateway, ingress) = start_gateway(vec![matching_trigger(&sink_url)?]).await?;
        let r = throughput(&ingress, &sink, args.concurrency, args.duration).await?;
        gateway.shutdown().await;
        rate_row("1 trigger", &r, &vs_raw(r.received));
        one = Some(r);
    }
    let mut many_note = None;
    if args.wants("many") {
        let mut triggers = Vec::with_capacity(args.triggers + 1);
        for i in 0..args.triggers {
            triggers.push(trigger(serde_json::json!({
                "name": format!("nomatch-{i}"),
                "topic": "#",
                "filters": [{"exact": {"type": format!("com.example.other.{i}")}}],
                "subscriber": {"uri": format!("{sink_url}?t={i}")},
                "delivery": {"retry": 0, "timeout": "PT5S"},
            }))?);
        }
        triggers.push(matching_trigger(&sink_url)?);
        let rss0 = rss_kib(std::process::id());
        let started = Instant::now();
        let (gateway, ingress) = start_gateway(triggers).await?;
        let start_secs = started.elapsed().as_secs_f64();
        let rss1 = rss_kib(std::process::id());
        let r = throughput(&ingress, &sink, args.concurrency, args.duration).await?;
        let text = gateway.registry.render();
        let filtered = metric(
            &text,
            "meshgate_trigger_events_total",
            &["trigger=\"nomatch-0\"", "outcome=\"filtered\""],
        )
        .unwrap_or(0.0);
        let dropped: f64 = text
            .lines()
            .filter(|l| l.starts_with("meshgate_backbone_dropped_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let stopping = Instant::now();
        gateway.shutdown().await;
        let stop_secs = stopping.elapsed().as_secs_f64();
        rate_row(
            &format!("{} non-matching + 1 matching trigger", args.triggers),
            &r,
            &vs_raw(r.received),
        );
        many_note = Some(format!(
            "{} triggers: start {start_secs:.1} s, shutdown {stop_secs:.1} s, RSS +{} MiB at start; \
             events filtered by nomatch-0: {filtered:.0}; backbone drops: {dropped:.0}",
            args.triggers + 1,
            rss1.saturating_sub(rss0) / 1024,
        ));
        if let Some(one) = &one {
            let by_rate = one.received / r.received.max(f64::MIN_POSITIVE);
            let by_cpu = r.cpu_us_per_event / one.cpu_us_per_event.max(f64::MIN_POSITIVE);
            many_note = many_note.map(|n| {
                format!(
                    "{n}\nper-event cost vs 1 trigger: {by_rate:.1}x by throughput, {by_cpu:.1}x by CPU/event (target <= 2x)"
                )
            });
        }
    }
    if let Some(one) = &one
        && let Some(raw) = raw
    {
        println!(
            "\n1 trigger delivers {:.0}% of the raw ceiling (target >= 60%)",
            100.0 * one.received / raw
        );
    }
    if let Some(n) = many_note {
        println!("{n}");
    }

    // 4: latency.
    if args.wants("latency") {
        println!(
            "\nLatency: {} events/s paced for {} s (after 1 s of warm-up), one task per POST; \
             subscriber arrival minus the publisher's send time",
            args.rate, args.latency_secs
        );
        let (raw_lat, raw_refused) =
            paced_latency(&sink_url, &sink, args.rate, args.latency_secs).await?;
        let (gateway, ingress) = start_gateway(vec![matching_trigger(&sink_url)?]).await?;
        let (trig_lat, trig_refused) =
            paced_latency(&ingress, &sink, args.rate, args.latency_secs).await?;
        gateway.shutdown().await;
        let raw_s = summary(raw_lat);
        let trig_s = summary(trig_lat);
        println!("\n| path | samples | refused | p50 µs | p99 µs | max µs |");
        println!("|---|---:|---:|---:|---:|---:|");
        println!(
            "| raw: generator -> subscriber | {} | {raw_refused} | {:.0} | {:.0} | {:.0} |",
            raw_s.3, raw_s.0, raw_s.1, raw_s.2
        );
        println!(
            "| 1 trigger | {} | {trig_refused} | {:.0} | {:.0} | {:.0} |",
            trig_s.3, trig_s.0, trig_s.1, trig_s.2
        );
        println!(
            "| added by the gateway (trigger - raw) | | | {:.0} | {:.0} | - |",
            trig_s.0 - raw_s.0,
            trig_s.1 - raw_s.1,
        );
        println!(
            "\nadded p99 {:.2} ms (target < 2 ms)",
            (trig_s.1 - raw_s.1) / 1000.0
        );
    }

    Ok(())
}
