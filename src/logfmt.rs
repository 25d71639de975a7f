//! Plain-text log fields: what tracing-subscriber's `DefaultFields` writes with ANSI
//! colours off, byte for byte, without running its styling code.
//!
//! With colours off, `DefaultFields` still wraps every field name and `=` in an
//! (empty) ANSI style and formats it through the style's `Display`. A session's span
//! fields and its audit line are about twenty fields on each gateway, and that
//! styling was a tenth of a new session's instructions (`scripts/callgrind-ab.py
//! --mode sessions`). [`PlainFields`] writes the same text directly; the message and
//! error values are escaped as `DefaultFields` escapes them (ANSI and C1 control
//! characters), so a peer's text cannot inject terminal sequences into the log.

use std::error::Error;
use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::FormatFields;

/// Timestamps exactly as tracing-subscriber's [`SystemTime`] writes them (RFC 3339 in
/// UTC with microseconds, `2026-12-04T23:29:37.225573Z`), with the part up to the
/// second formatted by it once per second and thread and kept: its date arithmetic
/// and seven padded numbers were 2,400 instructions per log line, two lines per
/// session.
#[derive(Debug, Default, Clone, Copy)]
pub struct CachedTime;

impl FormatTime for CachedTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        thread_local! {
            /// The second of the last line and its text up to the seconds.
            static SECOND: std::cell::RefCell<(u64, String)> =
                const { std::cell::RefCell::new((u64::MAX, String::new())) };
        }
        let Some(now) = since_epoch() else {
            return SystemTime.format_time(w);
        };
        let (secs, micros) = (now.as_secs(), now.subsec_micros());
        let written = SECOND.try_with(|cell| {
            let Ok(mut cached) = cell.try_borrow_mut() else {
                return SystemTime.format_time(w);
            };
            if cached.0 != secs {
                let mut text = String::new();
                SystemTime.format_time(&mut Writer::new(&mut text))?;
                // Kept only if the clock was still in that second once it was written
                // (and in the four-digit years whose text ends in ".ffffffZ").
                let same = since_epoch().is_some_and(|t| t.as_secs() == secs);
                if !same || text.len() != 27 || !text.ends_with('Z') {
                    return w.write_str(&text);
                }
                text.truncate(19);
                *cached = (secs, text);
            }
            w.write_str(&cached.1)?;
            let mut frac = *b".000000Z";
            let mut m = micros;
            for d in frac[1..7].iter_mut().rev() {
                *d = b'0' + (m % 10) as u8;
                m /= 10;
            }
            w.write_str(std::str::from_utf8(&frac).map_err(|_| fmt::Error)?)
        });
        // The thread is ending (its locals are gone): uncached.
        written.unwrap_or_else(|_| SystemTime.format_time(w))
    }
}

/// The time since the Unix epoch (none before it).
fn since_epoch() -> Option<std::time::Duration> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
}

/// Formats fields as `DefaultFields` does without ANSI colours (for logs written to a
/// file, a pipe or journald).
#[derive(Debug, Default, Clone, Copy)]
pub struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = PlainVisitor {
            sanitize: writer.sanitizes_ansi_escapes(),
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct PlainVisitor<'a> {
    writer: Writer<'a>,
    sanitize: bool,
    first: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    fn write(&mut self, name: &str, value: &dyn fmt::Debug) -> fmt::Result {
        if self.first {
            self.first = false;
        } else {
            self.writer.write_char(' ')?;
        }
        if name == "message" {
            return if self.sanitize {
                write!(Escaping(&mut self.writer), "{value:?}")
            } else {
                write!(self.writer, "{value:?}")
            };
        }
        self.writer
            .write_str(name.strip_prefix("r#").unwrap_or(name))?;
        self.writer.write_char('=')?;
        write!(self.writer, "{value:?}")
    }
}

/// Text formatted once and logged many times (a connection's peer address, a
/// forward's URL): its `Display` copies the text, where formatting a `SocketAddr` or
/// a URI again for every session's span and audit line was thousands of instructions.
#[derive(Clone, Debug)]
pub struct Preformatted(std::sync::Arc<str>);

impl Preformatted {
    /// `value`'s `Display` text, kept.
    pub fn of(value: &impl fmt::Display) -> Preformatted {
        Preformatted(value.to_string().into())
    }
}

impl fmt::Display for Preformatted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn Error + 'static)) {
        let sanitize = self.sanitize;
        if let Some(source) = value.source() {
            self.record_debug(
                field,
                &format_args!(
                    "{} {}.sources={}",
                    Escaped(value, sanitize),
                    field.name(),
                    Sources(source, sanitize)
                ),
            );
        } else {
            self.record_debug(field, &format_args!("{}", Escaped(value, sanitize)));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // Metadata of records from the `log` crate, already written as the target.
        if name.starts_with("log.") {
            return;
        }
        self.result = self.write(name, value);
    }
}

/// An error's sources as a list, each escaped (`DefaultFields`' `x.sources=[..]`).
struct Sources<'a>(&'a (dyn Error + 'static), bool);

impl fmt::Display for Sources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // As `debug_list` writes a list of errors' texts: `[a, b]`.
        f.write_str("[")?;
        let mut next = Some(self.0);
        let mut first = true;
        while let Some(e) = next {
            if !std::mem::take(&mut first) {
                f.write_str(", ")?;
            }
            write!(f, "{}", Escaped(e, self.1))?;
            next = e.source();
        }
        f.write_str("]")
    }
}

