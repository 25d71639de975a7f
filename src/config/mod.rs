//! The config file (TOML): raw serde structs with `deny_unknown_fields` and source spans,
//! turned into a validated [`Config`] whose values cannot be invalid. Every semantic
//! error names the file, the line and the key, and all of them are reported at once;
//! a TOML syntax error stops at the first.

pub mod secret;
pub mod units;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::endpoint::EndpointSpec;
use crate::identity::Principal;

/// Default `server.listen`.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Default `admin.listen`.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9443";
/// Default `limits.max_sessions`.
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
/// Default `limits.max_sessions_per_identity`.
pub const DEFAULT_MAX_SESSIONS_PER_IDENTITY: usize = 1_000;
/// Default `limits.handshake_timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `limits.max_header_size`.
pub const DEFAULT_MAX_HEADER_SIZE_BYTES: usize = 16 * 1024;
/// Default `limits.max_auth_failures`.
pub const DEFAULT_MAX_AUTH_FAILURES: u32 = 20;
/// Default `limits.auth_failure_window`.
pub const DEFAULT_AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Default `keepalive.interval`.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default `keepalive.timeout`.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(90);
/// Default `shutdown.grace_period`.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// The largest `tuning.busy_poll`.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);
/// Default per-pipe `max_instances`.
pub const DEFAULT_MAX_INSTANCES: u32 = 64;
/// Default `socket_mode` of hosted socket files.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// The largest byte-mode chunk a peer may send in one WebSocket message.
pub const MAX_BYTE_MODE_MESSAGE_BYTES: usize = 1 << 20;

/// Where to look for the config when `--config` is not given.
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PIPEBRIDGE_CONFIG") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("config/pipebridge.toml");
    if local.exists() {
        return local;
    }
    PathBuf::from("/etc/pipebridge/pipebridge.toml")
}

// === errors ===

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted key, e.g. `pipe "docker".endpoint`.
    pub key: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(
                f,
                "{}:{}: {}: {}",
                self.file.display(),
                l,
                self.key,
                self.message
            ),
            None => write!(f, "{}: {}: {}", self.file.display(), self.key, self.message),
        }
    }
}

/// Every problem found in a config file (at least one).
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// === validated config ===

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub source: PathBuf,
    /// `[server]`: absent means forwards only.
    pub server: Option<ServerSection>,
    /// `[admin]`: absent means no admin listener.
    pub admin: Option<AdminSection>,
    /// `[tls]`: required with `[server]`.
    pub tls: Option<TlsSection>,
    /// `[limits]`.
    pub limits: Limits,
    /// `[keepalive]`.
    pub keepalive: Keepalive,
    /// `[shutdown]`.
    pub shutdown: ShutdownSection,
    /// `[tuning]`.
    pub tuning: Tuning,
    /// `[[identity]]`.
    pub identities: Vec<IdentityConfig>,
    /// `[[pipe]]`.
    pub pipes: Vec<PipeConfig>,
    /// `[[forward]]`.
    pub forwards: Vec<ForwardConfig>,
    /// `pipes` and `identities` by name ([`Config::pipe`], [`Config::identity`]: looked
    /// up per session, and a config may hold thousands).
    by_name: NameIndex,
}

/// Positions in [`Config::pipes`] and [`Config::identities`] by name (the first of a
/// name: a config with duplicates is refused at load).
#[derive(Debug, Clone, Default)]
struct NameIndex {
    pipes: HashMap<String, usize>,
    identities: HashMap<String, usize>,
}

impl NameIndex {
    fn new(pipes: &[PipeConfig], identities: &[IdentityConfig]) -> NameIndex {
        let mut ix = NameIndex::default();
        for (i, p) in pipes.iter().enumerate() {
            ix.pipes.entry(p.name.clone()).or_insert(i);
        }
        for (i, id) in identities.iter().enumerate() {
            ix.identities.entry(id.name.clone()).or_insert(i);
        }
        ix
    }
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerSection {
    /// Address to listen on (host:port; a host name is resolved at bind time).
    pub listen: String,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminSection {
    /// Address of the plain-HTTP admin listener.
    pub listen: String,
}

/// `[tls]`, with `dev_pki` defaults filled in.
#[derive(Debug, Clone)]
pub struct TlsSection {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (enables mTLS).
    pub client_ca: Option<PathBuf>,
    /// Revocation lists for client certificates.
    pub crl: Vec<PathBuf>,
    /// Generate a dev PKI here at start if missing.
    pub dev_pki: Option<PathBuf>,
}

/// `[limits]`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sessions at once, all pipes.
    pub max_sessions: usize,
    /// Sessions at once per identity.
    pub max_sessions_per_identity: usize,
    /// TCP accept to upgraded WebSocket.
    pub handshake_timeout: Duration,
    /// Largest request head.
    pub max_header_size: usize,
    /// Close sessions idle this long (`None` = off).
    pub idle_timeout: Option<Duration>,
    /// Default largest message of message-mode pipes.
    pub max_message_size: MessageSize,
    /// Failed authentications per source address within `auth_failure_window` before
    /// further requests from it get 429 `rate_limited`.
    pub max_auth_failures: u32,
    /// The window of `max_auth_failures`.
    pub auth_failure_window: Duration,
}

/// A message-size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageSize {
    /// The largest record the kernel accepts without extra privileges.
    Auto,
    /// An explicit byte count.
    Bytes(usize),
}

/// `[keepalive]`.
#[derive(Debug, Clone)]
pub struct Keepalive {
    /// Ping/probe interval.
    pub interval: Duration,
    /// A peer silent this long is dead.
    pub timeout: Duration,
}

/// `[shutdown]`.
#[derive(Debug, Clone)]
pub struct ShutdownSection {
    /// How long live sessions may run after a drain starts.
    pub grace_period: Duration,
}

/// `[tuning]`: speed against CPU time.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How long a data-path thread whose traffic is steady keeps polling for the next
    /// event before it sleeps (`None`: it sleeps at once). See `shard::set_busy_poll`.
    pub busy_poll: Option<Duration>,
}

/// `[[identity]]`.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The identity's name, used in allow lists and logs.
    pub name: String,
    /// Matches a client certificate's subject CN.
    pub cert_cn: Option<String>,
    /// Matches a client certificate's URI SAN.
    pub cert_san_uri: Option<String>,
    /// Matches a client certificate's DNS SAN.
    pub cert_san_dns: Option<String>,
    /// SHA-256 of the bearer token, from `token_sha256` or `token_sha256_file`.
    pub token_sha256: Option<[u8; 32]>,
    /// The `token_sha256_file`, watched for changes.
    pub token_sha256_file: Option<PathBuf>,
    /// Group names for `@group` allow rules.
    pub groups: Vec<String>,
    /// The local principal (resolved at load), when given.
    pub principal: Option<Principal>,
}

/// How an identity names its local account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalSpec {
    /// Resolved through the system user database.
    User(String),
    /// Numeric ids.
    Ids {
        /// User id.
        uid: u32,
        /// Primary group id.
        gid: u32,
        /// Supplementary group ids.
        gids: Vec<u32>,
    },
}

/// One entry of a pipe's `allow` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowRule {
    /// An identity name.
    Identity(String),
    /// `@group`.
    Group(String),
}

/// A pipe's `run_as`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    /// The identity's principal (impersonation).
    Client,
    /// The gateway's own account.
    Gateway,
    /// A fixed account (resolved at load).
    User(Principal),
}

impl RunAs {
    /// The value as written in config, quoted (`"client"`, `"user:NAME"`).
    pub fn describe(&self) -> String {
        match self {
            RunAs::Client => "\"client\"".to_string(),
            RunAs::Gateway => "\"gateway\"".to_string(),
            RunAs::User(u) => format!("\"user:{}\"", u.name),
        }
    }
}

/// What an `eof` from the network does to a Windows named pipe, which has no half-close
/// (`npipe_eof`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NpipeEof {
    /// Nothing is written; the pipe stays open for the reply (the default).
    #[default]
    None,
    /// Byte mode: a zero-length write (the close-write convention of go-winio and
    /// npiperelay); a zero-length read from the pipe is the local side's EOF.
    ZeroMessage,
}

impl NpipeEof {
    fn parse(s: &str) -> Option<NpipeEof> {
        match s {
            "none" => Some(NpipeEof::None),
            "zero_message" => Some(NpipeEof::ZeroMessage),
            _ => None,
        }
    }
}

/// Which way data may flow, from the remote client's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Both ways.
    Duplex,
    /// The client writes into the pipe.
    In,
    /// The client reads from the pipe.
    Out,
}

impl Direction {
    /// Parses `duplex|in|out`.
    pub fn parse(s: &str) -> Option<Direction> {
        match s {
            "duplex" => Some(Direction::Duplex),
            "in" => Some(Direction::In),
            "out" => Some(Direction::Out),
            _ => None,
        }
    }

