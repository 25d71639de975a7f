//! Parsers for the human-written units of the config: durations (`"30s"`, `"5m"`,
//! `"250ms"`, `"off"`), sizes (`"16KiB"`, `"1MiB"`, plain byte counts) and octal
//! modes (`"0660"`).

use std::time::Duration;

/// Parses `"200us"`, `"250ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`. Returns a message saying what
/// would be valid on error.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected a number and a unit such as \"30s\", \"5m\" or \"250ms\""))?;
    let d = match unit.trim() {
        "us" | "µs" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => {
            return Err(format!(
            "invalid duration {s:?}: the unit must be us, ms, s, m, h or d (for example \"30s\")"
        ))
        }
    };
    // Bounded, so that a deadline `now + d` can never overflow (a panic, which aborts).
    if d > MAX_DURATION {
        return Err(format!(
            "invalid duration {s:?}: at most 36500d (a hundred years)"
        ));
    }
    Ok(d)
}

/// The longest duration a config may give.
const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// Parses a duration that may also be `"off"` (→ `None`).
pub fn parse_optional_duration(s: &str) -> Result<Option<Duration>, String> {
    if s.trim() == "off" {
        return Ok(None);
    }
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!(
            "invalid duration {s:?}: use \"off\" to disable, not zero"
        ));
    }
    Ok(Some(d))
}

/// Parses `"16KiB"`, `"1MiB"`, `"1GiB"`, `"100B"`, `"4096"`, also `KB`/`MB` as powers of
/// 1000.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with an optional unit such as \"16KiB\" or \"1MiB\""))?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "invalid size {s:?}: the unit must be B, KiB, MiB, GiB, KB, MB or GB"
            ))
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Parses an octal file mode string such as `"0660"` or `"660"`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let t = t.strip_prefix("0o").unwrap_or(t);
    let m = u32::from_str_radix(t, 8)
        .map_err(|_| format!("invalid mode {s:?}: expected an octal string such as \"0660\""))?;
    if m > 0o7777 {
        return Err(format!("invalid mode {s:?}: at most \"07777\""));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3 fortnights").is_err());
        assert_eq!(
            parse_duration("36500d").unwrap(),
            Duration::from_secs(36_500 * 86_400)
        );
        assert!(parse_duration("36501d").is_err());
        assert!(parse_duration("1000000000000000d").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
        assert_eq!(parse_optional_duration("off").unwrap(), None);
        assert!(parse_optional_duration("0s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2KB").unwrap(), 2000);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("rw").is_err());
    }
}
