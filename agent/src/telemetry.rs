//! Logging setup: tracing to stderr, plain or JSON, level from `LATCH_LOG` (EnvFilter syntax).
use tracing_subscriber::{EnvFilter, fmt};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Installs the global subscriber. `default_level` applies when `LATCH_LOG` is unset.
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_env("LATCH_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

/// `tracing::warn!` for a line written once per connection on a path a flood can take
/// (refusals, denials, failures): at most [`Throttle::BURST`] a second from each call site, the
/// next one written saying how many were left out (`suppressed`).
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::telemetry::Throttle = $crate::telemetry::Throttle::new();
        if let Some(suppressed) = THROTTLE.allow() {
            if suppressed > 0 {
                tracing::warn!(suppressed, $($arg)+);
            } else {
                tracing::warn!($($arg)+);
            }
        }
    }};
}

/// At most [`Throttle::BURST`] log lines a second from one call site, and a count of those
/// left out on the next line written: a flood of refused or failing connections (a workload
/// over its limit, a node out of descriptors) must not turn into a flood of log lines. The
/// audit trail keeps its own records (and its own rate limit for refusals).
#[derive(Debug, Default)]
pub struct Throttle {
    /// The second (of the monotonic clock) the count is for.
    second: std::sync::atomic::AtomicU64,
    /// Lines written in that second.
    written: std::sync::atomic::AtomicU32,
    /// Lines left out since the last one written.
    suppressed: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// Lines a second a call site may write.
    pub const BURST: u32 = 5;

    pub const fn new() -> Self {
        Self {
            second: std::sync::atomic::AtomicU64::new(0),
            written: std::sync::atomic::AtomicU32::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)`: write the line, and say that `n` were left out before it; `None`: leave it
    /// out.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(monotonic_second())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.second.swap(now, Relaxed) != now {
            self.written.store(0, Relaxed);
        }
        if self.written.fetch_add(1, Relaxed) < Self::BURST {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

/// Whole seconds of a monotonic clock (since the first call).
fn monotonic_second() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_a_second_then_the_count_of_lines_left_out() {
        let t = Throttle::new();
        for _ in 0..Throttle::BURST {
            assert_eq!(t.allow_at(7), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(t.allow_at(7), None);
        }
        // The next second's first line says how many were left out.
        assert_eq!(t.allow_at(8), Some(1000));
        assert_eq!(t.allow_at(8), Some(0));
    }
}