    /// The config/wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Duplex => "duplex",
            Direction::In => "in",
            Direction::Out => "out",
        }
    }

    /// Whether a pipe offering `self` can serve a session asking for `want`.
    pub fn permits(self, want: Direction) -> bool {
        self == Direction::Duplex || self == want
    }

    /// The client may send data.
    pub fn client_writes(self) -> bool {
        self != Direction::Out
    }

    /// The client may receive data.
    pub fn client_reads(self) -> bool {
        self != Direction::In
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Byte stream or message mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Boundaries mean nothing.
    Byte,
    /// One binary WebSocket message is one pipe message.
    Message,
}

impl Mode {
    /// Parses `byte|message`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "byte" => Some(Mode::Byte),
            "message" => Some(Mode::Message),
            _ => None,
        }
    }

    /// The config/wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Byte => "byte",
            Mode::Message => "message",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[pipe]]`: a pipe this gateway exports.
#[derive(Debug, Clone)]
pub struct PipeConfig {
    /// The name in `/pipes/{name}`.
    pub name: String,
    /// How the pipe is reached locally.
    pub endpoint: EndpointSpec,
    /// Who may use it.
    pub allow: Vec<AllowRule>,
    /// Whose rights open it.
    pub run_as: RunAs,
    /// Directions it offers.
    pub direction: Direction,
    /// Byte or message mode.
    pub mode: Mode,
    /// Sessions at once.
    pub max_instances: u32,
    /// Largest message (message mode).
    pub max_message_size: MessageSize,
    /// Extra environment for `exec:` children.
    pub env: BTreeMap<String, String>,
    /// Working directory for `exec:` children.
    pub cwd: Option<PathBuf>,
    /// `npipe:` pipes: what the network's `eof` does.
    pub npipe_eof: NpipeEof,
}

/// `[[forward]]`: a local endpoint this gateway hosts, bridged to a remote pipe.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardConfig {
    /// The local endpoint to host.
    pub listen: EndpointSpec,
    /// The remote pipe URL (`wss://host:port/pipes/name[?query]`).
    pub to: hyper::Uri,
    /// Credentials for the remote gateway.
    pub credentials: crate::client::CredentialPaths,
    /// Owner of a hosted socket file.
    pub socket_owner: Option<String>,
    /// Group of a hosted socket file.
    pub socket_group: Option<String>,
    /// Mode of a hosted socket file.
    pub socket_mode: u32,
    /// Local callers allowed (empty = any).
    pub allow_local: Vec<String>,
    /// `[keepalive]` `(interval, timeout)` for its sessions.
    pub keepalive: (Duration, Duration),
    /// Run sessions over shared HTTP/2 connections when the gateway offers h2.
    pub http2: bool,
    /// Hosted `npipe:` pipes: instances at once (1–255; 255 = unlimited).
    pub max_instances: u32,
    /// Hosted `npipe:` pipes: the security descriptor in SDDL (`None`: owner, SYSTEM and
    /// Administrators only).
    pub security_descriptor: Option<String>,
    /// Hosted `npipe:` pipes: what the network's `eof` does.
    pub npipe_eof: NpipeEof,
}

impl Config {
    /// Reads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: None,
                key: "(file)".into(),
                message: format!("cannot read the config: {e}"),
            }])
        })?;
        Config::parse(path, &text)
    }

    /// Validates config text; `path` is used in messages and to resolve nothing else.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            // A value of the wrong type or an unknown key is named by its key; anything
            // else is a syntax error.
            let key = e.span().and_then(|s| key_at(text, s.start));
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line,
                key: key.unwrap_or_else(|| "(syntax)".into()),
                message: e.message().trim().to_string(),
            }])
        })?;
        let mut v = Validator {
            file: path.to_path_buf(),
            text,
            errors: Vec::new(),
        };
        let cfg = v.config(raw);
        if v.errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(v.errors))
        }
    }

    /// Files whose change should reload this config: the config itself, TLS material,
    /// CRLs and token hash files.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.source.clone()];
        if let Some(t) = &self.tls {
            v.push(t.cert.clone());
            v.push(t.key.clone());
            v.extend(t.client_ca.clone());
            v.extend(t.crl.iter().cloned());
        }
        v.extend(
            self.identities
                .iter()
                .filter_map(|i| i.token_sha256_file.clone()),
        );
        v
    }

    /// The files the config at `path` names that [`Config::watched_files`] would watch,
    /// read from its TOML without validating it: a config rejected for a file it names
    /// (one that does not exist yet, say) can be watched for that file. Empty when the
    /// file cannot be read or is not TOML.
    pub fn named_files(path: &Path) -> Vec<PathBuf> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        let Ok(doc) = text.parse::<toml::Table>() else {
            return Vec::new();
        };
        let mut v = vec![path.to_path_buf()];
        let strs = |x: Option<&toml::Value>| -> Vec<PathBuf> {
            match x {
                Some(toml::Value::String(s)) => vec![PathBuf::from(s)],
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .filter_map(|e| e.as_str().map(PathBuf::from))
                    .collect(),
                _ => Vec::new(),
            }
        };
        if let Some(t) = doc.get("tls").and_then(|t| t.as_table()) {
            for k in ["cert", "key", "client_ca", "crl"] {
                v.extend(strs(t.get(k)));
            }
        }
        if let Some(ids) = doc.get("identity").and_then(|i| i.as_array()) {
            for id in ids.iter().filter_map(|i| i.as_table()) {
                v.extend(strs(id.get("token_sha256_file")));
            }
        }
        v
    }

    /// The config error for `file`, a `[tls]` file that failed to load (at start, at
    /// check-config, at a reload): named by the key that gave it (`tls.cert`, `tls.crl`,
    /// or `tls.dev_pki` for a file the development PKI supplies) and that key's line.
    /// Without a file (the material did not fit together), the `[tls]` table's.
    pub fn tls_file_error(&self, file: Option<&Path>, message: impl Into<String>) -> ConfigError {
        let message = message.into();
        let Some(file) = file else {
            let text = std::fs::read_to_string(&self.source).unwrap_or_default();
            let line = match toml::from_str::<RawConfig>(&text) {
                Ok(RawConfig { tls: Some(t), .. }) => Some(line_of(&text, t.span().start)),
                _ => None,
            };
            return ConfigError {
                file: self.source.clone(),
                line,
                key: "tls".into(),
                message,
            };
        };
        let mut key = "tls".to_string();
        let mut line = None;
        let text = std::fs::read_to_string(&self.source).unwrap_or_default();
        if let Ok(RawConfig { tls: Some(t), .. }) = toml::from_str::<RawConfig>(&text) {
            let at = |s: &S<String>| Some(line_of(&text, s.span().start));
            line = Some(line_of(&text, t.span().start));
            let t = t.get_ref();
            let named = [
                ("cert", &t.cert),
                ("key", &t.key),
                ("client_ca", &t.client_ca),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v)))
            .chain(t.crl.iter().map(|v| ("crl".to_string(), v)));
            let mut found = false;
            for (k, v) in named {
                if Path::new(v.get_ref()) == file {
                    (key, line, found) = (format!("tls.{k}"), at(v), true);
                    break;
                }
            }
            if let (false, Some(d)) = (found, &t.dev_pki) {
                (key, line) = ("tls.dev_pki".to_string(), at(d));
            }
        }
        ConfigError {
            file: self.source.clone(),
            line,
            key,
            message: format!("{}: {message}", file.display()),
        }
    }

    /// The pipe called `name`.
    pub fn pipe(&self, name: &str) -> Option<&PipeConfig> {
        find_named(&self.by_name.pipes, &self.pipes, name, |p| &p.name)
    }

    /// The identity called `name`.
    pub fn identity(&self, name: &str) -> Option<&IdentityConfig> {
        find_named(&self.by_name.identities, &self.identities, name, |id| {
            &id.name
        })
    }
}

/// The item of `items` called `name`, where `index` says; by a scan if `items` changed
/// since the index was built (the config's lists are public): never a stale answer.
fn find_named<'a, T>(
    index: &HashMap<String, usize>,
    items: &'a [T],
    name: &str,
    name_of: fn(&T) -> &String,
) -> Option<&'a T> {
    match index.get(name).and_then(|&i| items.get(i)) {
        Some(x) if name_of(x) == name => Some(x),
        _ => items.iter().find(|x| name_of(x) == name),
    }
}

