//! `meshgate ctl`: the admin API from the command line (docs/admin-api.md).
//!
//! Where the API is and its token come from the flags, else the environment
//! (`MESHGATE_ADMIN_URL`, `MESHGATE_ADMIN_TOKEN`), else the configuration file given with
//! `-c` (its `admin.listen`, `admin.tls_*` and `admin.api_token`, with the same
//! `MESHGATE__…` overrides as `meshgate run`), else the embedded defaults
//! (`http://127.0.0.1:9090`, no token). Lists print a table (`--json`: the API's JSON);
//! exit status 1 when the API refused (its problem detail on stderr), 2 for a bad invocation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value as Json;

/// How to reach the admin API.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The admin listener's URL, e.g. `http://127.0.0.1:9090` (env MESHGATE_ADMIN_URL).
    #[arg(long, value_name = "URL", global = true)]
    pub admin: Option<String>,
    /// The admin API token (env MESHGATE_ADMIN_TOKEN; else `admin.api_token` of -c).
    #[arg(long, value_name = "TOKEN", global = true)]
    pub token: Option<String>,
    /// The gateway's configuration file: the admin address and token are read from it.
    #[arg(short, long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// A PEM CA certificate to trust for an HTTPS admin listener.
    #[arg(long, value_name = "FILE", global = true)]
    pub cacert: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List live connections (MQTT, MQTT over WebSocket or TLS, CloudEvents WebSocket).
    Connections {
        /// Only this protocol: mqtt, mqtts, mqtt-ws or websocket.
        #[arg(long)]
        protocol: Option<String>,
        /// Only this user.
        #[arg(long)]
        user: Option<String>,
        /// Only this MQTT client id.
        #[arg(long)]
        client_id: Option<String>,
        /// Page length (1–1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Follow the pages to the end.
        #[arg(long)]
        all: bool,
    },
    /// Show one connection with its subscriptions.
    Connection { id: u64 },
    /// Close a connection (MQTT 5: DISCONNECT 0x98; WebSocket: close 1008).
    Disconnect { id: u64 },
    /// List the persistent MQTT sessions parked on this instance (client away).
    Sessions {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        all: bool,
    },
    /// Delete a persistent MQTT session (its client must not be connected).
    DeleteSession { client_id: String },
    /// List retained MQTT messages.
    Retained {
        /// An MQTT topic filter.
        #[arg(long, default_value = "#")]
        filter: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Delete the retained message of a topic.
    DeleteRetained { topic: String },
    /// List the AMQP bridge's sources and sinks with their state.
    AmqpLinks,
    /// List the backbone's subscriptions (NATS subscriptions, JetStream consumers, queues)
    /// with their state.
    BackboneSubscriptions {
        /// Page length (1–1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Follow the pages to the end.
        #[arg(long)]
        all: bool,
    },
    /// Re-read the configuration file (as SIGHUP does).
    Reload,
}

