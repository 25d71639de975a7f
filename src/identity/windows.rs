//! Accounts and impersonation on Windows.
//!
//! - **Principals** are Windows account names (`user = "NAME"` or `"DOMAIN\\NAME"`);
//!   numeric uid/gid principals are Unix ids and a config error here.
//! - **Opening a pipe as the principal** (`run_as = "client"` or `"user:NAME"` on an
//!   `npipe:` pipe) needs an access token for that account without its password: an S4U
//!   logon (`LsaLogonUser` with `MSV1_0_S4U_LOGON`, the way services act for a user). The
//!   token is usable for opening objects only when the gateway holds SeTcbPrivilege (runs
//!   as LocalSystem); without it Windows hands out an identification-level token and the
//!   open fails. Either way a failure refuses the session (502): the gateway never opens
//!   the pipe with its own rights instead. The open runs on a blocking worker thread that
//!   impersonates with `ImpersonateLoggedOnUser` and reverts with `RevertToSelf`; if the
//!   revert cannot be verified (the thread still has a token) the process aborts.
//! - **Local callers of a hosted pipe** are identified from the token they presented on
//!   the pipe (`ImpersonateNamedPipeClient` + `OpenThreadToken` on a blocking-pool thread,
//!   reverted and verified at once), else from the client process's token
//!   (`GetNamedPipeClientProcessId`, `OpenProcessToken`); `TokenUser` and the enabled,
//!   non-deny-only `TokenGroups` give the account and groups for `allow_local`.
//!
//! Under Wine (the CI) every call here returns, but Wine has one user and does not enforce
//! tokens or DACLs: what the tests show is that the code paths run and fail closed, not
//! what a real Windows access check decides.
#![allow(unsafe_code)]

use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::path::PathBuf;

use windows_sys::Win32::Foundation::{GetLastError, ERROR_NO_TOKEN, HANDLE, LUID};
use windows_sys::Win32::Security::Authentication::Identity::{
    LsaConnectUntrusted, LsaDeregisterLogonProcess, LsaFreeReturnBuffer, LsaLogonUser,
    LsaLookupAuthenticationPackage, MsV1_0S4ULogon, LSA_STRING, LSA_UNICODE_STRING,
    MSV1_0_S4U_LOGON, SECURITY_LOGON_TYPE,
};
use windows_sys::Win32::Security::{
    AllocateLocallyUniqueId, GetTokenInformation, ImpersonateLoggedOnUser, LookupAccountSidW,
    RevertToSelf, TokenGroups, TokenUser, PSID, QUOTA_LIMITS, SID_AND_ATTRIBUTES, TOKEN_QUERY,
    TOKEN_SOURCE,
};
use windows_sys::Win32::System::Pipes::ImpersonateNamedPipeClient;
use windows_sys::Win32::System::Threading::{
    GetCurrentThread, OpenProcess, OpenProcessToken, OpenThreadToken,
    PROCESS_QUERY_LIMITED_INFORMATION,
};

use super::Principal;
use crate::config::PrincipalSpec;
use crate::endpoint::OpenError;

/// `SE_GROUP_ENABLED` and `SE_GROUP_USE_FOR_DENY_ONLY` (winnt.h; declared here to keep
/// windows-sys' large SystemServices module out of the build).
const SE_GROUP_ENABLED: i32 = 0x4;
const SE_GROUP_USE_FOR_DENY_ONLY: i32 = 0x10;

/// Resolves a principal spec: Windows accounts are names.
pub fn resolve(spec: &PrincipalSpec) -> Result<Principal, String> {
    match spec {
        PrincipalSpec::User(name) => resolve_user(name),
        PrincipalSpec::Ids { .. } => {
            Err("uid/gid/gids are Unix ids; on Windows give the account as user = \"NAME\"".into())
        }
    }
}

/// A principal for a Windows account name. The account is looked up when a session is
/// opened as it (the S4U logon), not at load: a domain may be unreachable at start.
pub fn resolve_user(name: &str) -> Result<Principal, String> {
    if name.is_empty() || name.contains('\0') {
        return Err(format!("invalid account name {name:?}"));
    }
    Ok(Principal {
        uid: 0,
        gid: 0,
        groups: Vec::new(),
        name: name.to_string(),
        home: PathBuf::from(format!(
            "{}\\",
            std::env::var("SystemDrive").unwrap_or_else(|_| "C:".into())
        )),
    })
}

/// `exec:` children as another account need `CreateProcessAsUser`, which this build does
/// not do; config validation already refuses it, and this refuses again (fail closed).
pub fn exec_as(_cmd: &mut tokio::process::Command, p: &Principal) -> Result<(), OpenError> {
    Err(OpenError::new(
        "the local endpoint could not be started",
        format!(
            "exec: as {:?} is not supported on Windows builds (run_as = \"gateway\" only)",
            p.name
        ),
    ))
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().collect()
}

