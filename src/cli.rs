//! Command-line types (clap derive) for every verb of DESIGN.md. No logic here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// pipebridge: make local pipes reachable across the network over TLS + WebSocket.
#[derive(Debug, Parser)]
#[command(name = "pipebridge", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PIPEBRIDGE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing-subscriber EnvFilter syntax); default: info for serve, warn otherwise.
    #[arg(long, global = true, env = "PIPEBRIDGE_LOG")]
    pub log: Option<String>,
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (exports and forwards).
    Serve(ConfigArg),
    /// Bridge stdin/stdout to a remote pipe.
    Connect(ConnectArgs),
    /// Host one forward without a config.
    Forward(ForwardArgs),
    /// List the pipes a gateway lets us use.
    Ls(LsArgs),
    /// Show live sessions from the admin endpoint.
    Status(StatusArgs),
    /// Validate a config and report every error.
    CheckConfig(ConfigArg),
    /// Certificate helpers.
    Certs {
        /// What to do.
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Token helpers.
    Token {
        /// What to do.
        #[command(subcommand)]
        command: TokenCommand,
    },
}

/// `--config PATH`.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Config file (default: $PIPEBRIDGE_CONFIG, ./config/pipebridge.toml, /etc/pipebridge/pipebridge.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Credential flags shared by client verbs.
#[derive(Debug, Args, Clone, Default)]
pub struct CredentialArgs {
    /// CA bundle to verify the gateway (default: the dev PKI if present, else the system trust store).
    #[arg(long)]
    pub ca: Option<String>,
    /// Client certificate (PEM).
    #[arg(long)]
    pub cert: Option<String>,
    /// Client key (PEM).
    #[arg(long)]
    pub key: Option<String>,
    /// File holding a bearer token.
    #[arg(long)]
    pub token_file: Option<String>,
    /// Bearer token (environment only).
    #[arg(
        long = "token",
        env = "PIPEBRIDGE_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    pub token: Option<String>,
}

/// Message framing on stdio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Framing {
    /// One message per line.
    Lines,
    /// A 4-byte big-endian length prefix per message.
    U32be,
}

/// `connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// wss://HOST:PORT/pipes/NAME
    pub url: String,
    /// Credentials.
    #[command(flatten)]
    pub creds: CredentialArgs,
    /// byte or message.
    #[arg(long)]
    pub mode: Option<String>,
    /// duplex, in or out.
    #[arg(long)]
    pub direction: Option<String>,
    /// How stdin/stdout carry messages in message mode.
    #[arg(long, value_enum, default_value_t = Framing::Lines)]
    pub framing: Framing,
    /// Retry a busy pipe until this long has passed (e.g. 30s).
    #[arg(long)]
    pub wait: Option<String>,
    /// Retry an unreachable gateway this many times, with backoff.
    #[arg(long, default_value_t = 0)]
    pub retry: u32,
    /// Show bytes and rate on stderr (when it is a terminal).
    #[arg(long)]
    pub progress: bool,
}

/// `forward`.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// Local endpoint to host, e.g. unix:/run/x.sock or dotnet:NAME.
    #[arg(long)]
    pub listen: String,
    /// wss://HOST:PORT/pipes/NAME
    #[arg(long)]
    pub to: String,
    /// Credentials.
    #[command(flatten)]
    pub creds: CredentialArgs,
    /// Mode of the hosted socket file.
    #[arg(long, default_value = "0660")]
    pub socket_mode: String,
}

/// `ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// wss://HOST:PORT
    pub url: String,
    /// Credentials.
    #[command(flatten)]
    pub creds: CredentialArgs,
}

/// `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Admin address.
    #[arg(long, default_value = crate::config::DEFAULT_ADMIN_LISTEN)]
    pub admin: String,
}

/// `certs` verbs.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write a CA, a server certificate and client certificates.
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Server names (DNS names or IPs); localhost, 127.0.0.1 and ::1 are always added.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Client names (each gets NAME.pem/NAME.key, CN = NAME).
        #[arg(long = "client")]
        clients: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// `token` verbs.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new token (stdout) and the [[identity]] lines for it (stderr).
    New {
        /// Identity name.
        #[arg(long)]
        name: String,
    },
}