/// Runs `meshgate ctl`.
pub fn main(args: CtlArgs) -> ExitCode {
    let target = match Target::resolve(&args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("meshgate ctl: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshgate ctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&target, &args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("meshgate ctl: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Api(e)) => {
            eprintln!("meshgate ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Usage(String),
    Api(String),
}

/// The admin API's address, token and client.
struct Target {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

impl Target {
    fn resolve(args: &CtlArgs) -> Result<Target, String> {
        let config = match &args.config {
            Some(path) => Some(
                meshgate_config::load(Some(path), crate::reload::env_overrides()).map_err(
                    |errors| {
                        let first = errors
                            .0
                            .first()
                            .map(|e| format!("{}: {}", e.path, e.message))
                            .unwrap_or_default();
                        format!("invalid configuration {}: {first}", path.display())
                    },
                )?,
            ),
            None => None,
        };
        let url = args
            .admin
            .clone()
            .or_else(|| std::env::var("MESHGATE_ADMIN_URL").ok());
        let base = match (url, &config) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(c)) => {
                let scheme = if c.admin.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                // A wildcard listen address is reached on loopback.
                let addr = c.admin.listen;
                if addr.port() == 0 {
                    return Err(format!(
                        "admin.listen in {} has port 0 (chosen at start): give the address with --admin URL (the gateway prints it at start)",
                        args.config
                            .as_deref()
                            .map_or_else(String::new, |p| p.display().to_string())
                    ));
                }
                let host = match addr.ip() {
                    std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_owned(),
                    std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_owned(),
                    std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                    ip => ip.to_string(),
                };
                format!("{scheme}://{host}:{}", addr.port())
            }
            (None, None) => "http://127.0.0.1:9090".to_owned(),
        };
        let token = args
            .token
            .clone()
            .or_else(|| std::env::var("MESHGATE_ADMIN_TOKEN").ok())
            .or_else(|| config.as_ref().and_then(|c| c.admin.api_token.clone()));
        let mut client = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(path) = &args.cacert {
            let pem =
                std::fs::read(path).map_err(|e| format!("--cacert {}: {e}", path.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("--cacert {}: {e}", path.display()))?;
            client = client.add_root_certificate(cert);
        }
        let client = client
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        Ok(Target {
            base,
            token,
            client,
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> Result<Option<Json>, Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method, &url);
        if let Some(t) = &self.token {
            request = request.bearer_auth(t);
        }
        let response = request
            .send()
            .await
            .map_err(|e| Failure::Api(format!("{url}: {e}")))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| Failure::Api(format!("{url}: {e}")))?;
        if !status.is_success() {
            let detail = serde_json::from_str::<Json>(&text)
                .ok()
                .and_then(|p| p.get("detail").and_then(Json::as_str).map(str::to_owned))
                .unwrap_or(text);
            return Err(Failure::Api(format!(
                "{} {}: {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                detail.trim_end()
            )));
        }
        if text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Failure::Api(format!("{url}: the answer is not JSON: {e}")))
    }

    async fn get(&self, path: &str) -> Result<Json, Failure> {
        Ok(self
            .call(reqwest::Method::GET, path)
            .await?
            .unwrap_or(Json::Null))
    }

    /// Every page of a listing (`all`), or the first.
    async fn pages(&self, path: &str, all: bool) -> Result<Vec<Json>, Failure> {
        let mut items = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let url = match &after {
                Some(a) => format!("{path}{sep}after={}", encode(a)),
                None => path.to_owned(),
            };
            let page = self.get(&url).await?;
            if let Some(list) = page.get("items").and_then(Json::as_array) {
                items.extend(list.iter().cloned());
            }
            after = page.get("next").and_then(Json::as_str).map(str::to_owned);
            if !all || after.is_none() {
                return Ok(items);
            }
        }
    }
}

/// Percent-encodes a path segment or query value.
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

async fn run(target: &Target, args: &CtlArgs) -> Result<(), Failure> {
    let limit_ok = |n: usize| {
        if (1..=1000).contains(&n) {
            Ok(())
        } else {
            Err(Failure::Usage(format!("--limit {n}: 1 to 1000")))
        }
    };
    match &args.command {
        CtlCommand::Connections {
            protocol,
            user,
            client_id,
            limit,
            all,
        } => {
            limit_ok(*limit)?;
            let mut path = format!("/connections?limit={limit}");
            for (key, value) in [
                ("protocol", protocol),
                ("user", user),
                ("client_id", client_id),
            ] {
                if let Some(v) = value {
                    path.push_str(&format!("&{key}={}", encode(v)));
                }
            }
            let items = target.pages(&path, *all).await?;
            print_table(
                args.json,
                &items,
                &[
                    ("ID", "id"),
                    ("PROTOCOL", "protocol"),
                    ("VERSION", "version"),
                    ("USER", "user"),
                    ("CLIENT ID", "client_id"),
                    ("ADDRESS", "address"),
                    ("SUBS", "subscription_count"),
                    ("QUEUED", "queued"),
                    ("IN FLIGHT", "in_flight"),
                ],
            );
        }
        CtlCommand::Connection { id } => {
            print_json(&target.get(&format!("/connections/{id}")).await?);
        }
        CtlCommand::Disconnect { id } => {
            target
                .call(reqwest::Method::DELETE, &format!("/connections/{id}"))
                .await?;
            println!("connection {id}: closing");
        }
        CtlCommand::Sessions { limit, all } => {
            limit_ok(*limit)?;
            let items = target
                .pages(&format!("/sessions?limit={limit}"), *all)
                .await?;
            print_table(
                args.json,
                &items,
                &[
                    ("CLIENT ID", "client_id"),
                    ("USER", "user"),
                    ("SUBS", "subscriptions"),
                    ("PARKED AT (ms)", "parked_at_ms"),
                    ("EXPIRES AT (ms)", "expires_at_ms"),
                ],
            );
        }
        CtlCommand::DeleteSession { client_id } => {
            target
                // As a query parameter: a path segment `.` or `..` would be normalised away.
                .call(
                    reqwest::Method::DELETE,
                    &format!("/sessions?client_id={}", encode(client_id)),
                )
                .await?;
            println!("session of `{client_id}`: deleted");
        }
        CtlCommand::Retained { filter, limit } => {
            limit_ok(*limit)?;
            let page = target
                .get(&format!(
                    "/retained?filter={}&limit={limit}",
                    encode(filter)
                ))
                .await?;
            if args.json {
                print_json(&page);
            } else {
                for item in page
                    .get("items")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten()
                {
                    let topic = item.get("topic").and_then(Json::as_str).unwrap_or("");
                    let event = item.get("event").map(Json::to_string).unwrap_or_default();
                    println!("{topic}\t{event}");
                }
                if let Some(more) = page.get("more").and_then(Json::as_u64).filter(|&n| n > 0) {
                    eprintln!("({more} more match; narrow --filter or raise --limit)");
                }
            }
        }
        CtlCommand::DeleteRetained { topic } => {
            // As a query parameter: a `.` or `..` level in a path would be normalised away
            // (and another topic's message deleted).
            target
                .call(
                    reqwest::Method::DELETE,
                    &format!("/retained?topic={}", encode(topic)),
                )
                .await?;
            println!("retained message of `{topic}`: deleted");
        }
        CtlCommand::AmqpLinks => {
            let page = target.get("/amqp/links").await?;
            let items = page
                .get("items")
                .and_then(Json::as_array)
                .cloned()
                .unwrap_or_default();
            print_table(
                args.json,
                &items,
                &[
                    ("KIND", "kind"),
                    ("NAME", "name"),
                    ("STATE", "state"),
                    ("RECONNECTS", "reconnects"),
                    ("LAST ERROR", "last_error"),
                ],
            );
        }
        CtlCommand::BackboneSubscriptions { limit, all } => {
            limit_ok(*limit)?;
            let mut items = target
                .pages(&format!("/backbone/subscriptions?limit={limit}"), *all)
                .await?;
            if !args.json {
                // The subjects or consumers in one column, comma-separated.
                for item in &mut items {
                    let Some(names) = item.get("names").and_then(Json::as_array) else {
                        continue;
                    };
                    let joined: Vec<&str> = names.iter().filter_map(Json::as_str).collect();
                    let joined = joined.join(",");
                    item["names"] = if joined.is_empty() {
                        Json::Null
                    } else {
                        Json::String(joined)
                    };
                }
            }
            print_table(
                args.json,
                &items,
                &[
                    ("FILTER", "filter"),
                    ("GROUP", "group"),
                    ("KIND", "kind"),
                    ("SUBSCRIBERS", "subscribers"),
                    ("QUEUED", "queued"),
                    ("CAPACITY", "capacity"),
                    ("STATE", "state"),
                    ("NAMES", "names"),
                ],
            );
        }
        CtlCommand::Reload => {
            let answer = target.call(reqwest::Method::POST, "/reload").await?;
            match answer {
                Some(j) if args.json => print_json(&j),
                Some(j) => {
                    let changed: Vec<String> = j
                        .get("changed")
                        .and_then(Json::as_array)
                        .into_iter()
                        .flatten()
                        .map(|c| c.as_str().map_or_else(|| c.to_string(), str::to_owned))
                        .collect();
                    if changed.is_empty() {
                        println!("reloaded: nothing changed");
                    } else {
                        println!("reloaded: {}", changed.join(", "));
                    }
                }
                None => println!("reloaded"),
            }
        }
    }
    Ok(())
}

fn print_json(j: &Json) {
    println!(
        "{}",
        serde_json::to_string_pretty(j).unwrap_or_else(|_| j.to_string())
    );
}

/// Columns `(heading, field)`; a missing field prints `-`.
fn print_table(json: bool, items: &[Json], columns: &[(&str, &str)]) {
    if json {
        print_json(&Json::Array(items.to_vec()));
        return;
    }
    let cell = |item: &Json, field: &str| match item.get(field) {
        None | Some(Json::Null) => "-".to_owned(),
        Some(Json::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| columns.iter().map(|(_, f)| cell(i, f)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(c, (h, _))| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (c, (text, w)) in cells.iter().zip(&widths).enumerate() {
            if c + 1 == cells.len() {
                out.push_str(text);
            } else {
                out.push_str(&format!("{text:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(columns.iter().map(|(h, _)| (*h).to_owned()).collect());
    for r in rows {
        line(r);
    }
}
