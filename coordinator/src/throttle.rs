//! A token bucket limiting background transfer bandwidth. Pure: the caller supplies time.

use std::time::{Duration, Instant};

/// Bytes-per-second limiter; a rate of 0 means unlimited.
#[derive(Debug)]
pub struct Throttle {
    rate: u64,
    /// Bytes that may be sent now; negative when a large transfer borrowed ahead.
    tokens: f64,
    last: Instant,
}

impl Throttle {
    /// A limiter for `bytes_per_sec`, starting with one second's worth of burst.
    pub fn new(bytes_per_sec: u64, now: Instant) -> Throttle {
        Throttle {
            rate: bytes_per_sec,
            tokens: bytes_per_sec as f64,
            last: now,
        }
    }

    /// Account for `bytes` sent at `now`; returns how long to wait before sending more.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let rate = self.rate as f64;
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_to_rate() {
        let t0 = Instant::now();
        let mut t = Throttle::new(1000, t0);
        assert_eq!(t.take(500, t0), Duration::ZERO);
        assert_eq!(t.take(500, t0), Duration::ZERO);
        // Bucket empty: 500 more bytes need half a second.
        let wait = t.take(500, t0);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // After a second the debt is repaid and half a bucket is back.
        assert_eq!(t.take(400, t0 + Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn zero_is_unlimited() {
        let t0 = Instant::now();
        let mut t = Throttle::new(0, t0);
        assert_eq!(t.take(u64::MAX, t0), Duration::ZERO);
    }
}
