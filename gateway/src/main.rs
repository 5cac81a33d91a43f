//! `meshgate`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::LazyLock;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc malloc: per-thread heaps without the arena lock contention seen
/// in profiles (docs/ARCHITECTURE.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use meshgate_config::Config;

/// `--version`: the version and the compiled Cargo features, since a build may leave adapters
/// and backbones out (gateway/src/features.rs).
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (features: {})",
        env!("CARGO_PKG_VERSION"),
        meshgate::features::compiled()
    )
});

#[derive(Debug, Parser)]
#[command(
    name = "meshgate",
    version = VERSION.as_str(),
    about = "A protocol gateway: HTTP, WebSocket and MQTT clients (and RabbitMQ through the AMQP bridge) exchange CloudEvents over one backbone (memory, NATS or JetStream).",
    long_about = "A protocol gateway: HTTP, WebSocket and MQTT clients (and RabbitMQ through the AMQP bridge) exchange CloudEvents over one backbone: \
        in memory (one process), NATS or JetStream (several instances sharing one bus; JetStream durable).\n\n\
        Configuration: embedded defaults < the TOML file given with -c < MESHGATE__SECTION__KEY \
        environment variables (e.g. MESHGATE__HTTP__LISTEN=0.0.0.0:8080)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (without -c: embedded defaults, memory backbone, HTTP+WebSocket on
    /// 127.0.0.1:8080, admin on 127.0.0.1:9090). SIGHUP re-reads the -c file: [auth],
    /// [[triggers]], the AMQP sources and sinks, the connection caps, the limits of [http],
    /// [websocket] and [mqtt] and the TLS certificates change in place, any other change is
    /// refused until a restart; SIGTERM/SIGINT stop gracefully.
    Run {
        /// TOML configuration file.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and report every problem; exits 2 if there is any.
    Validate {
        /// TOML configuration file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Ask a running gateway through its admin API: connections, sessions, retained messages,
    /// AMQP links, reload (needs admin.api_token; see docs/admin-api.md).
    Ctl(meshgate::ctl::CtlArgs),
    /// Print the embedded default configuration (a starting point for a config file).
    Defaults,
    /// Read a password from standard input (its first line) and print its Argon2id hash, for
    /// `password = "..."` in `[[auth.users]]`. Example: `meshgate passwd < secret.txt`.
    Passwd {
        /// Memory cost in KiB (Argon2's m). The default is OWASP's minimum for Argon2id; each
        /// login of a user not yet verified since start costs this much memory and time.
        #[arg(long, value_name = "KIB", default_value_t = 19_456)]
        memory_kib: u32,
        /// Passes over the memory (Argon2's t).
        #[arg(long, value_name = "N", default_value_t = 2)]
        iterations: u32,
    },
}

/// `meshgate passwd`: the hash of the first line of stdin (without its line ending).
fn passwd(memory_kib: u32, iterations: u32) -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("meshgate passwd: cannot read the password from stdin: {e}");
        return ExitCode::from(2);
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        eprintln!("meshgate passwd: no password on stdin (give it as the first line)");
        return ExitCode::from(2);
    }
    match meshgate_core::auth::password::hash_password(password.as_bytes(), memory_kib, iterations)
    {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshgate passwd: {e} (--memory-kib at least 8, --iterations at least 1)");
            ExitCode::from(2)
        }
    }
}

fn env_overrides() -> Vec<(String, String)> {
    meshgate::reload::env_overrides()
}

/// The configuration, or exit code 2 after reporting every problem: the config's own, or (once
/// it is valid) the parts it enables that this build does not contain.
fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    let config = meshgate_config::load(path, env_overrides()).map_err(|errors| {
        eprintln!("meshgate: invalid configuration:");
        for e in &errors.0 {
            eprintln!("  {}: {}", e.path, e.message);
        }
        ExitCode::from(2)
    })?;
    meshgate::features::check(&config).map_err(|missing| {
        eprintln!("meshgate: invalid configuration for this build:");
        for m in &missing.0 {
            eprintln!("  {m}");
        }
        ExitCode::from(2)
    })?;
    let exposed = meshgate::web::anonymous_exposure(&config);
    if !exposed.is_empty() && !config.auth.allow_anonymous_on_public {
        eprintln!("meshgate: invalid configuration:");
        eprintln!(
            "  auth.allow_anonymous_on_public: {}",
            meshgate::StartError::AnonymousExposed(exposed.join(", "))
        );
        return Err(ExitCode::from(2));
    }
    Ok(config)
}

