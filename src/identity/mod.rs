//! Identity → principal: which local account a session's endpoint is opened as. The
//! decision ([`session_principal`]) is pure and table-tested; resolving user names goes
//! through the system user database once, at config load. The credential switch itself
//! lives in [`unix`], a small separate piece of audited unsafe code.

#[cfg(unix)]
pub mod unix;
#[cfg(unix)]
pub use unix::{resolve, resolve_user};

#[cfg(windows)]
pub mod windows;
#[cfg(windows)]
pub use windows::{exec_as, resolve, resolve_user};

use std::path::PathBuf;

use crate::config::{IdentityConfig, PipeConfig, RunAs};

/// Makes `cmd`'s child run as `p` (Unix: groups, gid, uid switched before exec).
#[cfg(unix)]
pub fn exec_as(
    cmd: &mut tokio::process::Command,
    p: &Principal,
) -> Result<(), crate::endpoint::OpenError> {
    unix::exec_as(cmd, p);
    Ok(())
}

/// A local account: user id, primary group, supplementary groups, and the name and home
/// directory for `exec:` children (`USER`, `HOME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub groups: Vec<u32>,
    /// User name (the uid as text when the database has none).
    pub name: String,
    /// Home directory (`/` when unknown).
    pub home: PathBuf,
}

/// Why a session may not be opened as anyone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// `run_as = "client"` but the identity maps to no local account.
    #[error("identity {0:?} has no local principal, required by run_as = \"client\"")]
    NoPrincipal(String),
}

/// Whose rights open `pipe` for `identity`: `None` means the gateway's own (only when
/// the pipe says `run_as = "gateway"`). Pure.
pub fn session_principal(
    pipe: &PipeConfig,
    identity: &IdentityConfig,
) -> Result<Option<Principal>, Denied> {
    match &pipe.run_as {
        RunAs::Gateway => Ok(None),
        RunAs::User(p) => Ok(Some(p.clone())),
        RunAs::Client => identity
            .principal
            .clone()
            .map(Some)
            .ok_or_else(|| Denied::NoPrincipal(identity.name.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Direction, MessageSize, Mode};
    use crate::endpoint::EndpointSpec;

    fn principal(uid: u32) -> Principal {
        Principal {
            uid,
            gid: uid,
            groups: vec![uid + 1],
            name: format!("u{uid}"),
            home: "/".into(),
        }
    }

    fn pipe(run_as: RunAs) -> PipeConfig {
        PipeConfig {
            name: "p".into(),
            endpoint: EndpointSpec::Unix("/x".into()),
            allow: vec![],
            run_as,
            direction: Direction::Duplex,
            mode: Mode::Byte,
            max_instances: 1,
            max_message_size: MessageSize::Auto,
            env: Default::default(),
            cwd: None,
            npipe_eof: Default::default(),
        }
    }

    fn ident(p: Option<Principal>) -> IdentityConfig {
        IdentityConfig {
            name: "alice".into(),
            cert_cn: Some("alice".into()),
            cert_san_uri: None,
            cert_san_dns: None,
            token_sha256: None,
            token_sha256_file: None,
            groups: vec![],
            principal: p,
        }
    }

    #[test]
    fn table() {
        let a = principal(1000);
        let fixed = principal(2000);
        type Case = (RunAs, Option<Principal>, Result<Option<Principal>, Denied>);
        let cases: Vec<Case> = vec![
            (RunAs::Gateway, Some(a.clone()), Ok(None)),
            (RunAs::Gateway, None, Ok(None)),
            (RunAs::Client, Some(a.clone()), Ok(Some(a.clone()))),
            (
                RunAs::Client,
                None,
                Err(Denied::NoPrincipal("alice".into())),
            ),
            (RunAs::User(fixed.clone()), None, Ok(Some(fixed.clone()))),
            (
                RunAs::User(fixed.clone()),
                Some(a.clone()),
                Ok(Some(fixed.clone())),
            ),
        ];
        for (run_as, p, want) in cases {
            assert_eq!(
                session_principal(&pipe(run_as.clone()), &ident(p.clone())),
                want,
                "{run_as:?} {p:?}"
            );
        }
    }

    #[test]
    #[cfg(unix)]
    fn resolves_system_users() {
        use crate::config::PrincipalSpec;
        let root = resolve_user("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(resolve_user("no-such-user-pipebridge").is_err());
        let ids = resolve(&PrincipalSpec::Ids {
            uid: 54321,
            gid: 54321,
            gids: vec![7],
        })
        .unwrap();
        assert_eq!(
            (ids.uid, ids.gid, ids.groups.clone(), ids.name.as_str()),
            (54321, 54321, vec![7], "54321")
        );
    }
}
