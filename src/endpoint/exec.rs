//! `exec:` endpoints: one child per session whose stdin/stdout are anonymous pipes. The
//! environment is scrubbed (DESIGN.md), stderr goes to the gateway log inside the session
//! span, and the child is killed when the session ends (kill-on-drop; tokio reaps it).

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::AsyncBufReadExt;
use tokio::process::Command;
use tracing::Instrument;

use super::{BoxRead, BoxWrite, Local, OpenContext, OpenError, Reader, Writer};
use crate::config::PipeConfig;

/// The child's `PATH`.
pub const CHILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Spawns the child of an `exec:` pipe for one session.
pub fn spawn(argv: &[String], pipe: &PipeConfig, ctx: &OpenContext) -> Result<Local, OpenError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(OpenError::new(
            "the local endpoint could not be opened",
            "exec: empty argv",
        ));
    };
    let (home, user) = match &ctx.principal {
        Some(p) => (p.home.clone(), p.name.clone()),
        None => match nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
        {
            Some(u) => (u.dir, u.name),
            None => (PathBuf::from("/"), nix::unistd::geteuid().to_string()),
        },
    };
    let cwd = pipe
        .cwd
        .clone()
        .or_else(|| Some(home.clone()).filter(|h| h.is_dir()))
        .unwrap_or_else(|| PathBuf::from("/"));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", CHILD_PATH)
        .env("HOME", &home)
        .env("USER", &user)
        .env("LANG", "C.UTF-8")
        .envs(&pipe.env)
        .env("PIPEBRIDGE_IDENTITY", &ctx.identity)
        .env("PIPEBRIDGE_PIPE", &pipe.name)
        .current_dir(&cwd)
        .stdin(if ctx.direction.client_writes() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(if ctx.direction.client_reads() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(p) = &ctx.principal {
        crate::identity::unix::exec_as(&mut cmd, p);
    }
    let mut child = cmd.spawn().map_err(|e| {
        OpenError::new(
            "the local endpoint could not be started",
            format!("exec {program:?}: {e}"),
        )
    })?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(
            async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(target: "pipebridge::exec", stderr = %line);
                }
            }
            .in_current_span(),
        );
    }
    let reader = child
        .stdout
        .take()
        .map(|s| Reader::Bytes(Box::new(s) as BoxRead));
    let writer = child
        .stdin
        .take()
        .map(|s| Writer::Bytes(Box::new(s) as BoxWrite));
    Ok(Local {
        reader,
        writer,
        child: Some(child),
    })
}
