//! A Windows named-pipe test program, written on the raw Win32 API with plain blocking
//! I/O (independent of pipebridge's own overlapped code, so the two check each other).
//! The Wine end-to-end tests (tests/wine.rs) run it next to `pipebridge.exe`.
//!
//! ```text
//! npipe-echo serve NAME byte|message [COUNT]
//!     Serves \\.\pipe\NAME (up to 8 instances), echoing each client. Message mode echoes
//!     each message (zero-length ones too) as one message and, after COUNT messages,
//!     closes the instance. Byte mode echoes bytes until the client closes or writes a
//!     zero-length message (the go-winio close-write), then closes. Prints "ready".
//! npipe-echo client NAME byte|message SIZE,SIZE,...
//!     Connects, sends one message (or chunk) per SIZE with a known pattern, reads the
//!     echo of each and checks bytes and (message mode) boundaries. Prints "ok N"; exits
//!     1 with the reason if the pipe closes early or a byte differs.
//! npipe-echo cat
//!     Copies stdin to stdout (anonymous pipes, for `exec:` pipes), then exits 0.
//! npipe-echo exit N
//!     Exits with code N.
//! ```
//! On other platforms it only says that it is for Windows.

#[cfg(windows)]
#[allow(unsafe_code)]
mod imp {
    use std::io;
    use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};

    use windows_sys::Win32::Foundation::{
        GetLastError, ERROR_MORE_DATA, ERROR_PIPE_BUSY, ERROR_PIPE_CONNECTED, GENERIC_READ,
        GENERIC_WRITE, INVALID_HANDLE_VALUE,
    };
    use windows_sys::Win32::Storage::FileSystem::{
        CreateFileW, ReadFile, WriteFile, OPEN_EXISTING, PIPE_ACCESS_DUPLEX,
    };
    use windows_sys::Win32::System::Pipes::{
        ConnectNamedPipe, CreateNamedPipeW, SetNamedPipeHandleState, WaitNamedPipeW,
        PIPE_READMODE_BYTE, PIPE_READMODE_MESSAGE, PIPE_TYPE_MESSAGE, PIPE_WAIT,
    };

    fn wide(s: &str) -> Vec<u16> {
        s.encode_utf16().chain(Some(0)).collect()
    }

    fn path(name: &str) -> Vec<u16> {
        wide(&format!(r"\\.\pipe\{name}"))
    }

    /// One read: (bytes, more data in this message).
    fn read(h: &OwnedHandle, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        let mut n = 0u32;
        // SAFETY: synchronous read into `buf`, which outlives the call.
        let ok = unsafe {
            ReadFile(
                h.as_raw_handle(),
                buf.as_mut_ptr(),
                buf.len() as u32,
                &mut n,
                std::ptr::null_mut(),
            )
        };
        if ok != 0 {
            return Ok((n as usize, false));
        }
        // SAFETY: reads the last-error value only.
        let e = unsafe { GetLastError() };
        if e == ERROR_MORE_DATA {
            return Ok((n as usize, true));
        }
        Err(io::Error::from_raw_os_error(e as i32))
    }

    /// One whole message (None: the pipe closed).
    fn read_message(h: &OwnedHandle) -> Option<Vec<u8>> {
        let mut msg = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            match read(h, &mut buf) {
                Ok((n, more)) => {
                    msg.extend_from_slice(&buf[..n]);
                    if !more {
                        return Some(msg);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    fn write(h: &OwnedHandle, data: &[u8]) -> io::Result<()> {
        let mut n = 0u32;
        // SAFETY: synchronous write from `data`, which outlives the call.
        let ok = unsafe {
            WriteFile(
                h.as_raw_handle(),
                data.as_ptr(),
                data.len() as u32,
                &mut n,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 || n as usize != data.len() {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn owned(h: *mut core::ffi::c_void) -> io::Result<OwnedHandle> {
        if h == INVALID_HANDLE_VALUE || h.is_null() {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh handle from the OS.
        Ok(unsafe { OwnedHandle::from_raw_handle(h) })
    }

    fn serve(name: &str, message: bool, count: Option<usize>) -> io::Result<()> {
        let p = path(name);
        eprintln!("ready");
        loop {
            // A message-type pipe in both modes: byte-mode clients read it as a stream,
            // and a zero-length write still arrives (the close-write convention).
            let readmode = if message {
                PIPE_READMODE_MESSAGE
            } else {
                PIPE_READMODE_BYTE
            };
            // SAFETY: `p` is NUL-terminated; default security.
            let h = owned(unsafe {
                CreateNamedPipeW(
                    p.as_ptr(),
                    PIPE_ACCESS_DUPLEX,
                    PIPE_TYPE_MESSAGE | readmode | PIPE_WAIT,
                    8,
                    65536,
                    65536,
                    0,
                    std::ptr::null(),
                )
            })?;
            // SAFETY: synchronous connect on our own instance.
            let ok = unsafe { ConnectNamedPipe(h.as_raw_handle(), std::ptr::null_mut()) };
            // SAFETY: reads the last-error value only.
            if ok == 0 && unsafe { GetLastError() } != ERROR_PIPE_CONNECTED {
                continue;
            }
            std::thread::spawn(move || {
                if message {
                    let mut seen = 0;
                    while let Some(m) = read_message(&h) {
                        if write(&h, &m).is_err() {
                            return;
                        }
                        seen += 1;
                        if count.is_some_and(|c| seen >= c) {
                            // Let the client read the last echo before the close.
                            std::thread::sleep(std::time::Duration::from_millis(200));
                            return;
                        }
                    }
                } else {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        match read(&h, &mut buf) {
                            Ok((0, _)) | Err(_) => {
                                std::thread::sleep(std::time::Duration::from_millis(200));
                                return;
                            }
                            Ok((n, _)) => {
                                if write(&h, &buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            });
        }
    }

    fn pattern(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| ((i * 31 + j * 7) % 251) as u8).collect()
    }

    fn client(name: &str, message: bool, sizes: &[usize]) -> io::Result<()> {
        let p = path(name);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let h = loop {
            // SAFETY: `p` is NUL-terminated.
            let h = unsafe {
                CreateFileW(
                    p.as_ptr(),
                    GENERIC_READ | GENERIC_WRITE,
                    0,
                    std::ptr::null(),
                    OPEN_EXISTING,
                    0,
                    std::ptr::null_mut(),
                )
            };
            if h != INVALID_HANDLE_VALUE {
                break owned(h)?;
            }
            // SAFETY: reads the last-error value only.
            let e = unsafe { GetLastError() };
            if std::time::Instant::now() > deadline {
                return Err(io::Error::from_raw_os_error(e as i32));
            }
            if e == ERROR_PIPE_BUSY {
                // SAFETY: as above.
                unsafe { WaitNamedPipeW(p.as_ptr(), 1000) };
            } else {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        };
        if message {
            let m = PIPE_READMODE_MESSAGE;
            // SAFETY: sets the read mode of our handle only.
            unsafe {
                SetNamedPipeHandleState(h.as_raw_handle(), &m, std::ptr::null(), std::ptr::null())
            };
        }
        for (i, &len) in sizes.iter().enumerate() {
            let data = pattern(i, len);
            write(&h, &data)?;
            if message {
                let got = read_message(&h).ok_or_else(|| io::Error::other("pipe closed"))?;
                if got != data {
                    return Err(io::Error::other(format!(
                        "message {i}: sent {len} bytes, got {} back (or different bytes)",
                        got.len()
                    )));
                }
            } else {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 65536];
                while got.len() < len {
                    let (n, _) = read(&h, &mut buf)?;
                    if n == 0 {
                        return Err(io::Error::other("pipe closed early"));
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                if got != data {
                    return Err(io::Error::other(format!("chunk {i}: bytes differ")));
                }
            }
        }
        println!("ok {}", sizes.len());
        Ok(())
    }

    pub fn main() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = match a.as_slice() {
            ["serve", name, mode, rest @ ..] => serve(
                name,
                *mode == "message",
                rest.first().and_then(|c| c.parse().ok()),
            ),
            ["cat"] => {
                let r = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::stdout().lock());
                r.map(drop)
            }
            ["exit", code] => std::process::exit(code.parse().unwrap_or(1)),
            ["client", name, mode, sizes] => {
                let sizes: Vec<usize> = sizes.split(',').filter_map(|s| s.parse().ok()).collect();
                client(name, *mode == "message", &sizes)
            }
            _ => {
                eprintln!("usage: npipe-echo serve NAME byte|message [COUNT] | client NAME byte|message SIZES | cat | exit N");
                std::process::exit(2);
            }
        };
        if let Err(e) = r {
            eprintln!("npipe-echo: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(windows)]
fn main() {
    imp::main();
}

#[cfg(not(windows))]
fn main() {
    eprintln!("npipe-echo is a Windows test program (see tests/wine.rs)");
    std::process::exit(2);
}
