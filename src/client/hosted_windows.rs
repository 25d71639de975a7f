//! Hosted forward endpoints on Windows: the gateway is the server of `\\.\pipe\NAME`
//! (`listen = "npipe:NAME"`). The next instance is created before a connected one is
//! handed to its session; local callers are identified from their process token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{accept_failed, client_message_limit, spawn_session, ForwardSettings};
use crate::config::{Direction, ForwardConfig, Mode};
use crate::endpoint::windows::{self, PipeOptions, PipeServer, ServerOptions};
use crate::endpoint::EndpointSpec;
use crate::identity::windows::{pipe_caller, PipeCaller};
use crate::tunnel::protocol;

/// A local caller of a hosted pipe: its process and account.
#[derive(Debug, Clone)]
pub struct LocalCaller(PipeCaller);

fn bare(account: &str) -> &str {
    account.rsplit('\\').next().unwrap_or(account)
}

fn same_account(rule: &str, account: &str) -> bool {
    if rule.contains('\\') {
        rule.eq_ignore_ascii_case(account)
    } else {
        rule.eq_ignore_ascii_case(bare(account))
    }
}

impl LocalCaller {
    /// Whether `rules` (`allow_local`: account names, `DOMAIN\NAME`, `@group`) admit
    /// this caller. A caller whose account could not be read matches nothing. Its account
    /// and groups were read when it was accepted, on the blocking pool.
    /// Never an error (the Unix side's lookups can fail).
    pub async fn admitted(&self, rules: &[String]) -> Result<bool, String> {
        let Some(user) = &self.0.user else {
            return Ok(false);
        };
        Ok(rules.iter().any(|r| match r.strip_prefix('@') {
            Some(g) => self.0.groups.iter().any(|have| same_account(g, have)),
            None => same_account(r, user),
        }))
    }

    /// The caller's account name without its domain (for `{user}` in credential paths;
    /// `None`: it could not be read). Never an error.
    pub async fn name(&self) -> Result<Option<String>, String> {
        Ok(self.0.user.as_deref().map(|u| bare(u).to_string()))
    }
}

impl std::fmt::Display for LocalCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0.user {
            Some(u) => write!(f, "pid {} ({u})", self.0.pid),
            None => write!(f, "pid {}", self.0.pid),
        }
    }
}

/// Most callers' account lookups running at once, gateway-wide (as on Unix).
const MAX_LOOKUPS: usize = 16;

/// A running forward.
pub struct Forward {
    server: PipeServer,
    path: PathBuf,
    settings: Arc<ForwardSettings>,
    opts: PipeOptions,
}

impl Forward {
    /// Creates the first pipe instance (fails at start, not at first use).
    pub async fn bind(fwd: ForwardConfig) -> Result<Forward, String> {
        let EndpointSpec::Npipe(name) = &fwd.listen else {
            return Err(format!(
                "cannot host {} endpoints on Windows",
                fwd.listen.kind()
            ));
        };
        let path = PathBuf::from(windows::pipe_path(name));
        let ctx = |e: &dyn std::fmt::Display| format!("forward {}: {e}", path.display());
        let query = protocol::SessionQuery::parse(fwd.to.query()).map_err(|e| ctx(&e))?;
        let mode = query.mode.unwrap_or(Mode::Byte);
        let direction = query.direction.unwrap_or(Direction::Duplex);
        let server = PipeServer::bind(
            name,
            ServerOptions {
                mode,
                direction,
                max_instances: fwd.max_instances,
                security_descriptor: fwd
                    .security_descriptor
                    .clone()
                    .unwrap_or_else(|| windows::DEFAULT_SDDL.to_string()),
                eof: fwd.npipe_eof,
            },
        )
        .map_err(|e| ctx(&e))?;
        // The bridge's reader is local → network, which for a forward is the remote
        // session's `in` direction: flip the remote direction into the local one.
        let local_direction = match direction {
            Direction::In => Direction::Out,
            Direction::Out => Direction::In,
            Direction::Duplex => Direction::Duplex,
        };
        let opts = PipeOptions {
            mode,
            direction: local_direction,
            max_message: client_message_limit(),
            eof: fwd.npipe_eof,
        };
        Ok(Forward {
            server,
            path,
            settings: ForwardSettings::new(fwd, Vec::new()),
            opts,
        })
    }

    /// Its settings, which a reload may replace ([`ForwardSettings::replace`]).
    pub fn settings(&self) -> Arc<ForwardSettings> {
        self.settings.clone()
    }

    /// The hosted pipe's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts local callers until `shutdown`; each becomes a session to `to`.
    pub async fn run(self, shutdown: CancellationToken, tracker: TaskTracker) {
        let Forward {
            mut server,
            path,
            settings,
            opts,
        } = self;
        info!(listen = %path.display(), to = %settings.get().0.to, "forward ready");
        while let Some(r) = server.accept(&shutdown).await {
            match r {
                Ok(inst) => {
                    let (fwd, target) = settings.get();
                    let with_groups = fwd.allow_local.iter().any(|r| r.starts_with('@'));
                    let sessions = tracker.clone();
                    // Token lookups may reach a domain controller: off the async workers,
                    // and in a task of the caller's own, so that a slow one holds only that
                    // caller, never the accepting of the next; at most `MAX_LOOKUPS` at once,
                    // gateway-wide, so slow ones never fill the blocking pool.
                    tracker.spawn(async move {
                        static LOOKUPS: tokio::sync::Semaphore =
                            tokio::sync::Semaphore::const_new(MAX_LOOKUPS);
                        let Ok(_turn) = LOOKUPS.acquire().await else {
                            return;
                        };
                        let looked_up = tokio::task::spawn_blocking(move || {
                            let caller = pipe_caller(inst.handle(), with_groups).map(LocalCaller);
                            (inst, caller)
                        })
                        .await;
                        let Ok((inst, caller)) = looked_up else {
                            warn!("identifying the pipe's caller failed; closing the instance");
                            return;
                        };
                        match windows::local_instance(inst, opts) {
                            Ok(local) => {
                                spawn_session(&sessions, &fwd, &target, local, caller);
                            }
                            Err(e) => {
                                warn!(error = %e, "cannot set up the connected pipe instance")
                            }
                        }
                    });
                }
                Err(e) => accept_failed(e).await,
            }
        }
    }
}
