//! Small parsers shared by the binaries' flags.

use std::time::Duration;

/// Parse a duration such as `250ms`, `2s`, `1.5s`, `1m`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "ms"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (try 500ms, 2s or 1m)"))?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit in duration {s:?} (use us, ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {s:?} is too long"))
}

/// `d` as a command-line argument [`parse_duration`] reads back: whole microseconds, at
/// least one (what passes a spawned process its periods).
pub fn duration_arg(d: Duration) -> String {
    format!("{}us", d.as_micros().max(1))
}

/// The smallest frame limit a server accepts: a frame must hold the largest key and value a
/// request may carry, with room for its framing.
pub const MIN_MAX_FRAME_LEN: usize =
    crate::protocol::MAX_KEY_LEN + crate::protocol::MAX_VALUE_LEN + 1024 * 1024;

/// Parse a frame limit in bytes, at least [`MIN_MAX_FRAME_LEN`] and at most what the `u32`
/// length prefix can express.
pub fn parse_max_frame_len(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid frame length {s:?} (a number of bytes)"))?;
    if n < MIN_MAX_FRAME_LEN {
        return Err(format!(
            "a frame limit of {n} bytes is below {MIN_MAX_FRAME_LEN}: a frame must hold the \
             largest key and value"
        ));
    }
    if u32::try_from(n).is_err() {
        return Err(format!("a frame limit of {n} bytes is over {}", u32::MAX));
    }
    Ok(n)
}

/// [`parse_duration`] for a period, which must be longer than zero.
pub fn parse_period(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("a period must be longer than zero, not {s:?}")),
        d => Ok(d),
    }
}

/// Fsync period of a bare `interval` policy: bounds what a power loss can take to a tenth of a
/// second of acknowledged writes while costing at most ten fsyncs a second.
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);

/// When a storage node's log fsyncs, which decides what an acknowledged write survives
/// (the node's `--fsync`, and the coordinator's `--node-fsync` for the nodes it spawns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Fsync before acknowledging; concurrent appends share one fsync (group commit).
    /// An acknowledged write survives a power loss.
    Always,
    /// Acknowledge once written; fsync at least this often (also when idle). An acknowledged write
    /// survives a process crash; a power loss can take the last interval's writes.
    Interval(Duration),
    /// Acknowledge once written; fsync only on close and compaction. An acknowledged write survives
    /// a process crash but not a power loss or kernel crash.
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    /// Parses `always`, `never`, `interval` (every 100 ms) or `interval:DURATION` (`250ms`, `2s`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            "interval" => Ok(FsyncPolicy::Interval(DEFAULT_FSYNC_INTERVAL)),
            _ => match s.strip_prefix("interval:") {
                Some(period) => match parse_duration(period)? {
                    d if d.is_zero() => Err(format!(
                        "fsync interval must be positive in {s:?} (use `always` to sync every write)"
                    )),
                    d => Ok(FsyncPolicy::Interval(d)),
                },
                None => Err(format!(
                    "unknown fsync policy {s:?} (expected always, never, interval or interval:DURATION)"
                )),
            },
        }
    }
}

impl std::fmt::Display for FsyncPolicy {
    /// The form [`FromStr`] accepts.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(d) => write!(f, "interval:{}ms", d.as_secs_f64() * 1000.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_limit_must_hold_the_largest_request_and_fit_the_prefix() {
        assert_eq!(parse_max_frame_len("33554432"), Ok(32 << 20));
        assert_eq!(
            parse_max_frame_len(&MIN_MAX_FRAME_LEN.to_string()),
            Ok(MIN_MAX_FRAME_LEN)
        );
        assert!(parse_max_frame_len(&(MIN_MAX_FRAME_LEN - 1).to_string()).is_err());
        assert!(parse_max_frame_len("1024").is_err());
        assert!(parse_max_frame_len("5000000000").is_err());
        assert!(parse_max_frame_len("32MiB").is_err());
    }

    #[test]
    fn periods_are_positive_and_huge_durations_are_refused() {
        assert_eq!(parse_period("500us"), Ok(Duration::from_micros(500)));
        assert!(parse_period("0ms").is_err());
        assert!(parse_period("0").is_err());
        assert!(parse_duration("100000000000000000000s").is_err());
        for d in [Duration::from_micros(1), Duration::from_millis(250)] {
            assert_eq!(parse_period(&duration_arg(d)), Ok(d));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("200us"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("40"), Ok(Duration::from_millis(40)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }

    #[test]
    fn fsync_policy_parses_and_prints() {
        let cases = [
            ("always", FsyncPolicy::Always),
            ("never", FsyncPolicy::Never),
            (
                "interval",
                FsyncPolicy::Interval(Duration::from_millis(100)),
            ),
            (
                "interval:250ms",
                FsyncPolicy::Interval(Duration::from_millis(250)),
            ),
            ("interval:2s", FsyncPolicy::Interval(Duration::from_secs(2))),
        ];
        for (text, policy) in cases {
            assert_eq!(text.parse::<FsyncPolicy>(), Ok(policy), "{text}");
            assert_eq!(
                policy.to_string().parse::<FsyncPolicy>(),
                Ok(policy),
                "{policy}"
            );
        }
        for bad in [
            "",
            "Always",
            "sometimes",
            "interval:",
            "interval:0ms",
            "interval:soon",
            "interval:5y",
        ] {
            assert!(bad.parse::<FsyncPolicy>().is_err(), "{bad:?} parsed");
        }
    }
}
