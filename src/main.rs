//! The `pipebridge` binary: parse the CLI, set up logging, run a verb, exit with its code.

use clap::Parser;
use pipebridge::app;
use pipebridge::cli::{CertsCommand, Cli, Command, LogFormat, TokenCommand};

fn init_tracing(cli: &Cli) {
    let default = match cli.command {
        Command::Serve(_) | Command::Forward(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: logs piped to a file or journald stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
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
