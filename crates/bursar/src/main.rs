//! The `bursar` command: a thin shell over the library crates.
//!
//! `serve` starts the gateway; `ledger verify` proves the ledger; `prices` lists or
//! imports price books; `config check` validates a configuration file; `tenants`,
//! `keys`, `plans` and `budgets` drive a running Bursar's admin API.

// A command-line tool's job is to print.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use bursar_client::{Client, Method};
use bursar_core::config::{Config, DEFAULT_CONFIG, DEFAULT_DATA_DIR, DEFAULT_LISTEN};
use bursar_core::pricebook::{PriceBook, TokenizerKind};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "bursar", version, about = "AI spend governance gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// The configuration file (default: the built-in demo configuration).
    #[arg(long, env = "BURSAR_CONFIG")]
    config: Option<PathBuf>,
    /// Where the embedded store lives (default: server.data_dir, else ./bursar-data).
    /// With --database-url: where this instance keeps its spool while the database is
    /// away.
    #[arg(long, env = "BURSAR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A PostgreSQL database (postgres://…) instead of the embedded store (default:
    /// server.database_url).
    #[arg(long, env = "BURSAR_DATABASE_URL")]
    database_url: Option<String>,
    /// Redis (redis://…) for rate limits shared by every instance (default:
    /// server.redis_url; without it each instance counts its own).
    #[arg(long, env = "BURSAR_REDIS_URL")]
    redis_url: Option<String>,
}