fn lsa_string(s: &'static [u8]) -> LSA_STRING {
    LSA_STRING {
        Length: s.len() as u16,
        MaximumLength: s.len() as u16,
        Buffer: s.as_ptr() as *mut u8,
    }
}

fn nt_error(what: &str, status: i32) -> io::Error {
    io::Error::other(format!("{what} failed: NTSTATUS {:#010x}", status as u32))
}

/// An LSA connection, deregistered on drop.
struct Lsa(HANDLE);

impl Drop for Lsa {
    fn drop(&mut self) {
        // SAFETY: the handle came from LsaConnectUntrusted and is released once.
        unsafe { LsaDeregisterLogonProcess(self.0) };
    }
}

/// A token for `account` (`NAME`, `DOMAIN\NAME` or `NAME@DOMAIN`) by S4U logon, without
/// its password.
pub fn s4u_token(account: &str) -> io::Result<OwnedHandle> {
    // A local account's domain is the computer's name.
    let (user, domain) = match account.split_once('\\') {
        Some((d, u)) => (u.to_string(), d.to_string()),
        None => (
            account.to_string(),
            std::env::var("COMPUTERNAME").unwrap_or_else(|_| ".".to_string()),
        ),
    };
    if user.len() > 256 || domain.len() > 256 {
        return Err(io::Error::other("account or domain name too long"));
    }
    let mut lsa: HANDLE = std::ptr::null_mut();
    // SAFETY: writes the connection handle only.
    let st = unsafe { LsaConnectUntrusted(&mut lsa) };
    if st != 0 {
        return Err(nt_error("LsaConnectUntrusted", st));
    }
    let lsa = Lsa(lsa);
    let pkg_name = lsa_string(b"MICROSOFT_AUTHENTICATION_PACKAGE_V1_0");
    let mut pkg = 0u32;
    // SAFETY: `pkg_name` points at a static string; writes `pkg` only.
    let st = unsafe { LsaLookupAuthenticationPackage(lsa.0, &pkg_name, &mut pkg) };
    if st != 0 {
        return Err(nt_error("LsaLookupAuthenticationPackage", st));
    }
    // MSV1_0_S4U_LOGON followed by its two strings, in one buffer (the LSA requires the
    // strings inside the submitted buffer). u64 storage keeps the struct aligned.
    let (u, d) = (wide(&user), wide(&domain));
    let head = std::mem::size_of::<MSV1_0_S4U_LOGON>();
    let total = head + 2 * (u.len() + d.len());
    let mut buf = vec![0u64; total.div_ceil(8)];
    let base = buf.as_mut_ptr() as *mut u8;
    // SAFETY: `buf` holds `total` bytes: the struct at its start (aligned for u64, which
    // covers the struct's alignment), then `u` and `d` as UTF-16; all pointers written
    // into the struct point inside `buf`, which outlives the LsaLogonUser call.
    let logon = unsafe {
        let up = base.add(head) as *mut u16;
        std::ptr::copy_nonoverlapping(u.as_ptr(), up, u.len());
        let dp = up.add(u.len());
        std::ptr::copy_nonoverlapping(d.as_ptr(), dp, d.len());
        let s = base as *mut MSV1_0_S4U_LOGON;
        (*s).MessageType = MsV1_0S4ULogon;
        (*s).Flags = 0;
        (*s).UserPrincipalName = LSA_UNICODE_STRING {
            Length: (2 * u.len()) as u16,
            MaximumLength: (2 * u.len()) as u16,
            Buffer: up,
        };
        (*s).DomainName = LSA_UNICODE_STRING {
            Length: (2 * d.len()) as u16,
            MaximumLength: (2 * d.len()) as u16,
            Buffer: dp,
        };
        s as *const core::ffi::c_void
    };
    let origin = lsa_string(b"pipebridge");
    // SAFETY: TOKEN_SOURCE is plain data.
    let mut source: TOKEN_SOURCE = unsafe { std::mem::zeroed() };
    for (dst, src) in source.SourceName.iter_mut().zip(b"pipebrdg") {
        *dst = *src as i8;
    }
    let mut luid = LUID {
        LowPart: 0,
        HighPart: 0,
    };
    // SAFETY: writes the LUID only.
    if unsafe { AllocateLocallyUniqueId(&mut luid) } == 0 {
        return Err(last_error());
    }
    source.SourceIdentifier = luid;
    let mut profile: *mut core::ffi::c_void = std::ptr::null_mut();
    let mut profile_len = 0u32;
    let mut logon_id = LUID {
        LowPart: 0,
        HighPart: 0,
    };
    let mut token: HANDLE = std::ptr::null_mut();
    // SAFETY: QUOTA_LIMITS is plain data.
    let mut quotas: QUOTA_LIMITS = unsafe { std::mem::zeroed() };
    let mut sub = 0i32;
    // SAFETY: every pointer is valid for the call; `logon` points into `buf` (above).
    let st = unsafe {
        LsaLogonUser(
            lsa.0,
            &origin,
            SECURITY_LOGON_TYPE(3), // Network
            pkg,
            logon,
            total as u32,
            std::ptr::null(),
            &source,
            &mut profile,
            &mut profile_len,
            &mut logon_id,
            &mut token,
            &mut quotas,
            &mut sub,
        )
    };
    if !profile.is_null() {
        // SAFETY: allocated by the LSA for us.
        unsafe { LsaFreeReturnBuffer(profile) };
    }
    if st != 0 {
        return Err(nt_error(&format!("S4U logon of {account:?}"), st));
    }
    if token.is_null() {
        return Err(io::Error::other("S4U logon returned no token"));
    }
    // SAFETY: a fresh token handle we own.
    Ok(unsafe { OwnedHandle::from_raw_handle(token) })
}

