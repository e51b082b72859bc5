//! The `failover-proxy` binary: parse the command line, load the
//! configuration (exit 2 if invalid), start logging, hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use failover_proxy::config::{self, CONFIG_PATH_VAR, Config};
use failover_proxy::{Server, check, error_chain, logging};

#[derive(Parser, Debug)]
#[command(
    name = "failover-proxy",
    version,
    about = "A localhost TCP failover sidecar: resolves a cluster alias on every connection and connects to the first healthy server."
)]
struct Cli {
    /// Config file [default: $FAILOVER_PROXY_CONFIG, else /etc/failover-proxy/failover-proxy.toml]
    #[arg(short, long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// Run the sidecar (the default)
    Run,
    /// Validate the config, resolve every alias now, try every address, print a table
    Check,
}

const EXIT_UNREACHABLE: u8 = 1;
const EXIT_FATAL: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = config::config_path(cli.config.as_deref(), std::env::var_os(CONFIG_PATH_VAR));
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _log = match logging::init(&config.log, std::env::var("RUST_LOG").ok()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config, path),
        Command::Check => run_check(config),
    }
}

/// The main event loop: single-threaded, and joined by one more per extra
/// worker thread (see `loops`).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn run(config: Config, path: config::ConfigPath) -> ExitCode {
    let nofile = failover_proxy::limits::raise();
    if nofile.before != nofile.after {
        tracing::info!(
            before = nofile.before,
            after = nofile.after,
            "raised the soft open-file limit to the hard limit"
        );
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            fatal(&format!("cannot start the async runtime: {e}"));
            return ExitCode::from(EXIT_FATAL);
        }
    };
    let loops = failover_proxy::loops::event_loops(config.runtime.worker_threads);
    rt.block_on(async move {
        // Installed before binding, so a SIGTERM that arrives during start-up
        // is a clean stop rather than the default kill.
        let signals = match failover_proxy::Signals::install() {
            Ok(s) => s,
            Err(e) => {
                fatal(&format!("cannot install signal handlers: {e}"));
                return ExitCode::from(EXIT_FATAL);
            }
        };
        let server = match Server::bind(config) {
            Ok(s) => s,
            Err(e) => {
                fatal(&error_chain(&e));
                return ExitCode::from(EXIT_FATAL);
            }
        };
        if let Err(e) = server.spread_over(loops) {
            fatal(&format!("cannot start {} more event loops: {e}", loops - 1));
            return ExitCode::from(EXIT_FATAL);
        }
        tracing::info!(
            version = failover_proxy::VERSION,
            event_loops = loops,
            "failover-proxy started"
        );
        tokio::spawn(logging::report_dropped());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(signals.forward(path, tx));
        server.serve(rx).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Reports why the sidecar cannot run, once: as a log line, so that it is
/// one line in the log's format (a plain line amid JSON breaks the
/// collector's parsing, and a second copy of it doubles the journal), or on
/// stderr as plain text when the log filter would drop it (`RUST_LOG=off`).
fn fatal(why: &str) {
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!(error = %why, "cannot start");
    } else {
        eprintln!("error: cannot start: {why}");
    }
}

fn run_check(config: Config) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FATAL);
        }
    };
    match rt.block_on(check::run(&config)) {
        Ok(report) => {
            print!("{}", report.table());
            if report.all_reachable() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "no reachable address for route(s): {}",
                    report.unreachable.join(", ")
                );
                ExitCode::from(EXIT_UNREACHABLE)
            }
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(EXIT_FATAL)
        }
    }
}