fn main() -> ExitCode {
    meshgate::huge_pages::disable_unless_asked();
    let cli = Cli::parse();
    match cli.command {
        Command::Passwd {
            memory_kib,
            iterations,
        } => passwd(memory_kib, iterations),
        Command::Ctl(args) => meshgate::ctl::main(args),
        Command::Defaults => {
            print!("{}", meshgate_config::DEFAULTS_TOML);
            ExitCode::SUCCESS
        }
        Command::Validate { config } => match load(Some(&config)) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config } => {
            let path = config.clone();
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = config.gateway.worker_threads {
                builder.worker_threads(n);
            }
            let runtime = match builder.enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("meshgate: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(run(config, path))
        }
    }
}

async fn run(config: Config, path: Option<PathBuf>) -> ExitCode {
    meshgate::logging::init(&config.log);
    let backbone_kind = format!("{:?}", config.backbone.kind).to_lowercase();
    let events_path = config.http.events_path.clone();
    // HTTPS/WSS when the listener has a certificate.
    let (web_http, web_ws) = if config.http.tls.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let admin_http = if config.admin.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let ws_path = config.websocket.path.clone();
    let mqtt_ws_path = config.mqtt.websocket_path.clone();
    let amqp = config.amqp.enabled.then(|| {
        format!(
            "amqp       {} vhost {} ({} sources, {} sinks)",
            config.amqp.url,
            config.amqp.vhost,
            config.amqp.sources.len(),
            config.amqp.sinks.len()
        )
    });
    let (http_on, ws_on, page_on) = (
        config.http.enabled,
        config.websocket.enabled,
        config.http.browser_page,
    );
    // Before anything is announced: a SIGINT/SIGTERM that follows the banner at once (a script,
    // a test) must find the handler in place, not the default action that ends the process
    // without a graceful shutdown.
    let mut signals = Signals::install();
    let gateway = match meshgate::start(config).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("meshgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The banner goes to stdout so that scripts (and tests) can read the bound addresses.
    println!(
        "meshgate {} instance {} backbone {}",
        env!("CARGO_PKG_VERSION"),
        gateway.instance,
        backbone_kind
    );
    if let Some(addr) = gateway.web_addr {
        if http_on {
            println!("http       POST {web_http}://{addr}{events_path}/{{topic}}");
        }
        if ws_on {
            println!("websocket  {web_ws}://{addr}{ws_path}");
        }
        if page_on {
            println!("browser    {web_http}://{addr}/");
        }
    }
    if let Some(addr) = gateway.mqtt_addr {
        println!("mqtt       mqtt://{addr}");
    }
    if let Some(addr) = gateway.mqtt_tls_addr {
        println!("mqtt-tls   mqtts://{addr}");
    }
    if gateway.mqtt_addr.is_some()
        && let (Some(web), Some(path)) = (gateway.web_addr, &mqtt_ws_path)
    {
        println!("mqtt-ws    {web_ws}://{web}{path}");
    }
    if let Some(line) = amqp {
        println!("{line}");
    }
    if let Some(addr) = gateway.admin_addr {
        println!("admin      {admin_http}://{addr}/healthz /readyz /metrics");
    }
    tracing::info!("meshgate started");
    if let Some(path) = path {
        gateway.reloader().set_source(path);
    }
    // SIGHUP reloads the configuration file (gateway/src/reload.rs); SIGTERM/SIGINT stop.
    while signals.wait().await == Wanted::Reload {
        let reloader = gateway.reloader();
        match reloader.reload().await {
            Ok(done) => {
                tracing::info!(changed = ?done.changed, "configuration reloaded (SIGHUP)")
            }
            Err(e) => tracing::warn!(error = %e, "configuration reload refused (SIGHUP)"),
        }
    }
    tracing::info!("shutting down");
    let report = gateway.shutdown().await;
    // The spans of the last events go out before the process ends (blocking: the SDK's
    // exporter thread is joined).
    let _ = tokio::task::spawn_blocking(|| {
        meshgate::tracing_export::finish(std::time::Duration::from_secs(5))
    })
    .await;
    if report.clean {
        tracing::info!("shutdown complete");
        ExitCode::SUCCESS
    } else {
        tracing::warn!("shutdown grace period exceeded");
        ExitCode::FAILURE
    }
}

/// The shutdown signals (SIGTERM, SIGINT), listened for from when this is made.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Stop,
    Reload,
}

impl Signals {
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
                hup: signal(SignalKind::hangup()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Waits for the next of them.
    async fn wait(&mut self) -> Wanted {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(&mut self.term) => Wanted::Stop,
                () = next(&mut self.int) => Wanted::Stop,
                () = next(&mut self.hup) => Wanted::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Wanted::Stop
        }
    }
}
