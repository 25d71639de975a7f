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

/// Spawns the child of an `exec:` pipe for one session.
pub fn spawn(argv: &[String], pipe: &PipeConfig, ctx: &OpenContext) -> Result<Local, OpenError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(OpenError::new(
            "the local endpoint could not be opened",
            "exec: empty argv",
        ));
    };
    let (user, home) = match &ctx.principal {
        Some(p) => (p.name.clone(), p.home.clone()),
        None => crate::platform::current_user(),
    };
    let cwd = pipe
        .cwd
        .clone()
        .or_else(|| Some(home.clone()).filter(|h| h.is_dir()))
        .unwrap_or_else(|| PathBuf::from("/"));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(crate::platform::child_base_env())
        .env("HOME", &home)
        .env("USER", &user)
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
        crate::identity::exec_as(&mut cmd, p)?;
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
    let writer = child.stdin.take().map(|s| {
        // At once, not after the event loop's next turn (unix: `eager`).
        #[cfg(unix)]
        let s = super::eager::EagerWrite::new(s);
        Writer::Bytes(Box::new(s) as BoxWrite)
    });
    Ok(Local {
        reader,
        writer,
        child: Some(child),
        hangup: None,
    })
}
