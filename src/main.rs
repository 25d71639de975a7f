//! The `pipebridge` binary: parse the CLI, set up logging, run a verb, exit with its code.

use clap::Parser;
use pipebridge::app;
use pipebridge::cli::{CertsCommand, Cli, Command, LogFormat, TokenCommand};

fn init_tracing(cli: &Cli) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Without colours, fields are written directly: the default formatter runs its
    // (empty) styles through every field name (pipebridge::logfmt).
    // Timestamps: the text up to the second is formatted once per second and kept.
    use pipebridge::logfmt::{CachedTime, PlainFields};
    let default = match cli.command {
        Command::Serve(_) | Command::Forward(_) => "info",
        _ => "warn",
    };
    let spec = cli.log.as_deref().unwrap_or(default);
    // Colours only on a terminal: logs piped to a file or journald stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Directives by target and level only (the default, and most filters) need no
    // per-span bookkeeping. EnvFilter, which also filters by span and field, takes a
    // lock shared by all threads and a map lookup at every enter and exit of a span.
    // (Layered on the registry directly: the fmt builder would add a level cap of its
    // own, INFO by default, under the filter.)
    if let Some(targets) = static_filter(spec) {
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_timer(CachedTime)
            .with_writer(std::io::stderr);
        let registry = tracing_subscriber::registry().with(targets);
        match cli.log_format {
            LogFormat::Text if !ansi => registry.with(layer.fmt_fields(PlainFields)).init(),
            LogFormat::Text => registry.with(layer).init(),
            LogFormat::Json => registry.with(layer.json()).init(),
        }
        return;
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(spec) {
        Ok(f) => {
            // It selects by the spans entered, so sessions enter theirs at every poll.
            pipebridge::bridge::enter_spans(true);
            f
        }
        Err(_) => tracing_subscriber::EnvFilter::new(default),
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_timer(CachedTime)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text if !ansi => b.fmt_fields(PlainFields).init(),
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// `spec` as a filter by target and level, when it is one: no span (`[..]`) or field
/// (`{..}`) directives, which only EnvFilter understands. Empty directives are dropped,
/// as EnvFilter drops them (`Targets` would read one as "every target, at TRACE").
fn static_filter(spec: &str) -> Option<tracing_subscriber::filter::Targets> {
    if spec.contains(['[', ']', '{', '}']) {
        return None;
    }
    let directives: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return None;
    }
    directives.join(",").parse().ok()
}

fn main() {
    pipebridge::platform::tune_allocator();
    let cli = Cli::parse();
    init_tracing(&cli);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pipebridge: cannot start the runtime: {e}");
            std::process::exit(app::EXIT_RUNTIME);
        }
    };
    let code = rt.block_on(async move {
        match cli.command {
            Command::Serve(c) => app::serve(c.config.as_deref()).await,
            Command::CheckConfig(c) => app::check_config(c.config.as_deref()),
            Command::Connect(a) => app::connect(a).await,
            Command::Forward(a) => app::forward(a).await,
            Command::Ls(a) => app::ls(a).await,
            Command::Status(a) => app::status(&a.admin).await,
            Command::Certs {
                command:
                    CertsCommand::Init {
                        dir,
                        server_names,
                        clients,
                        force,
                    },
            } => app::certs_init(dir, server_names, clients, force),
            Command::Token {
                command: TokenCommand::New { name },
            } => app::token_new(&name),
        }
    });
    // Exit without waiting for blocking stdin reads still parked in the runtime.
    std::process::exit(code);
}