#[derive(Args, Clone)]
struct RemoteArgs {
    /// The running Bursar.
    #[arg(long, env = "BURSAR_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An admin key (platform or tenant admin).
    #[arg(long, env = "BURSAR_ADMIN_KEY")]
    admin_key: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Address to listen on (default: server.listen, else 127.0.0.1:8080).
        #[arg(long, env = "BURSAR_LISTEN")]
        listen: Option<String>,
        /// Apply pending database migrations before starting (PostgreSQL; without it a
        /// database that is behind is refused).
        #[arg(long, env = "BURSAR_MIGRATE")]
        migrate: bool,
        /// Threads that run requests (default: server.workers, else one per core).
        #[arg(long, env = "BURSAR_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
        workers: Option<u16>,
    },
    /// Apply pending migrations to the PostgreSQL database.
    Migrate {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Run the simulated LLM provider on its own, as an OpenAI- and Anthropic-compatible
    /// HTTP server (no key, no network): for demos, tests and benchmarks.
    Simulate {
        /// Address to listen on.
        #[arg(long, env = "BURSAR_SIM_LISTEN", default_value = "127.0.0.1:8090")]
        listen: String,
        /// Time before the first byte of every answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Output tokens of every answer (capped by the request's max_tokens).
        #[arg(long, default_value_t = 64)]
        completion_tokens: u32,
        /// Percent of requests that fail with --error-status.
        #[arg(long, default_value_t = 0)]
        error_rate_percent: u8,
        #[arg(long, default_value_t = 500)]
        error_status: u16,
        /// Output tokens per streamed chunk.
        #[arg(long, default_value_t = 4)]
        chunk_tokens: u32,
        /// Pause between streamed chunks, in milliseconds.
        #[arg(long, default_value_t = 0)]
        chunk_delay_ms: u64,
        /// Report this model instead of the one asked for (drift).
        #[arg(long)]
        report_model: Option<String>,
        /// Leave usage out of answers.
        #[arg(long)]
        omit_usage: bool,
    },
    /// Ledger tools.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Price book tools.
    Prices {
        #[command(subcommand)]
        command: PricesCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Tenants (admin API of a running Bursar).
    Tenants {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: TenantsCommand,
    },
    /// API keys (admin API of a running Bursar).
    Keys {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Plans (admin API of a running Bursar).
    Plans {
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Budgets (admin API of a running Bursar).
    Budgets {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: BudgetsCommand,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Recompute the hash chain and rebuild every counter from the entries; exit 1 on
    /// any difference, naming the entry.
    Verify {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum PricesCommand {
    /// List the models and metered APIs of the price book in use.
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Convert LiteLLM's model_prices_and_context_window.json into a Bursar price book.
    Import {
        /// The LiteLLM JSON file.
        file: PathBuf,
        /// Where to write the price book (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The date the imported prices take effect (default: today, UTC).
        #[arg(long)]
        effective: Option<chrono::NaiveDate>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a configuration file and name every problem.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print the built-in default configuration.
    Default,
}

#[derive(Subcommand)]
enum TenantsCommand {
    List,
    Create {
        id: String,
        #[arg(long)]
        plan: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        timezone: Option<String>,
        /// enforce, shadow or off
        #[arg(long)]
        mode: Option<String>,
    },
    /// Change a tenant's plan (platform admin only).
    SetPlan {
        id: String,
        plan: String,
    },
    /// Change a tenant's enforcement mode: enforce, shadow or off.
    SetMode {
        id: String,
        mode: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
        /// member or tenant_admin
        #[arg(long, default_value = "member")]
        kind: String,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        role: Option<String>,
        /// RFC 3339 time after which the key stops working.
        #[arg(long)]
        expires_at: Option<String>,
    },
    Revoke {
        #[arg(long)]
        tenant: String,
        id: String,
    },
}

#[derive(Subcommand)]
enum BudgetsCommand {
    List {
        #[arg(long)]
        tenant: String,
    },
    Show {
        #[arg(long)]
        tenant: String,
        id: String,
    },
    /// Create or replace a budget.
    Set {
        #[arg(long)]
        tenant: String,
        id: String,
        #[arg(long)]
        scope: String,
        #[arg(long)]
        value: Option<String>,
        #[arg(long)]
        window: String,
        /// USD, e.g. 100 or 0.50
        #[arg(long)]
        limit: String,
        #[arg(long)]
        warn_percent: Option<u8>,
        #[arg(long)]
        emergency_percent: Option<u8>,
        /// block, downgrade or alert_only
        #[arg(long)]
        emergency_action: Option<String>,
        #[arg(long)]
        rollover: bool,
    },
    Delete {
        #[arg(long)]
        tenant: String,
        id: String,
    },
}

/// mimalloc: faster than the system allocator on the request path, and it returns freed
/// memory to the system (the configuration parse of 100k keys would otherwise stay in RSS).
/// The `system-allocator` feature leaves it out, for heap profilers that trace `malloc`
/// (`bench/memory.sh --heaptrack`).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Loaded {
    config: Config,
    book: Arc<PriceBook>,
    store: bursar_store::Location,
}

fn load(args: &ConfigArgs) -> Result<Loaded> {
    let text = match &args.config {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => DEFAULT_CONFIG.to_string(),
    };
    // The price book must be known before the plans are checked against its classes.
    let raw: toml::Table = toml::from_str(&text).context("the configuration is not valid TOML")?;
    let book_path = raw
        .get("server")
        .and_then(|s| s.get("price_book"))
        .and_then(|p| p.as_str())
        .map(PathBuf::from);
    let book = match &book_path {
        Some(p) => {
            let t =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            PriceBook::from_toml(&t).with_context(|| format!("price book {}", p.display()))?
        }
        None => PriceBook::builtin().context("the built-in price book")?,
    };
    let mut config =
        Config::parse(&text, &book, chrono::Utc::now()).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(url) = &args.redis_url {
        config.server.redis_url = Some(url.clone());
    }
    // The command line and the environment win over the file; a data directory given
    // there wins over a database URL of the file.
    let url = match (&args.database_url, &args.data_dir) {
        (Some(url), _) => Some(url.clone()),
        (None, Some(_)) => None,
        (None, None) => config.server.database_url.clone(),
    };
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| config.server.data_dir.clone().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    config.server.data_dir = Some(data_dir.display().to_string());
    let store = match url {
        Some(url) => {
            anyhow::ensure!(
                url.starts_with("postgres://") || url.starts_with("postgresql://"),
                "the database URL must start with postgres:// (got `{}`)",
                bursar_store::postgres::redact(&url)
            );
            bursar_store::Location::Postgres(url)
        }
        None => bursar_store::Location::data_dir(&data_dir),
    };
    Ok(Loaded {
        config,
        book: Arc::new(book),
        store,
    })
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BURSAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// `loaded` is read before the runtime starts, which it may size (`server.workers`).
async fn serve(loaded: Loaded, listen: Option<String>, migrate: bool) -> Result<()> {
    init_logs();
    let addr = listen
        .or_else(|| loaded.config.server.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let (services, _writer) = bursar_server::build(
        loaded.config,
        loaded.book.clone(),
        &loaded.store,
        migrate,
        Arc::new(bursar_server::SystemClock),
    )
    .await
    .with_context(|| format!("opening the store {}", loaded.store.describe()))?;
    let expired = services.sweep().await.context("expiring overdue holds")?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(
        listen = %local,
        store = %loaded.store.describe(),
        price_book = loaded.book.version(),
        models = loaded.book.models().len(),
        keys = services.engine.key_count(),
        open_holds = services.engine.open_holds(),
        expired_on_start = expired,
        workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "bursar is ready"
    );
    bursar_server::spawn_sweeper(services.clone());
    bursar_server::serve(listener, services, shutdown_signal()).await?;
    Ok(())
}

async fn simulate(addr: &str, settings: bursar_core::providers::SimSettings) -> Result<()> {
    init_logs();
    // Its counts' tables are loaded before it listens, so no call waits for them.
    tokio::task::spawn_blocking(|| {
        for kind in [TokenizerKind::O200kBase, TokenizerKind::Cl100kBase] {
            bursar_core::tokens::load(kind);
        }
    })
    .await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    tracing::info!(listen = %listener.local_addr()?, ?settings, "simulated provider is ready");
    axum_serve(listener, bursar_server::sim::router(settings)).await
}

async fn axum_serve(listener: tokio::net::TcpListener, app: bursar_server::Router) -> Result<()> {
    bursar_server::serve_router(listener, app, shutdown_signal()).await?;
    Ok(())
}

async fn verify(config: ConfigArgs) -> Result<bool> {
    let loaded = load(&config)?;
    let v = bursar_store::verify(&loaded.store)
        .await
        .with_context(|| format!("reading {}", loaded.store.describe()))?;
    // What an instance kept while the store was away is not in the ledger yet.
    if let Some(dir) = &loaded.config.server.data_dir {
        for spool in bursar_store::spool::waiting(Path::new(dir)) {
            eprintln!(
                "note: {} holds entries kept while the store was away; they are not in the ledger until bursar starts on this data directory and lands them",
                spool.display()
            );
        }
        for journal in bursar_store::journal::waiting(Path::new(dir)) {
            eprintln!(
                "note: {} is the journal of a running bursar, or of one that was killed: what it holds lands when bursar starts on this data directory",
                journal.display()
            );
        }
    }
    if v.ok() {
        println!(
            "ledger OK: {} entries, hash chain intact, {} counters rebuilt and equal to the stored ones",
            v.entries, v.buckets
        );
        Ok(true)
    } else {
        println!(
            "ledger FAILED verification ({} problem(s)):",
            v.problems.len()
        );
        for p in &v.problems {
            println!("  - {p}");
        }
        Ok(false)
    }
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn remote(r: &RemoteArgs, method: Method, path: &str, body: Option<Value>) -> Result<()> {
    let c = Client::new(&r.url, &r.admin_key);
    let v: Value = c.call(method, path, body.as_ref()).await?;
    print_json(&v)
}

fn import_prices(
    file: &Path,
    out: Option<&Path>,
    effective: Option<chrono::NaiveDate>,
) -> Result<()> {
    let json =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let day = effective.unwrap_or_else(|| chrono::Utc::now().date_naive());
    let imported = bursar_core::litellm::import(&json, day, &file.display().to_string())?;
    // Refuse to write a book Bursar itself would not load.
    PriceBook::from_toml(&imported.toml).context("the imported price book does not load")?;
    match out {
        Some(p) => {
            std::fs::write(p, &imported.toml)
                .with_context(|| format!("writing {}", p.display()))?;
            println!(
                "imported {} models into {} ({} entries skipped)",
                imported.models,
                p.display(),
                imported.skipped.len()
            );
        }
        None => println!("{}", imported.toml),
    }
    Ok(())
}

async fn run(cli: Cli, serving: Option<Loaded>) -> Result<bool> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            migrate,
            ..
        } => {
            let loaded = match serving {
                Some(l) => l,
                None => load(&config)?,
            };
            serve(loaded, listen, migrate).await.map(|()| true)
        }
        Command::Migrate { config } => {
            let loaded = load(&config)?;
            anyhow::ensure!(
                matches!(loaded.store, bursar_store::Location::Postgres(_)),
                "`bursar migrate` is for PostgreSQL: give --database-url (the embedded store creates its schema itself)"
            );
            let n = bursar_store::migrate(&loaded.store)
                .await
                .with_context(|| format!("migrating {}", loaded.store.describe()))?;
            println!("{n} migration(s) applied to {}", loaded.store.describe());
            Ok(true)
        }
        Command::Simulate {
            listen,
            latency_ms,
            completion_tokens,
            error_rate_percent,
            error_status,
            chunk_tokens,
            chunk_delay_ms,
            report_model,
            omit_usage,
        } => {
            anyhow::ensure!(
                error_rate_percent <= 100,
                "--error-rate-percent must be 0 to 100"
            );
            anyhow::ensure!(
                (400..=599).contains(&error_status),
                "--error-status must be an HTTP error (400-599)"
            );
            anyhow::ensure!(chunk_tokens >= 1, "--chunk-tokens must be at least 1");
            let settings = bursar_core::providers::SimSettings {
                latency_ms,
                completion_tokens,
                error_rate_percent,
                error_status,
                chunk_tokens,
                chunk_delay_ms,
                report_model,
                omit_usage,
                ignore_max_tokens: false,
            };
            simulate(&listen, settings).await.map(|()| true)
        }
        Command::Ledger {
            command: LedgerCommand::Verify { config },
        } => verify(config).await,
        Command::Prices { command } => match command {
            PricesCommand::List { config } => {
                let loaded = load(&config)?;
                println!("price book {}", loaded.book.version());
                for m in loaded.book.models() {
                    let p = m.prices.last();
                    println!(
                        "{:<32} {:<11} {:<10} in {:>9} out {:>9} cached {:>9} /1M  ({})",
                        m.id,
                        m.provider,
                        m.class,
                        p.map(|p| p.input.to_string()).unwrap_or_default(),
                        p.map(|p| p.output.to_string()).unwrap_or_default(),
                        p.map(|p| p.cached_input.to_string()).unwrap_or_default(),
                        p.map(|p| p.effective.to_string()).unwrap_or_default(),
                    );
                }
                for a in loaded.book.apis() {
                    let p = a.prices.last();
                    println!(
                        "{:<32} {:<11} per {:<6} {:>9}",
                        a.id,
                        a.provider,
                        a.unit,
                        p.map(|p| p.per_call.to_string()).unwrap_or_default()
                    );
                }
                Ok(true)
            }
            PricesCommand::Import {
                file,
                out,
                effective,
            } => import_prices(&file, out.as_deref(), effective).map(|()| true),
        },
        Command::Config { command } => match command {
            ConfigCommand::Check { config } => {
                let loaded = load(&config)?;
                println!(
                    "configuration OK: {} plans, {} tenants, {} keys, {} budgets",
                    loaded.config.directory.plans.len(),
                    loaded.config.directory.tenants.len(),
                    loaded.config.keys.len(),
                    loaded.config.budgets.len()
                );
                Ok(true)
            }
            ConfigCommand::Default => {
                print!("{DEFAULT_CONFIG}");
                Ok(true)
            }
        },
        Command::Tenants { remote: r, command } => {
            match command {
                TenantsCommand::List => remote(&r, Method::GET, "/v1/admin/tenants", None).await?,
                TenantsCommand::Create {
                    id,
                    plan,
                    name,
                    timezone,
                    mode,
                } => {
                    let body = json!({"id": id, "plan": plan, "name": name, "timezone": timezone, "mode": mode});
                    remote(&r, Method::POST, "/v1/admin/tenants", Some(body)).await?
                }
                TenantsCommand::SetPlan { id, plan } => {
                    remote(
                        &r,
                        Method::PATCH,
                        &format!("/v1/admin/tenants/{id}"),
                        Some(json!({"plan": plan})),
                    )
                    .await?
                }
                TenantsCommand::SetMode { id, mode } => {
                    remote(
                        &r,
                        Method::PATCH,
                        &format!("/v1/admin/tenants/{id}"),
                        Some(json!({"mode": mode})),
                    )
                    .await?
                }
            }
            Ok(true)
        }
        Command::Keys { remote: r, command } => {
            match command {
                KeysCommand::List { tenant } => {
                    remote(
                        &r,
                        Method::GET,
                        &format!("/v1/admin/tenants/{tenant}/keys"),
                        None,
                    )
                    .await?
                }
                KeysCommand::Create {
                    tenant,
                    name,
                    kind,
                    user,
                    team,
                    role,
                    expires_at,
                } => {
                    let body = json!({"name": name, "kind": kind, "user": user, "team": team, "role": role, "expires_at": expires_at});
                    remote(
                        &r,
                        Method::POST,
                        &format!("/v1/admin/tenants/{tenant}/keys"),
                        Some(body),
                    )
                    .await?
                }
                KeysCommand::Revoke { tenant, id } => {
                    remote(
                        &r,
                        Method::POST,
                        &format!("/v1/admin/tenants/{tenant}/keys/{id}/revoke"),
                        None,
                    )
                    .await?
                }
            }
            Ok(true)
        }
        Command::Plans { remote: r } => {
            remote(&r, Method::GET, "/v1/admin/plans", None).await?;
            Ok(true)
        }
        Command::Budgets { remote: r, command } => {
            match command {
                BudgetsCommand::List { tenant } => {
                    remote(
                        &r,
                        Method::GET,
                        &format!("/v1/admin/tenants/{tenant}/budgets"),
                        None,
                    )
                    .await?
                }
                BudgetsCommand::Show { tenant, id } => {
                    remote(
                        &r,
                        Method::GET,
                        &format!("/v1/admin/tenants/{tenant}/budgets/{id}"),
                        None,
                    )
                    .await?
                }
                BudgetsCommand::Set {
                    tenant,
                    id,
                    scope,
                    value,
                    window,
                    limit,
                    warn_percent,
                    emergency_percent,
                    emergency_action,
                    rollover,
                } => {
                    let body = json!({
                        "id": id, "scope": scope, "value": value, "window": window, "limit": limit,
                        "warn_percent": warn_percent, "emergency_percent": emergency_percent,
                        "emergency_action": emergency_action, "rollover": rollover,
                    });
                    remote(
                        &r,
                        Method::POST,
                        &format!("/v1/admin/tenants/{tenant}/budgets"),
                        Some(body),
                    )
                    .await?
                }
                BudgetsCommand::Delete { tenant, id } => {
                    let c = Client::new(&r.url, &r.admin_key);
                    let _: Value = c
                        .call::<Value, Value>(
                            Method::DELETE,
                            &format!("/v1/admin/tenants/{tenant}/budgets/{id}"),
                            None,
                        )
                        .await?;
                    println!("deleted");
                }
            }
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `bursar serve` reads its configuration first: the file may say how many workers
    // the runtime has (a flag or the environment wins over it).
    let (serving, workers) = match &cli.command {
        Command::Serve {
            config, workers, ..
        } => match load(config) {
            Ok(loaded) => {
                let workers = workers.map(usize::from).or(loaded.config.server.workers);
                (Some(loaded), workers)
            }
            Err(e) => return failed(&e),
        },
        _ => (None, None),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, serving)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => failed(&e),
    }
}

/// Prints the error; a configuration with problems exits with 2.
fn failed(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    if e.to_string().contains("configuration has") {
        return ExitCode::from(2);
    }
    ExitCode::FAILURE
}