/// `Display` of a value, escaped when `.1`.
struct Escaped<T>(T, bool);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 {
            write!(Escaping(f), "{}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// Writes through to `.0` with the control characters a terminal acts on escaped:
/// ESC, BEL, BS, FF, DEL and the C1 range, as tracing-subscriber escapes them.
struct Escaping<'a, W: Write + ?Sized>(&'a mut W);

impl<W: Write + ?Sized> Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some((i, ch)) = rest.char_indices().find(|&(_, c)| {
            matches!(
                c,
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
            )
        }) {
            self.0.write_str(&rest[..i])?;
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[i + ch.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer \x1b[31mred")
        }
    }
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner \u{9b}csi")
        }
    }
    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }
    impl Error for Inner {}

    /// Logs a set of spans and events (strings, numbers, Display and Debug values,
    /// errors with and without sources, raw names, control characters, fields
    /// recorded after the span's creation) and returns the text written.
    fn log_all(plain: bool) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let b = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || out.clone());
        let emit = || {
            let s = tracing::info_span!(
                "session",
                id = 7u64,
                peer = %"127.0.0.1:4000",
                identity = "al\x1bice",
                later = tracing::field::Empty
            );
            let _g = s.enter();
            s.record("later", 3i64);
            let inner = tracing::debug_span!("inner", r#type = "x", ok = true);
            let _g2 = inner.enter();
            tracing::info!(
                target: "pipebridge::audit",
                bytes = 10u64,
                reason = %"bye \x07bell",
                debug = ?vec![1, 2],
                f = 1.5f64,
                neg = -4i64,
                "session end \x1b]0;title\x07 {}",
                "\u{85}next"
            );
            let e = Outer(Inner);
            tracing::warn!(error = &e as &(dyn Error + 'static), "failed");
            tracing::warn!(r#type = &e as &(dyn Error + 'static));
            // Fields of records from the `log` crate are skipped.
            tracing::info!(log.target = "x", log.line = 1u32, "from log");
            // A span with no fields at first, recorded later.
            let bare = tracing::info_span!("bare", late = tracing::field::Empty);
            let _g3 = bare.enter();
            tracing::info!("before");
            bare.record("late", "now");
            tracing::info!("after");
            tracing::warn!(error = &Inner as &(dyn Error + 'static));
            tracing::error!(message = "explicit", n = 0u8);
            tracing::trace!("");
        };
        if plain {
            tracing::subscriber::with_default(b.fmt_fields(PlainFields).finish(), emit);
        } else {
            tracing::subscriber::with_default(b.finish(), emit);
        }
        let v = buf.0.lock().unwrap().clone();
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn cached_time_writes_what_system_time_writes() {
        let shape = |t: &str| {
            let b = t.as_bytes();
            b.len() == 27
                && t.ends_with('Z')
                && [4, 7].iter().all(|&i| b[i] == b'-')
                && b[10] == b'T'
                && [13, 16].iter().all(|&i| b[i] == b':')
                && b[19] == b'.'
                && b.iter()
                    .enumerate()
                    .all(|(i, c)| [4, 7, 10, 13, 16, 19, 26].contains(&i) || c.is_ascii_digit())
        };
        let format = |t: &dyn FormatTime| {
            let mut s = String::new();
            t.format_time(&mut Writer::new(&mut s)).unwrap();
            s
        };
        // Between two readings of tracing-subscriber's own, ours falls between them:
        // a prefix kept from another second could not. Until the second changes at
        // least once (within 1.2 s), so the kept prefix is replaced on the way.
        let first = format(&CachedTime);
        let start = std::time::Instant::now();
        let mut turned = false;
        while start.elapsed() < Duration::from_millis(1200) {
            let before = format(&SystemTime);
            let ours = format(&CachedTime);
            let after = format(&SystemTime);
            assert!(shape(&ours), "{ours}");
            assert!(before <= ours && ours <= after, "{before} {ours} {after}");
            turned |= ours[..19] != first[..19];
            if turned && start.elapsed() > Duration::from_millis(50) {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        assert!(turned, "the second never changed in 1.2 s");
    }

    #[test]
    fn writes_what_default_fields_writes_without_ansi() {
        let plain = log_all(true);
        let default = log_all(false);
        assert_eq!(plain, default);
        // The comparison covered what it should: escapes, sources, spans, raw names.
        for want in [
            "session{id=7 peer=127.0.0.1:4000 identity=\"al\\u{1b}ice\" later=3}:inner{type=\"x\" ok=true}:",
            "session end \\x1b]0;title\\x07 \\u{85}next bytes=10 reason=bye \u{7}bell",
            "error=outer \\x1b[31mred error.sources=[inner \\u{9b}csi]",
            "error=inner \\u{9b}csi",
            "explicit n=0",
            "type=outer \\x1b[31mred type.sources=[inner \\u{9b}csi]",
            "from log\n",
            "bare: pipebridge::logfmt::tests: before",
            "bare{late=\"now\"}: pipebridge::logfmt::tests: after",
        ] {
            assert!(plain.contains(want), "missing {want:?} in:\n{plain}");
        }
        assert_eq!(plain.lines().count(), 9, "{plain}");
    }
}