/// Runs `f` on this thread while impersonating `p` (S4U token). Refuses (error) when no
/// token can be had or impersonation fails; aborts the process if the thread cannot be
/// verified back on the gateway's own token afterwards.
pub fn as_principal<T>(p: &Principal, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let token = s4u_token(&p.name).map_err(|e| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("no Windows access token for {:?}: {e}", p.name),
        )
    })?;
    // SAFETY: the token is valid; impersonation affects this thread only.
    if unsafe { ImpersonateLoggedOnUser(token.as_raw_handle()) } == 0 {
        return Err(last_error());
    }
    // Reverted when this scope ends, by return or by unwinding (the thread goes back to
    // a pool and must never keep borrowed rights).
    let _revert = Revert;
    f()
}

/// Reverts the current thread's impersonation when dropped (see [`revert_or_abort`]).
struct Revert;

impl Drop for Revert {
    fn drop(&mut self) {
        revert_or_abort();
    }
}

/// Reverts this thread to the process token and verifies it, or aborts.
fn revert_or_abort() {
    // SAFETY: no preconditions; affects this thread only.
    let ok = unsafe { RevertToSelf() } != 0;
    let mut t: HANDLE = std::ptr::null_mut();
    // SAFETY: asks for this thread's token; none must exist after a revert.
    let has_token = unsafe { OpenThreadToken(GetCurrentThread(), TOKEN_QUERY, 1, &mut t) } != 0;
    if has_token {
        // SAFETY: a handle we just received.
        drop(unsafe { OwnedHandle::from_raw_handle(t) });
    }
    // SAFETY: reads the last-error value only.
    let no_token = !has_token && unsafe { GetLastError() } == ERROR_NO_TOKEN;
    if !ok || !no_token {
        eprintln!("pipebridge: FATAL: could not revert an impersonating thread; aborting");
        std::process::abort();
    }
}

/// A token information block (`class`), in u64 storage for alignment.
fn token_info(token: &OwnedHandle, class: i32) -> io::Result<Vec<u64>> {
    let mut len = 0u32;
    // SAFETY: a size query: no buffer, `len` written.
    unsafe {
        GetTokenInformation(
            token.as_raw_handle(),
            class,
            std::ptr::null_mut(),
            0,
            &mut len,
        )
    };
    if len == 0 {
        return Err(last_error());
    }
    let mut buf = vec![0u64; (len as usize).div_ceil(8)];
    // SAFETY: `buf` holds at least `len` bytes.
    let ok = unsafe {
        GetTokenInformation(
            token.as_raw_handle(),
            class,
            buf.as_mut_ptr().cast(),
            len,
            &mut len,
        )
    };
    if ok == 0 {
        return Err(last_error());
    }
    Ok(buf)
}

/// `DOMAIN\NAME` of a SID.
fn sid_name(sid: PSID) -> Option<String> {
    let mut name = [0u16; 256];
    let mut domain = [0u16; 256];
    let (mut n, mut d, mut kind) = (name.len() as u32, domain.len() as u32, 0);
    // SAFETY: the buffers and their sizes match; `sid` points into a live token block.
    let ok = unsafe {
        LookupAccountSidW(
            std::ptr::null(),
            sid,
            name.as_mut_ptr(),
            &mut n,
            domain.as_mut_ptr(),
            &mut d,
            &mut kind,
        )
    };
    if ok == 0 {
        return None;
    }
    let name = String::from_utf16_lossy(&name[..n as usize]);
    let domain = String::from_utf16_lossy(&domain[..d as usize]);
    Some(if domain.is_empty() {
        name
    } else {
        format!("{domain}\\{name}")
    })
}