/// The key at `offset` of a config's text, as `table.key` (`table[i].key` in an array
/// of tables, `i` from 0): that of its own `key =` line, or of the `key = [` whose array
/// is still open there (a value on a later line). `None` anywhere else: a table header,
/// or a line that is neither (a syntax error).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let lines: Vec<&str> = text.split('\n').collect();
    let at = text[..offset].matches('\n').count();
    let bare = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    let mut key = None;
    let mut i = at;
    loop {
        let l = lines.get(i)?.trim();
        if l.starts_with('[') {
            break;
        }
        if let Some((k, _)) = l.split_once('=') {
            if bare(k.trim()) {
                // On a line above the error's, only an array still open at the error.
                let open = array_open(&text[lines_from(&lines, i).min(offset)..offset]);
                if i != at && !open {
                    return None;
                }
                key = Some(k.trim().to_string());
                break;
            }
        }
        i = i.checked_sub(1)?;
    }
    let key = key?;
    let header = lines[..i]
        .iter()
        .rposition(|l| l.trim_start().starts_with('['));
    let Some(h) = header else {
        return Some(key);
    };
    if let Some(name) = table_name(lines[h]) {
        let nth = lines[..=h]
            .iter()
            .filter(|l| table_name(l) == Some(name))
            .count();
        Some(format!("{name}[{}].{key}", nth - 1))
    } else {
        let name = lines[h].trim().strip_prefix('[')?.split(']').next()?.trim();
        Some(format!("{name}.{key}"))
    }
}

/// Whether TOML `text` (from the start of a `key =` line) leaves an array open: more `[`
/// than `]` outside strings and comments.
fn array_open(text: &str) -> bool {
    let mut depth = 0i64;
    let mut quote = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some('"'), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') => {
                // A comment runs to the end of its line.
                if !chars.by_ref().any(|c| c == '\n') {
                    break;
                }
            }
            (None, '[') => depth += 1,
            (None, ']') => depth -= 1,
            (None, _) => {}
        }
    }
    depth > 0
}

/// The byte offset of line `i` of `lines` (the text split at `\n`).
fn lines_from(lines: &[&str], i: usize) -> usize {
    lines[..i].iter().map(|l| l.len() + 1).sum()
}

