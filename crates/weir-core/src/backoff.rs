//! The one backoff computation: a first wait that grows by a factor up to a cap.
//!
//! Every loop that waits before trying again uses it — ingestion reconnecting to the server,
//! a consumer retrying a failed event ([`crate::RetryConfig`]), the job completer retrying a
//! write — so a change to how waits grow is made once.
//!
//! ```text
//! attempt   1       2          3            …  n
//! wait      first   first × m  first × m²   …  min(first × mⁿ⁻¹, max)
//! ```

use std::time::Duration;

/// Waits that start at `first` and grow by `multiplier` per attempt, never above `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The wait before the first retry.
    pub first: Duration,
    /// Each wait is the previous one times this; values below 1 count as 1.
    pub multiplier: f64,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// Reconnecting to PostgreSQL: 500 ms, doubling, at most 10 s.
    pub const RECONNECT: Backoff = Backoff {
        first: Duration::from_millis(500),
        multiplier: 2.0,
        max: Duration::from_secs(10),
    };

    /// The wait before retry number `attempt` (1-based; 0 counts as 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(1_000) as i32;
        let factor = self.multiplier.max(1.0).powi(exponent);
        self.first.mul_f64(factor.min(1e6)).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_the_multiplier_up_to_the_cap() {
        let b = Backoff::RECONNECT;
        let waits: Vec<u128> = (0..8).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(waits, [500, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(10));
        let flat = Backoff { multiplier: 0.5, ..b };
        assert_eq!(flat.delay(5), Duration::from_millis(500));
    }
}