/// Who is on the other end of a hosted pipe instance.
#[derive(Debug, Clone)]
pub struct PipeCaller {
    /// The client's process id.
    pub pid: u32,
    /// Its account, `DOMAIN\NAME`.
    pub user: Option<String>,
    /// Its groups, `DOMAIN\NAME` (only when asked for).
    pub groups: Vec<String>,
}

/// The token the client presented on `pipe` (its thread's, if it was impersonating),
/// read by impersonating it on this thread for a moment. Blocking-pool threads only.
fn client_token(pipe: &OwnedHandle) -> Option<OwnedHandle> {
    // SAFETY: a connected server instance; impersonation affects this thread only and is
    // reverted (verified, or the process aborts) when `_revert` drops.
    if unsafe { ImpersonateNamedPipeClient(pipe.as_raw_handle()) } == 0 {
        return None;
    }
    let _revert = Revert;
    let mut t: HANDLE = std::ptr::null_mut();
    // SAFETY: asks for this thread's (the client's) token, checked as the gateway.
    if unsafe { OpenThreadToken(GetCurrentThread(), TOKEN_QUERY, 1, &mut t) } == 0 {
        return None;
    }
    // SAFETY: a fresh token handle we own.
    Some(unsafe { OwnedHandle::from_raw_handle(t) })
}

/// The token of the process that is the pipe's client.
fn process_token(pid: u32) -> Option<OwnedHandle> {
    // SAFETY: plain call; the returned handle is owned below.
    let proc = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
    if proc.is_null() {
        return None;
    }
    // SAFETY: a fresh process handle we own.
    let proc = unsafe { OwnedHandle::from_raw_handle(proc) };
    let mut tok: HANDLE = std::ptr::null_mut();
    // SAFETY: writes the token handle only.
    if unsafe { OpenProcessToken(proc.as_raw_handle(), TOKEN_QUERY, &mut tok) } == 0 {
        return None;
    }
    // SAFETY: a fresh token handle we own.
    Some(unsafe { OwnedHandle::from_raw_handle(tok) })
}

/// Identifies the client of a connected pipe instance: the token it presented on the
/// pipe (`ImpersonateNamedPipeClient`, so a reused pid or a client thread impersonating
/// someone else cannot mislead), else its process token. Blocking: it impersonates for a
/// moment and may reach a domain controller, so call it on a blocking-pool thread.
pub fn pipe_caller(pipe: &OwnedHandle, with_groups: bool) -> Option<PipeCaller> {
    let pid = crate::endpoint::windows::client_process_id(pipe)?;
    let mut caller = PipeCaller {
        pid,
        user: None,
        groups: Vec::new(),
    };
    let Some(tok) = client_token(pipe).or_else(|| process_token(pid)) else {
        return Some(caller);
    };
    if let Ok(buf) = token_info(&tok, TokenUser) {
        // SAFETY: a TokenUser block starts with SID_AND_ATTRIBUTES (TOKEN_USER).
        let sa = unsafe { &*(buf.as_ptr() as *const SID_AND_ATTRIBUTES) };
        caller.user = sid_name(sa.Sid);
    }
    if with_groups {
        if let Ok(buf) = token_info(&tok, TokenGroups) {
            use windows_sys::Win32::Security::TOKEN_GROUPS;
            let base = buf.as_ptr() as *const u8;
            // SAFETY: a TokenGroups block is TOKEN_GROUPS: a u32 count, then that many
            // SID_AND_ATTRIBUTES from the `Groups` offset on, all inside `buf` (the OS
            // sized it); pointers are derived from `buf` itself.
            unsafe {
                let count = *(base as *const u32) as usize;
                let first = base.add(std::mem::offset_of!(TOKEN_GROUPS, Groups))
                    as *const SID_AND_ATTRIBUTES;
                let list = std::slice::from_raw_parts(first, count);
                // Only groups that grant: enabled, and not deny-only (a filtered
                // administrator's Administrators group is deny-only).
                caller.groups = list
                    .iter()
                    .filter(|g| {
                        let a = g.Attributes as i32;
                        a & SE_GROUP_ENABLED != 0 && a & SE_GROUP_USE_FOR_DENY_ONLY == 0
                    })
                    .filter_map(|g| sid_name(g.Sid))
                    .collect();
            }
        }
    }
    Some(caller)
}