/// The name of an array-of-tables header line (`[[name]]`).
fn table_name(line: &str) -> Option<&str> {
    line.trim()
        .strip_prefix("[[")
        .and_then(|r| r.split("]]").next())
        .map(str::trim)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

// === raw serde structs ===

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<S<RawServer>>,
    admin: Option<S<RawAdmin>>,
    tls: Option<S<RawTls>>,
    limits: Option<RawLimits>,
    keepalive: Option<RawKeepalive>,
    shutdown: Option<RawShutdown>,
    tuning: Option<RawTuning>,
    #[serde(default)]
    identity: Vec<S<RawIdentity>>,
    #[serde(default)]
    pipe: Vec<S<RawPipe>>,
    #[serde(default)]
    forward: Vec<S<RawForward>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<S<String>>,
    key: Option<S<String>>,
    client_ca: Option<S<String>>,
    #[serde(default)]
    crl: Vec<S<String>>,
    dev_pki: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_sessions: Option<S<i64>>,
    max_sessions_per_identity: Option<S<i64>>,
    handshake_timeout: Option<S<String>>,
    max_header_size: Option<S<String>>,
    idle_timeout: Option<S<String>>,
    max_message_size: Option<S<String>>,
    max_auth_failures: Option<S<i64>>,
    auth_failure_window: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeepalive {
    interval: Option<S<String>>,
    timeout: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTuning {
    busy_poll: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    grace_period: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    name: Option<S<String>>,
    cert_cn: Option<S<String>>,
    cert_san_uri: Option<S<String>>,
    cert_san_dns: Option<S<String>>,
    token_sha256: Option<S<String>>,
    token_sha256_file: Option<S<String>>,
    #[serde(default)]
    groups: Vec<S<String>>,
    user: Option<S<String>>,
    uid: Option<S<i64>>,
    gid: Option<S<i64>>,
    gids: Option<S<Vec<i64>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipe {
    name: Option<S<String>>,
    endpoint: Option<S<String>>,
    argv: Option<S<Vec<String>>>,
    #[serde(default)]
    allow: Vec<S<String>>,
    run_as: Option<S<String>>,
    direction: Option<S<String>>,
    mode: Option<S<String>>,
    max_instances: Option<S<i64>>,
    max_message_size: Option<S<String>>,
    env: Option<S<BTreeMap<String, String>>>,
    cwd: Option<S<String>>,
    security_descriptor: Option<S<String>>,
    npipe_eof: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    listen: Option<S<String>>,
    to: Option<S<String>>,
    ca: Option<S<String>>,
    cert: Option<S<String>>,
    key: Option<S<String>>,
    token_file: Option<S<String>>,
    socket_mode: Option<S<String>>,
    socket_owner: Option<S<String>>,
    socket_group: Option<S<String>>,
    #[serde(default)]
    allow_local: Vec<S<String>>,
    http2: Option<bool>,
    max_instances: Option<S<i64>>,
    security_descriptor: Option<S<String>>,
    npipe_eof: Option<S<String>>,
}

// === validation ===

struct Validator<'a> {
    file: PathBuf,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn err(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: Some(line_of(self.text, span.start)),
            key: key.into(),
            message: message.into(),
        });
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let server = raw.server.map(|s| {
            let s = s.into_inner();
            let listen = s
                .listen
                .map(|l| {
                    self.listen_addr(&l, "server.listen");
                    l.into_inner()
                })
                .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
            ServerSection { listen }
        });
        let admin = raw.admin.map(|s| {
            let s = s.into_inner();
            let listen = s
                .listen
                .map(|l| {
                    self.listen_addr(&l, "admin.listen");
                    l.into_inner()
                })
                .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
            AdminSection { listen }
        });
        let tls = raw.tls.as_ref().and_then(|t| self.tls(t));
        if server.is_some() && tls.is_none() && raw.tls.is_none() {
            self.err(
                0..0,
                "tls",
                "a [server] needs a [tls] section with cert and key (or dev_pki)",
            );
        }
        let limits = self.limits(raw.limits);
        let keepalive = self.keepalive(raw.keepalive);
        let shutdown = ShutdownSection {
            grace_period: raw
                .shutdown
                .and_then(|s| s.grace_period)
                .and_then(|d| self.duration(&d, "shutdown.grace_period"))
                .unwrap_or(DEFAULT_GRACE_PERIOD),
        };
        let tuning = self.tuning(raw.tuning);
        let identities = self.identities(raw.identity);
        let pipes = self.pipes(raw.pipe, &identities, &limits);
        let mut forwards: Vec<ForwardConfig> = Vec::new();
        // The endpoints and files hosted so far (sets: a config may hold thousands).
        let mut hosted: HashSet<EndpointSpec> = HashSet::new();
        let mut hosted_files: HashSet<PathBuf> = HashSet::new();
        for (i, f) in raw.forward.into_iter().enumerate() {
            let listen = f.get_ref().listen.clone();
            if let Some(f) = self.forward(i, f) {
                let file = f.listen.hosted_file();
                // Of any kinds: `unix:/x` and `fifo:/x` name one file.
                if hosted.contains(&f.listen)
                    || file.as_ref().is_some_and(|p| hosted_files.contains(p))
                {
                    // A reload matches forwards by their endpoint, and two cannot both
                    // bind one.
                    let span = listen.map_or(0..0, |l| l.span());
                    self.err(
                        span,
                        format!("forward[{i}].listen"),
                        "another [[forward]] already hosts this endpoint",
                    );
                } else {
                    hosted.insert(f.listen.clone());
                    hosted_files.extend(file);
                    forwards.push(f);
                }
            }
        }
        for f in &mut forwards {
            f.keepalive = (keepalive.interval, keepalive.timeout);
        }
        if server.is_none() && !pipes.is_empty() {
            self.err(
                0..0,
                "pipe",
                "[[pipe]] entries are exported only by a [server]; add a [server] section",
            );
        }
        Config {
            source: self.file.clone(),
            server,
            admin,
            tls,
            limits,
            keepalive,
            shutdown,
            tuning,
            by_name: NameIndex::new(&pipes, &identities),
            identities,
            pipes,
            forwards,
        }
    }

    fn listen_addr(&mut self, l: &S<String>, key: &str) {
        let s = l.get_ref();
        let ok = s.parse::<SocketAddr>().is_ok()
            || s.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !ok {
            self.err(
                l.span(),
                key,
                format!("invalid address {s:?}: expected host:port such as \"127.0.0.1:8443\""),
            );
        }
    }

    fn duration(&mut self, d: &S<String>, key: &str) -> Option<Duration> {
        match units::parse_duration(d.get_ref()) {
            Ok(v) => Some(v),
            Err(m) => {
                self.err(d.span(), key, m);
                None
            }
        }
    }

    fn size(&mut self, d: &S<String>, key: &str) -> Option<u64> {
        match units::parse_size(d.get_ref()) {
            Ok(v) => Some(v),
            Err(m) => {
                self.err(d.span(), key, m);
                None
            }
        }
    }

    fn message_size(&mut self, d: &S<String>, key: &str) -> Option<MessageSize> {
        if d.get_ref() == "auto" {
            return Some(MessageSize::Auto);
        }
        let n = self.size(d, key)?;
        if n == 0 || n > (256 << 20) {
            self.err(
                d.span(),
                key,
                "must be \"auto\" or a size between 1B and 256MiB",
            );
            return None;
        }
        Some(MessageSize::Bytes(n as usize))
    }

    fn npipe_eof(
        &mut self,
        v: Option<&S<String>>,
        key: &str,
        is_npipe: bool,
        mode: Mode,
    ) -> NpipeEof {
        let Some(v) = v else {
            return NpipeEof::None;
        };
        let k = format!("{key}.npipe_eof");
        if !is_npipe {
            self.err(v.span(), k, "applies to npipe: endpoints only");
            return NpipeEof::None;
        }
        match NpipeEof::parse(v.get_ref()) {
            Some(NpipeEof::ZeroMessage) if mode == Mode::Message => {
                self.err(
                    v.span(),
                    k,
                    "\"zero_message\" is for byte mode: in message mode a zero-length message is data",
                );
                NpipeEof::None
            }
            Some(e) => e,
            None => {
                self.err(v.span(), k, "must be \"none\" or \"zero_message\"");
                NpipeEof::None
            }
        }
    }

    fn count(&mut self, v: &S<i64>, key: &str, max: i64) -> Option<i64> {
        let n = *v.get_ref();
        if n < 1 || n > max {
            self.err(v.span(), key, format!("must be between 1 and {max}"));
            return None;
        }
        Some(n)
    }

    fn tls(&mut self, t: &S<RawTls>) -> Option<TlsSection> {
        let span = t.span();
        let t = t.get_ref();
        let dev = t.dev_pki.as_ref().map(|d| PathBuf::from(d.get_ref()));
        let cert = t
            .cert
            .as_ref()
            .map(|c| PathBuf::from(c.get_ref()))
            .or_else(|| dev.as_ref().map(|d| d.join("server.pem")));
        let key = t
            .key
            .as_ref()
            .map(|c| PathBuf::from(c.get_ref()))
            .or_else(|| dev.as_ref().map(|d| d.join("server.key")));
        let client_ca = t
            .client_ca
            .as_ref()
            .map(|c| PathBuf::from(c.get_ref()))
            .or_else(|| dev.as_ref().map(|d| d.join("ca.pem")));
        match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsSection {
                cert,
                key,
                client_ca,
                crl: t.crl.iter().map(|c| PathBuf::from(c.get_ref())).collect(),
                dev_pki: dev,
            }),
            _ => {
                self.err(
                    span,
                    "tls",
                    "needs both cert and key (or dev_pki to generate a development PKI)",
                );
                None
            }
        }
    }

    fn limits(&mut self, raw: Option<RawLimits>) -> Limits {
        let mut l = Limits {
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_sessions_per_identity: DEFAULT_MAX_SESSIONS_PER_IDENTITY,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_header_size: DEFAULT_MAX_HEADER_SIZE_BYTES,
            idle_timeout: None,
            max_message_size: MessageSize::Auto,
            max_auth_failures: DEFAULT_MAX_AUTH_FAILURES,
            auth_failure_window: DEFAULT_AUTH_FAILURE_WINDOW,
        };
        let Some(r) = raw else { return l };
        if let Some(v) = r
            .max_sessions
            .and_then(|v| self.count(&v, "limits.max_sessions", 1 << 24))
        {
            l.max_sessions = v as usize;
        }
        if let Some(v) = r
            .max_sessions_per_identity
            .and_then(|v| self.count(&v, "limits.max_sessions_per_identity", 1 << 24))
        {
            l.max_sessions_per_identity = v as usize;
        }
        if let Some(d) = r.handshake_timeout {
            if let Some(v) = self.duration(&d, "limits.handshake_timeout") {
                if v.is_zero() {
                    self.err(
                        d.span(),
                        "limits.handshake_timeout",
                        "must be more than zero",
                    );
                } else {
                    l.handshake_timeout = v;
                }
            }
        }
        if let Some(d) = r.max_header_size {
            if let Some(v) = self.size(&d, "limits.max_header_size") {
                // At least 8 KiB: HTTP/1.1's parser (hyper) cannot hold its limit lower,
                // so a smaller one would hold for HTTP/2 only.
                if !(8192..=(1 << 20)).contains(&v) {
                    self.err(
                        d.span(),
                        "limits.max_header_size",
                        "must be between 8KiB and 1MiB",
                    );
                } else {
                    l.max_header_size = v as usize;
                }
            }
        }
        if let Some(d) = r.idle_timeout {
            match units::parse_optional_duration(d.get_ref()) {
                Ok(v) => l.idle_timeout = v,
                Err(m) => self.err(d.span(), "limits.idle_timeout", m),
            }
        }
        if let Some(d) = r.max_message_size {
            if let Some(v) = self.message_size(&d, "limits.max_message_size") {
                l.max_message_size = v;
            }
        }
        if let Some(v) = r
            .max_auth_failures
            .and_then(|v| self.count(&v, "limits.max_auth_failures", 1 << 20))
        {
            l.max_auth_failures = v as u32;
        }
        if let Some(v) = r
            .auth_failure_window
            .and_then(|d| self.duration(&d, "limits.auth_failure_window"))
        {
            l.auth_failure_window = v;
        }
        l
    }

    fn tuning(&mut self, raw: Option<RawTuning>) -> Tuning {
        let mut t = Tuning { busy_poll: None };
        if let Some(d) = raw.and_then(|r| r.busy_poll) {
            match units::parse_optional_duration(d.get_ref()) {
                Ok(Some(v)) if v > MAX_BUSY_POLL => self.err(
                    d.span(),
                    "tuning.busy_poll",
                    format!("must be \"off\" or at most {}us", MAX_BUSY_POLL.as_micros()),
                ),
                Ok(v) => t.busy_poll = v,
                Err(m) => self.err(d.span(), "tuning.busy_poll", m),
            }
        }
        t
    }

    fn keepalive(&mut self, raw: Option<RawKeepalive>) -> Keepalive {
        let mut k = Keepalive {
            interval: DEFAULT_KEEPALIVE_INTERVAL,
            timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        };
        let Some(r) = raw else { return k };
        if let Some(d) = r.interval {
            match self.duration(&d, "keepalive.interval") {
                Some(Duration::ZERO) => self.err(
                    d.span(),
                    "keepalive.interval",
                    "must be more than 0 (a ping at every turn)",
                ),
                Some(v) => k.interval = v,
                None => {}
            }
        }
        if let Some(d) = r.timeout {
            if let Some(v) = self.duration(&d, "keepalive.timeout") {
                if v.is_zero() {
                    self.err(
                        d.span(),
                        "keepalive.timeout",
                        "must be more than 0 (every session would end at once)",
                    );
                } else if v < k.interval {
                    self.err(
                        d.span(),
                        "keepalive.timeout",
                        "must be at least keepalive.interval",
                    );
                } else {
                    k.timeout = v;
                }
            }
        }
        k
    }

    fn identities(&mut self, raw: Vec<S<RawIdentity>>) -> Vec<IdentityConfig> {
        let mut out: Vec<IdentityConfig> = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        // A token an earlier identity has, or certificate fields that an earlier
        // identity's all appear among (same values): the later identity could never be
        // reached by it, since the first identity a credential matches wins (a
        // certificate matches an identity when every field the identity sets matches).
        let mut tokens: HashMap<[u8; 32], String> = HashMap::new();
        type CertFields = (Option<String>, Option<String>, Option<String>);
        let mut certs: HashMap<CertFields, String> = HashMap::new();
        for (i, r) in raw.into_iter().enumerate() {
            let span = r.span();
            let r = r.into_inner();
            let Some(name) = r.name else {
                self.err(
                    span,
                    format!("identity[{i}].name"),
                    "every [[identity]] needs a name",
                );
                continue;
            };
            let key = format!("identity {:?}", name.get_ref());
            if !valid_name(name.get_ref()) {
                self.err(
                    name.span(),
                    format!("{key}.name"),
                    "must be 1-128 characters of A-Z a-z 0-9 . _ - (no leading dot)",
                );
            }
            if names.contains(name.get_ref()) {
                self.err(
                    name.span(),
                    format!("{key}.name"),
                    "duplicate identity name",
                );
            }
            let mut token = None;
            if let Some(t) = &r.token_sha256 {
                token = self.token_hash(t.get_ref(), t.span(), &format!("{key}.token_sha256"));
            }
            if let Some(f) = &r.token_sha256_file {
                if token.is_some() {
                    self.err(
                        f.span(),
                        format!("{key}.token_sha256_file"),
                        "give token_sha256 or token_sha256_file, not both",
                    );
                } else {
                    match std::fs::read_to_string(f.get_ref()) {
                        Ok(s) => {
                            token = self.token_hash(
                                s.trim(),
                                f.span(),
                                &format!("{key}.token_sha256_file ({})", f.get_ref()),
                            )
                        }
                        Err(e) => self.err(
                            f.span(),
                            format!("{key}.token_sha256_file"),
                            format!("cannot read {}: {e}", f.get_ref()),
                        ),
                    }
                }
            }
            if token.is_none()
                && r.cert_cn.is_none()
                && r.cert_san_uri.is_none()
                && r.cert_san_dns.is_none()
                && r.token_sha256.is_none()
                && r.token_sha256_file.is_none()
            {
                self.err(
                    name.span(),
                    key.clone(),
                    "matches nothing: give cert_cn, cert_san_uri, cert_san_dns, token_sha256 or token_sha256_file",
                );
            }
            let principal = match (&r.user, &r.uid) {
                (Some(_), Some(u)) => {
                    self.err(
                        u.span(),
                        format!("{key}.uid"),
                        "give user or uid/gid, not both",
                    );
                    None
                }
                (Some(u), None) => {
                    if r.gid.is_some() || r.gids.is_some() {
                        self.err(
                            u.span(),
                            format!("{key}.user"),
                            "gid and gids come from the user database with user; remove them",
                        );
                    }
                    Some(PrincipalSpec::User(u.get_ref().clone()))
                }
                (None, Some(u)) => {
                    let uid = self.id(u, &format!("{key}.uid"));
                    let gid = match &r.gid {
                        Some(g) => self.id(g, &format!("{key}.gid")),
                        None => {
                            self.err(u.span(), format!("{key}.gid"), "uid needs a gid too");
                            None
                        }
                    };
                    let gids = r
                        .gids
                        .as_ref()
                        .map(|g| {
                            g.get_ref()
                                .iter()
                                .filter_map(|&n| {
                                    if (0..u32::MAX as i64).contains(&n) {
                                        Some(n as u32)
                                    } else {
                                        self.err(
                                            g.span(),
                                            format!("{key}.gids"),
                                            "ids must be between 0 and 4294967294",
                                        );
                                        None
                                    }
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    match (uid, gid) {
                        (Some(uid), Some(gid)) => Some(PrincipalSpec::Ids { uid, gid, gids }),
                        _ => None,
                    }
                }
                (None, None) => {
                    if let Some(g) = r.gid.as_ref() {
                        self.err(g.span(), format!("{key}.gid"), "gid needs a uid");
                    }
                    None
                }
            };
            let principal = principal.and_then(|spec| match crate::identity::resolve(&spec) {
                Ok(p) => Some(p),
                Err(m) => {
                    let span = r.user.as_ref().map(|u| u.span()).unwrap_or(name.span());
                    self.err(span, format!("{key}.user"), m);
                    None
                }
            });
            if let Some(t) = token {
                if let Some(first) = tokens.get(&t) {
                    let (span, field) = match (&r.token_sha256, &r.token_sha256_file) {
                        (Some(v), _) => (v.span(), "token_sha256"),
                        (None, Some(f)) => (f.span(), "token_sha256_file"),
                        (None, None) => (name.span(), "token_sha256"),
                    };
                    self.err(
                        span,
                        format!("{key}.{field}"),
                        format!(
                            "identity {first:?} has the same token: a token must name one identity"
                        ),
                    );
                } else {
                    tokens.insert(t, name.get_ref().clone());
                }
            }
            let fields: CertFields = (
                r.cert_cn.as_ref().map(|v| v.get_ref().clone()),
                r.cert_san_uri.as_ref().map(|v| v.get_ref().clone()),
                r.cert_san_dns.as_ref().map(|v| v.get_ref().clone()),
            );
            if fields != (None, None, None) {
                // Every earlier identity whose fields are a part of these: the
                // non-empty parts of this identity's fields, looked up whole.
                let part = |mask: u8| -> CertFields {
                    let keep = |bit: u8, v: &Option<String>| v.clone().filter(|_| mask & bit != 0);
                    (keep(1, &fields.0), keep(2, &fields.1), keep(4, &fields.2))
                };
                let shadow = (1u8..8)
                    .map(part)
                    .filter(|p| *p != (None, None, None))
                    .find_map(|p| certs.get(&p).map(|first| (first.clone(), p)));
                if let Some((first, p)) = shadow {
                    let (span, field) = match (&p, &r.cert_cn, &r.cert_san_uri, &r.cert_san_dns) {
                        ((Some(_), _, _), Some(v), _, _) => (v.span(), "cert_cn"),
                        ((None, Some(_), _), _, Some(v), _) => (v.span(), "cert_san_uri"),
                        (_, _, _, Some(v)) => (v.span(), "cert_san_dns"),
                        _ => (name.span(), "cert_cn"),
                    };
                    self.err(
                        span,
                        format!("{key}.{field}"),
                        format!(
                            "identity {first:?} matches every certificate this identity does and comes first: \
                             this one could never be reached by certificate"
                        ),
                    );
                } else {
                    certs
                        .entry(fields)
                        .or_insert_with(|| name.get_ref().clone());
                }
            }
            names.insert(name.get_ref().clone());
            out.push(IdentityConfig {
                name: name.into_inner(),
                cert_cn: r.cert_cn.map(|s| s.into_inner()),
                cert_san_uri: r.cert_san_uri.map(|s| s.into_inner()),
                cert_san_dns: r.cert_san_dns.map(|s| s.into_inner()),
                token_sha256: token,
                token_sha256_file: r.token_sha256_file.map(|f| PathBuf::from(f.into_inner())),
                groups: r.groups.into_iter().map(|g| g.into_inner()).collect(),
                principal,
            });
        }
        out
    }

    fn id(&mut self, v: &S<i64>, key: &str) -> Option<u32> {
        let n = *v.get_ref();
        if (0..u32::MAX as i64).contains(&n) {
            Some(n as u32)
        } else {
            self.err(v.span(), key, "must be between 0 and 4294967294");
            None
        }
    }

    fn token_hash(&mut self, s: &str, span: Range<usize>, key: &str) -> Option<[u8; 32]> {
        let h = s.strip_prefix("sha256:").unwrap_or(s);
        match parse_hex32(h) {
            Some(v) => Some(v),
            None => {
                self.err(
                    span,
                    key,
                    "must be 64 lowercase hex digits of SHA-256 of the token (\"sha256:\" prefix allowed); `pipebridge token new` prints one",
                );
                None
            }
        }
    }

    fn pipes(
        &mut self,
        raw: Vec<S<RawPipe>>,
        identities: &[IdentityConfig],
        limits: &Limits,
    ) -> Vec<PipeConfig> {
        let mut out: Vec<PipeConfig> = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        // Identities by name and by group, for the allow lists.
        let by_name: HashMap<&str, &IdentityConfig> =
            identities.iter().map(|id| (id.name.as_str(), id)).collect();
        let mut by_group: HashMap<&str, Vec<&IdentityConfig>> = HashMap::new();
        for id in identities {
            for g in &id.groups {
                let members = by_group.entry(g.as_str()).or_default();
                // Once per identity, however often it names the group.
                if !members.last().is_some_and(|m| std::ptr::eq(*m, id)) {
                    members.push(id);
                }
            }
        }
        for (i, r) in raw.into_iter().enumerate() {
            let span = r.span();
            let r = r.into_inner();
            let Some(name) = r.name else {
                self.err(
                    span,
                    format!("pipe[{i}].name"),
                    "every [[pipe]] needs a name",
                );
                continue;
            };
            let key = format!("pipe {:?}", name.get_ref());
            if !valid_name(name.get_ref()) {
                self.err(
                    name.span(),
                    format!("{key}.name"),
                    "must match [A-Za-z0-9_-][A-Za-z0-9._-]{0,127}",
                );
            }
            if names.contains(name.get_ref()) {
                self.err(name.span(), format!("{key}.name"), "duplicate pipe name");
            }
            let endpoint = match (&r.endpoint, &r.argv) {
                (None, _) => {
                    self.err(
                        name.span(),
                        format!("{key}.endpoint"),
                        "missing; expected unix:PATH, seqpacket:PATH, fifo:PATH, exec:COMMAND, dotnet:NAME or npipe:NAME",
                    );
                    None
                }
                (Some(e), argv) => match EndpointSpec::parse_export(
                    e.get_ref(),
                    argv.as_ref().map(|a| a.get_ref().as_slice()),
                ) {
                    Ok(ep) => Some(ep),
                    Err(m) => {
                        self.err(e.span(), format!("{key}.endpoint"), m);
                        None
                    }
                },
            };
            if r.argv.is_some() && r.endpoint.as_ref().is_some_and(|e| e.get_ref() != "exec") {
                if let Some(a) = &r.argv {
                    self.err(
                        a.span(),
                        format!("{key}.argv"),
                        "argv goes with endpoint = \"exec\" only",
                    );
                }
            }
            let mut allow = Vec::new();
            for a in &r.allow {
                let s = a.get_ref();
                if let Some(g) = s.strip_prefix('@') {
                    if !by_group.contains_key(g) {
                        self.err(
                            a.span(),
                            format!("{key}.allow"),
                            format!("no [[identity]] is in group {g:?}"),
                        );
                    }
                    allow.push(AllowRule::Group(g.to_string()));
                } else {
                    if !by_name.contains_key(s.as_str()) {
                        self.err(
                            a.span(),
                            format!("{key}.allow"),
                            format!(
                                "unknown identity {s:?} (allow lists name identities or @groups)"
                            ),
                        );
                    }
                    allow.push(AllowRule::Identity(s.clone()));
                }
            }
            let run_as = match &r.run_as {
                None => RunAs::Client,
                Some(v) => match v.get_ref().as_str() {
                    "client" => RunAs::Client,
                    "gateway" => RunAs::Gateway,
                    s => match s.strip_prefix("user:") {
                        Some(u) if !u.is_empty() => match crate::identity::resolve_user(u) {
                            Ok(p) => RunAs::User(p),
                            Err(m) => {
                                self.err(v.span(), format!("{key}.run_as"), m);
                                RunAs::Gateway
                            }
                        },
                        _ => {
                            self.err(
                                v.span(),
                                format!("{key}.run_as"),
                                "must be \"client\", \"gateway\" or \"user:NAME\"",
                            );
                            RunAs::Gateway
                        }
                    },
                },
            };
            if run_as == RunAs::Client {
                // Every identity the pipe lets in must map to a local account.
                for a in &r.allow {
                    let s = a.get_ref();
                    let matching: &[&IdentityConfig] = match s.strip_prefix('@') {
                        Some(g) => by_group.get(g).map_or(&[], Vec::as_slice),
                        None => by_name.get(s.as_str()).map_or(&[], std::slice::from_ref),
                    };
                    let lacking: Vec<&str> = matching
                        .iter()
                        .filter(|id| id.principal.is_none())
                        .map(|id| id.name.as_str())
                        .collect();
                    if !lacking.is_empty() {
                        self.err(
                            a.span(),
                            format!("{key}.allow"),
                            format!(
                                "run_as = \"client\" (the default) opens the pipe as the client's local account, but identity {} has none: give it user = \"NAME\" or uid/gid, or set run_as = \"gateway\" or \"user:NAME\"",
                                lacking.join(", ")
                            ),
                        );
                    }
                }
            }
            let kind_mode = endpoint.as_ref().map(|e| e.natural_mode());
            let mode = match &r.mode {
                None => kind_mode.flatten().unwrap_or(Mode::Byte),
                Some(m) => match Mode::parse(m.get_ref()) {
                    Some(v) => {
                        if let Some(Some(nat)) = kind_mode {
                            if nat != v {
                                self.err(
                                    m.span(),
                                    format!("{key}.mode"),
                                    format!("this endpoint kind is {nat} mode only"),
                                );
                            }
                        }
                        v
                    }
                    None => {
                        self.err(
                            m.span(),
                            format!("{key}.mode"),
                            "must be \"byte\" or \"message\"",
                        );
                        Mode::Byte
                    }
                },
            };
            let direction = match &r.direction {
                None => {
                    if matches!(endpoint, Some(EndpointSpec::Fifo(_))) {
                        self.err(
                            name.span(),
                            format!("{key}.direction"),
                            "a fifo: pipe is one-way: set direction = \"in\" or \"out\"",
                        );
                    }
                    Direction::Duplex
                }
                Some(d) => match Direction::parse(d.get_ref()) {
                    Some(v) => {
                        if v == Direction::Duplex && matches!(endpoint, Some(EndpointSpec::Fifo(_)))
                        {
                            self.err(
                                d.span(),
                                format!("{key}.direction"),
                                "a fifo: pipe is one-way: set direction = \"in\" or \"out\"",
                            );
                        }
                        v
                    }
                    None => {
                        self.err(
                            d.span(),
                            format!("{key}.direction"),
                            "must be \"duplex\", \"in\" or \"out\"",
                        );
                        Direction::Duplex
                    }
                },
            };
            let max_instances = r
                .max_instances
                .as_ref()
                .and_then(|v| self.count(v, &format!("{key}.max_instances"), 1 << 24))
                .map(|v| v as u32)
                .unwrap_or(DEFAULT_MAX_INSTANCES);
            let max_message_size = r
                .max_message_size
                .as_ref()
                .and_then(|v| self.message_size(v, &format!("{key}.max_message_size")))
                .unwrap_or(limits.max_message_size);
            if let Some(sd) = &r.security_descriptor {
                self.err(
                    sd.span(),
                    format!("{key}.security_descriptor"),
                    "applies to a pipe the gateway hosts: set it on the [[forward]] with listen = \"npipe:NAME\" (an exported pipe is created by its own server)",
                );
            }
            let is_npipe = matches!(endpoint, Some(EndpointSpec::Npipe(_)));
            let npipe_eof = self.npipe_eof(r.npipe_eof.as_ref(), &key, is_npipe, mode);
            if cfg!(windows) && run_as != RunAs::Gateway {
                if let (Some(EndpointSpec::Exec { .. }), Some(v)) = (&endpoint, &r.run_as) {
                    self.err(
                        v.span(),
                        format!("{key}.run_as"),
                        "exec: children cannot be started as another account on Windows builds: set run_as = \"gateway\"",
                    );
                } else if let (Some(EndpointSpec::Exec { .. }), None) = (&endpoint, &r.run_as) {
                    self.err(
                        name.span(),
                        format!("{key}.run_as"),
                        "exec: children cannot be started as another account on Windows builds: set run_as = \"gateway\"",
                    );
                }
            }
            let is_exec = matches!(endpoint, Some(EndpointSpec::Exec { .. }));
            if let Some(e) = &r.env {
                if !is_exec {
                    self.err(e.span(), format!("{key}.env"), "applies to exec pipes only");
                }
            }
            if let Some(c) = &r.cwd {
                if !is_exec {
                    self.err(c.span(), format!("{key}.cwd"), "applies to exec pipes only");
                }
            }
            let Some(endpoint) = endpoint else { continue };
            names.insert(name.get_ref().clone());
            out.push(PipeConfig {
                name: name.into_inner(),
                endpoint,
                allow,
                run_as,
                direction,
                mode,
                max_instances,
                max_message_size,
                env: r.env.map(|e| e.into_inner()).unwrap_or_default(),
                cwd: r.cwd.map(|c| PathBuf::from(c.into_inner())),
                npipe_eof,
            });
        }
        out
    }

    fn forward(&mut self, i: usize, r: S<RawForward>) -> Option<ForwardConfig> {
        let span = r.span();
        let r = r.into_inner();
        let key = format!("forward[{i}]");
        let listen = match &r.listen {
            None => {
                self.err(
                    span.clone(),
                    format!("{key}.listen"),
                    "missing; expected unix:PATH or dotnet:NAME",
                );
                None
            }
            Some(l) => match EndpointSpec::parse_hosted(l.get_ref()) {
                Ok(e) => Some(e),
                Err(m) => {
                    self.err(l.span(), format!("{key}.listen"), m);
                    None
                }
            },
        };
        let to = match &r.to {
            None => {
                self.err(
                    span,
                    format!("{key}.to"),
                    "missing; expected wss://HOST:PORT/pipes/NAME",
                );
                None
            }
            Some(t) => match crate::client::parse_pipe_url(t.get_ref()) {
                Ok(u) => Some(u),
                Err(m) => {
                    self.err(t.span(), format!("{key}.to"), m);
                    None
                }
            },
        };
        let socket_mode = match &r.socket_mode {
            None => DEFAULT_SOCKET_MODE,
            Some(m) => match units::parse_mode(m.get_ref()) {
                Ok(v) => v,
                Err(e) => {
                    self.err(m.span(), format!("{key}.socket_mode"), e);
                    DEFAULT_SOCKET_MODE
                }
            },
        };
        if r.cert.is_some() != r.key.is_some() {
            let s = r
                .cert
                .as_ref()
                .or(r.key.as_ref())
                .map(|s| s.span())
                .unwrap_or_default();
            self.err(s, format!("{key}.cert"), "cert and key go together");
        }
        self.forward_kind_rules(&r, &key, listen.as_ref(), to.as_ref());
        let credentials = crate::client::CredentialPaths {
            ca: r.ca.map(|s| s.into_inner()),
            cert: r.cert.map(|s| s.into_inner()),
            key: r.key.map(|s| s.into_inner()),
            token_file: r.token_file.map(|s| s.into_inner()),
            token: None,
            owner: None,
            per_user: [false; 4],
        };
        let is_npipe = matches!(listen, Some(EndpointSpec::Npipe(_)));
        let query_mode = to
            .as_ref()
            .and_then(|u| crate::tunnel::protocol::SessionQuery::parse(u.query()).ok())
            .and_then(|q| q.mode)
            .unwrap_or(Mode::Byte);
        let npipe_eof = self.npipe_eof(r.npipe_eof.as_ref(), &key, is_npipe, query_mode);
        let max_instances = match &r.max_instances {
            None => 255,
            Some(v) => {
                if !is_npipe {
                    self.err(
                        v.span(),
                        format!("{key}.max_instances"),
                        "applies to forwards with listen = \"npipe:NAME\" only",
                    );
                }
                self.count(v, &format!("{key}.max_instances"), 255)
                    .map(|v| v as u32)
                    .unwrap_or(255)
            }
        };
        if let Some(sd) = &r.security_descriptor {
            if !is_npipe {
                self.err(
                    sd.span(),
                    format!("{key}.security_descriptor"),
                    "applies to forwards with listen = \"npipe:NAME\" only",
                );
            } else {
                #[cfg(windows)]
                if let Err(m) = crate::endpoint::windows::check_sddl(sd.get_ref()) {
                    self.err(sd.span(), format!("{key}.security_descriptor"), m);
                }
            }
        }
        Some(ForwardConfig {
            max_instances,
            security_descriptor: r.security_descriptor.map(|s| s.into_inner()),
            npipe_eof,
            listen: listen?,
            to: to?,
            credentials,
            socket_owner: r.socket_owner.map(|s| s.into_inner()),
            socket_group: r.socket_group.map(|s| s.into_inner()),
            socket_mode,
            allow_local: r.allow_local.into_iter().map(|s| s.into_inner()).collect(),
            keepalive: (DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT),
            http2: r.http2.unwrap_or(true),
        })
    }
}

impl Validator<'_> {
    /// What a forward's kind of listener needs, judged here so that `check-config` says
    /// it (not only `serve`, when binding): a `fifo:` forward is one-way and has no
    /// local caller (FIFOs name none) for `allow_local` or `{user}`; a `seqpacket:`
    /// forward carries messages; `socket_owner` and `socket_group` name existing
    /// accounts.
    fn forward_kind_rules(
        &mut self,
        r: &RawForward,
        key: &str,
        listen: Option<&EndpointSpec>,
        to: Option<&hyper::Uri>,
    ) {
        let query = to.and_then(|u| crate::tunnel::protocol::SessionQuery::parse(u.query()).ok());
        let to_span = r.to.as_ref().map(|t| t.span()).unwrap_or_default();
        match listen {
            Some(EndpointSpec::Fifo(_)) => {
                let one_way = matches!(
                    query.as_ref().and_then(|q| q.direction),
                    Some(Direction::In | Direction::Out)
                );
                if to.is_some() && !one_way {
                    self.err(
                        to_span,
                        format!("{key}.to"),
                        "a fifo: forward is one-way: give ?direction=in (local writers feed the remote pipe) or ?direction=out (the remote pipe feeds local readers)",
                    );
                }
                if let Some(first) = r.allow_local.first() {
                    self.err(
                        first.span(),
                        format!("{key}.allow_local"),
                        "a fifo: forward has no local caller to judge (a FIFO does not say who opened it); remove allow_local",
                    );
                }
                for (field, v) in [
                    ("ca", &r.ca),
                    ("cert", &r.cert),
                    ("key", &r.key),
                    ("token_file", &r.token_file),
                ] {
                    if let Some(v) = v.as_ref().filter(|v| v.get_ref().contains("{user}")) {
                        self.err(
                            v.span(),
                            format!("{key}.{field}"),
                            "{user} names the local caller, and a fifo: forward has none",
                        );
                    }
                }
            }
            Some(EndpointSpec::Seqpacket(_)) => {
                if let Some(m) = query.as_ref().and_then(|q| q.mode) {
                    if m != Mode::Message {
                        self.err(
                            to_span,
                            format!("{key}.to"),
                            "a seqpacket: forward needs a message-mode pipe (mode=message)",
                        );
                    }
                }
            }
            _ => {}
        }
        // The same lookups the bind makes (a number, else the user database).
        #[cfg(unix)]
        {
            type Lookup = fn(&str) -> Result<(), String>;
            let checks: [(&str, &Option<S<String>>, Lookup); 2] = [
                ("socket_owner", &r.socket_owner, |n| {
                    crate::client::lookup_user(n).map(drop)
                }),
                ("socket_group", &r.socket_group, |n| {
                    crate::client::lookup_group(n).map(drop)
                }),
            ];
            for (field, v, lookup) in checks {
                if let Some(v) = v {
                    if let Err(e) = lookup(v.get_ref()) {
                        self.err(v.span(), format!("{key}.{field}"), e);
                    }
                }
            }
        }
    }
}

/// Whether `s` is a valid pipe or identity name: `[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}`.
pub fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0] != b'.'
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let hi = hex_digit(pair[0])?;
        let lo = hex_digit(pair[1])?;
        out[i] = hi << 4 | lo;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(Path::new("test.toml"), text)
    }

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:0"
[tls]
cert = "s.pem"
key = "s.key"
client_ca = "ca.pem"
[[identity]]
name = "alice"
cert_cn = "alice"
groups = ["ops"]
"#;

    #[test]
    #[cfg(unix)] // unix: endpoints and uid principals
    fn minimal_pipe_parses() {
        let cfg = parse(&format!(
            "{BASE}\n[[pipe]]\nname = \"echo\"\nendpoint = \"unix:/tmp/x.sock\"\nallow = [\"@ops\"]\nrun_as = \"gateway\"\n"
        ))
        .unwrap();
        let p = cfg.pipe("echo").unwrap();
        assert_eq!(p.direction, Direction::Duplex);
        assert_eq!(p.mode, Mode::Byte);
        assert_eq!(p.max_instances, DEFAULT_MAX_INSTANCES);
        assert_eq!(p.allow, vec![AllowRule::Group("ops".into())]);
        assert_eq!(cfg.limits.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
    }

    #[test]
    fn a_token_or_certificate_fields_of_two_identities_are_refused() {
        let hash = "a".repeat(64);
        // (BASE's alice: cert_cn = "alice".)
        let text = format!(
            "{BASE}[[identity]]\nname = \"alice2\"\ncert_cn = \"alice\"\n\
             [[identity]]\nname = \"bot1\"\ntoken_sha256 = \"{hash}\"\n\
             [[identity]]\nname = \"bot2\"\ntoken_sha256 = \"sha256:{hash}\"\n\
             [[identity]]\nname = \"uri1\"\ncert_san_uri = \"spiffe://x\"\ncert_cn = \"alice\"\n\
             [[identity]]\nname = \"dns1\"\ncert_cn = \"carol\"\ncert_san_dns = \"c.example\"\n\
             [[identity]]\nname = \"dns2\"\ncert_cn = \"carol\"\n\
             [[identity]]\nname = \"dns3\"\ncert_san_dns = \"c.example\"\n"
        );
        let errs = parse(&text).unwrap_err().0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        // Refused: the same fields (alice2), the same token (bot2), more fields than an
        // earlier identity's, all of which match it (uri1). Not: fewer fields than an
        // earlier one's (dns2, dns3: a certificate of carol without c.example, or of
        // c.example without carol, reaches them).
        assert_eq!(
            keys,
            [
                "identity \"alice2\".cert_cn",
                "identity \"bot2\".token_sha256",
                "identity \"uri1\".cert_cn"
            ],
            "{errs:?}"
        );
        assert!(errs[0].message.contains("identity \"alice\""), "{errs:?}");
        assert!(errs[1].message.contains("identity \"bot1\""), "{errs:?}");
        assert!(
            !errs[1].message.contains(&hash),
            "the hash is not repeated: {errs:?}"
        );
        assert!(errs[2].message.contains("identity \"alice\""), "{errs:?}");
    }

    #[test]
    #[cfg(unix)] // unix: and fifo: endpoints
    fn duplicates_are_refused_and_names_are_looked_up_among_many() {
        // Pipes and identities by the thousand: found by name (an index, not a scan).
        let mut text = String::from(BASE);
        for i in 0..3000 {
            text += &format!("[[identity]]\nname = \"id{i}\"\ncert_cn = \"id{i}\"\n");
        }
        for i in 0..3000 {
            text += &format!(
                "[[pipe]]\nname = \"p{i}\"\nendpoint = \"unix:/tmp/p{i}.sock\"\nallow = [\"id{i}\", \"@ops\"]\nrun_as = \"gateway\"\n"
            );
        }
        let cfg = parse(&text).unwrap();
        assert_eq!(cfg.pipe("p2999").unwrap().name, "p2999");
        assert_eq!(
            cfg.pipe("p17").unwrap().allow[0],
            AllowRule::Identity("id17".into())
        );
        assert!(cfg.pipe("p3000").is_none());
        assert_eq!(
            cfg.identity("id1234").unwrap().cert_cn.as_deref(),
            Some("id1234")
        );
        assert!(cfg.identity("nobody").is_none());
        // The lists are public: changed after load, lookups stay right.
        let mut changed = cfg.clone();
        changed.pipes.remove(0);
        assert_eq!(changed.pipe("p2999").unwrap().name, "p2999");
        assert!(changed.pipe("p0").is_none());
        // (Where the index now names another pipe: found by the scan.)
        assert_eq!(changed.pipe("p1").unwrap().name, "p1");

        // A second identity or pipe of one name, and a second forward of one file (of
        // any kind), each name the line and key of the later one.
        let text = format!(
            "{BASE}[[identity]]\nname = \"alice\"\ncert_cn = \"a2\"\n\
             [[pipe]]\nname = \"echo\"\nendpoint = \"unix:/tmp/e.sock\"\nallow = [\"alice\"]\nrun_as = \"gateway\"\n\
             [[pipe]]\nname = \"echo\"\nendpoint = \"unix:/tmp/f.sock\"\nallow = [\"alice\"]\nrun_as = \"gateway\"\n\
             [[forward]]\nlisten = \"unix:/tmp/fw.sock\"\nto = \"wss://h:1/pipes/x\"\ntoken_file = \"/tmp/t\"\n\
             [[forward]]\nlisten = \"fifo:/tmp/fw.sock\"\nto = \"wss://h:1/pipes/y?direction=in\"\ntoken_file = \"/tmp/t\"\n"
        );
        let errs = parse(&text).unwrap_err().0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "identity \"alice\".name",
                "pipe \"echo\".name",
                "forward[1].listen"
            ],
            "{errs:?}"
        );
        let line = |needle: &str| text.lines().position(|l| l.contains(needle)).map(|i| i + 1);
        assert_eq!(errs[0].line, line("cert_cn = \"a2\"").map(|l| l - 1));
        assert_eq!(errs[1].line, line("/tmp/f.sock").map(|l| l - 1));
        assert_eq!(errs[2].line, line("fifo:/tmp/fw.sock"));
        assert!(errs[2].message.contains("already hosts"), "{}", errs[2]);
    }

    #[test]
    fn tuning_busy_poll_defaults_parses_and_refuses_bad_values() {
        let cfg = parse(BASE).unwrap();
        assert_eq!(cfg.tuning.busy_poll, None, "off by default");
        for (v, want) in [
            ("off", None),
            ("50us", Some(Duration::from_micros(50))),
            ("1ms", Some(Duration::from_millis(1))),
            ("10ms", Some(MAX_BUSY_POLL)),
        ] {
            let cfg = parse(&format!("{BASE}[tuning]\nbusy_poll = \"{v}\"\n")).unwrap();
            assert_eq!(cfg.tuning.busy_poll, want, "{v}");
        }
        for (v, says) in [
            ("11ms", "must be \"off\" or at most 10000us"),
            ("0us", "use \"off\" to disable"),
            ("fast", "invalid duration"),
            ("5ns", "the unit must be us, ms, s, m, h or d"),
        ] {
            let text = format!("{BASE}[tuning]\nbusy_poll = \"{v}\"\n");
            let errs = parse(&text).unwrap_err().0;
            assert_eq!(errs.len(), 1, "{v}: {errs:?}");
            assert_eq!(errs[0].key, "tuning.busy_poll");
            assert_eq!(errs[0].line, Some(text.lines().count()), "{v}");
            assert!(errs[0].message.contains(says), "{v}: {}", errs[0]);
        }
    }

    #[test]
    fn keepalive_of_zero_is_refused() {
        for (k, says) in [
            ("interval", "a ping at every turn"),
            ("timeout", "every session would end at once"),
        ] {
            let text = format!("{BASE}[keepalive]\n{k} = \"0s\"\n");
            let errs = parse(&text).unwrap_err().0;
            assert_eq!(errs.len(), 1, "{k}: {errs:?}");
            assert_eq!(errs[0].key, format!("keepalive.{k}"));
            assert!(errs[0].message.contains(says), "{k}: {}", errs[0]);
        }
        let cfg = parse(&format!(
            "{BASE}[keepalive]\ninterval = \"1s\"\ntimeout = \"1s\"\n"
        ))
        .unwrap();
        assert_eq!(cfg.keepalive.interval, Duration::from_secs(1));
    }

    #[test]
    fn errors_name_line_and_key_and_are_all_reported() {
        let text = format!(
            "{BASE}\n[[pipe]]\nname = \"a/b\"\nendpoint = \"bogus:x\"\nallow = [\"bob\"]\nrun_as = \"gateway\"\n"
        );
        let errs = parse(&text).unwrap_err().0;
        assert_eq!(errs.len(), 3, "{errs:?}");
        let name_line = text.lines().position(|l| l.contains("a/b")).unwrap() + 1;
        assert_eq!(errs[0].line, Some(name_line));
        assert!(errs[0].to_string().starts_with("test.toml:"), "{}", errs[0]);
        assert!(errs.iter().any(|e| e.key.ends_with(".endpoint")));
        assert!(errs
            .iter()
            .any(|e| e.message.contains("unknown identity \"bob\"")));
    }

    #[test]
    #[cfg(unix)] // unix: endpoints and uid principals
    fn run_as_client_needs_a_principal() {
        let errs = parse(&format!(
            "{BASE}\n[[pipe]]\nname = \"echo\"\nendpoint = \"unix:/tmp/x.sock\"\nallow = [\"@ops\"]\n"
        ))
        .unwrap_err()
        .0;
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].message.contains("identity alice has none"),
            "{}",
            errs[0]
        );
        let ok = parse(&format!(
            "{BASE}user = \"root\"\n[[pipe]]\nname = \"echo\"\nendpoint = \"unix:/tmp/x.sock\"\nallow = [\"alice\"]\n"
        ))
        .unwrap();
        assert_eq!(ok.identities[0].principal.as_ref().unwrap().uid, 0);
        let fixed = parse(&format!(
            "{BASE}\n[[pipe]]\nname = \"echo\"\nendpoint = \"unix:/tmp/x.sock\"\nallow = [\"alice\"]\nrun_as = \"user:nobody\"\n"
        ))
        .unwrap();
        assert!(matches!(&fixed.pipes[0].run_as, RunAs::User(p) if p.name == "nobody"));
        let bad = parse(&format!(
            "{BASE}\n[[pipe]]\nname = \"echo\"\nendpoint = \"unix:/tmp/x.sock\"\nallow = [\"alice\"]\nrun_as = \"user:no-such-user-pb\"\n"
        ))
        .unwrap_err();
        assert!(bad.to_string().contains("no such user"), "{bad}");
    }

    #[test]
    fn unknown_key_is_a_syntax_error_with_line() {
        let errs = parse(&format!("{BASE}\nbogus_key = 1\n")).unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.contains("bogus_key"), "{}", errs[0]);
        assert!(errs[0].line.is_some());
        assert_eq!(errs[0].key, "identity[0].bogus_key");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_key() {
        for (tail, key) in [
            ("[limits]\nmax_sessions = \"100\"\n", "limits.max_sessions"),
            (
                "[[pipe]]\nname = \"a\"\nendpoint = \"unix:/a\"\nallow = [\"alice\"]\n\
                 [[pipe]]\nname = \"b\"\nendpoint = \"unix:/b\"\nallow = [\n  \"alice\",\n  5,\n]\n",
                "pipe[1].allow",
            ),
            ("[[pipe]\nname = \"c\"\n", "(syntax)"),
            ("[limits]\nmax_sessions = 5\nhandshake 10s\n", "(syntax)"),
            // Brackets in a string or a comment open no array.
            ("[[pipe]]\nname = \"a[b\"\nendpoint 5\n", "(syntax)"),
            ("[[pipe]]\nname = \"a\" # [\nendpoint 5\n", "(syntax)"),
            (
                "[[pipe]]\nname = \"a\"\nendpoint = \"unix:/a\"\nallow = [ # ]\n  \"x]\",\n  5,\n]\n",
                "pipe[0].allow",
            ),
        ] {
            let text = format!("{BASE}{tail}");
            let errs = parse(&text).unwrap_err().0;
            assert_eq!(errs.len(), 1, "{key}: {errs:?}");
            assert_eq!(errs[0].key, key, "{}", errs[0]);
        }
    }

    #[test]
    fn token_hashes() {
        let ok = parse(&format!(
            "{BASE}\n[[identity]]\nname = \"t\"\ntoken_sha256 = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n"
        ))
        .unwrap();
        assert_eq!(ok.identities[1].token_sha256.unwrap()[0], 0x9f);
        let bad = parse(&format!(
            "{BASE}\n[[identity]]\nname = \"t\"\ntoken_sha256 = \"XYZ\"\n"
        ));
        assert!(bad.unwrap_err().to_string().contains("64 lowercase hex"));
    }

    #[test]
    fn valid_names() {
        assert!(valid_name("docker"));
        assert!(valid_name("a.b-c_d"));
        assert!(valid_name("-x"));
        assert!(!valid_name(".x"));
        assert!(!valid_name(".."));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a%2Fb"));
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(129)));
        assert!(valid_name(&"a".repeat(128)));
    }
}
