//! Rate limits: GCRA (the generic cell rate algorithm) over an explicit clock.
//!
//! Bursar checks every rate limit of a call and its budgets under one lock and only then
//! takes them all, so a call denied by its budget does not use up its rate, and the
//! reverse. That needs a check that does not consume, and a `now` shared with the budget
//! windows; crates such as `governor` consume on check and own their clock, so the
//! twenty lines of GCRA live here. The same algorithm runs in the Redis script of the
//! distributed limiter, so one instance and many count alike.

use std::time::Duration;

/// One limiter cell: the theoretical arrival time, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    tat_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateError {
    /// Over the limit now; it fits after this wait.
    Wait(Duration),
    /// Larger than the whole burst: it never fits.
    NeverFits,
}

const MICROS_PER_MINUTE: i64 = 60_000_000;

impl Gcra {
    /// Checks `n` units against a limit of `per_minute` per minute (the whole minute may
    /// be used as a burst) and returns the cell as it would be after taking them.
    pub fn check(self, now_ms: i64, n: u64, per_minute: u32) -> Result<Gcra, RateError> {
        let per_minute = i64::from(per_minute.max(1));
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if n > per_minute {
            return Err(RateError::NeverFits);
        }
        let now = now_ms.saturating_mul(1000);
        // Emission interval × n, without losing precision to integer division.
        let increment = n.saturating_mul(MICROS_PER_MINUTE) / per_minute;
        let tat = self.tat_us.max(now);
        let new_tat = tat.saturating_add(increment);
        let allow_at = new_tat - MICROS_PER_MINUTE;
        if now < allow_at {
            let wait = u64::try_from(allow_at - now).unwrap_or(0);
            return Err(RateError::Wait(Duration::from_micros(wait)));
        }
        Ok(Gcra { tat_us: new_tat })
    }

    /// Units still available now under a limit of `per_minute`, and the time until the
    /// cell is full again (the `x-ratelimit-remaining-*` and `-reset-*` of a response).
    pub fn standing(self, now_ms: i64, per_minute: u32) -> (u64, Duration) {
        self.standing_us(now_ms.saturating_mul(1000), per_minute)
    }

    /// A cell whose theoretical arrival time is `tat_us` (as the distributed limiter
    /// stores it).
    pub fn at(tat_us: i64) -> Gcra {
        Gcra { tat_us }
    }

    /// [`Gcra::standing`] at a time in microseconds.
    pub fn standing_us(self, now: i64, per_minute: u32) -> (u64, Duration) {
        let per_minute = i64::from(per_minute.max(1));
        let backlog = (self.tat_us - now).max(0);
        let used = (backlog.saturating_mul(per_minute) + MICROS_PER_MINUTE - 1) / MICROS_PER_MINUTE;
        let remaining = u64::try_from((per_minute - used).max(0)).unwrap_or(0);
        (
            remaining,
            Duration::from_micros(u64::try_from(backlog).unwrap_or(0)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standing_counts_what_is_left_and_when_it_refills() {
        let t0 = 5_000_000;
        let mut g = Gcra::default();
        assert_eq!(g.standing(t0, 10), (10, Duration::ZERO));
        for _ in 0..3 {
            g = g.check(t0, 1, 10).unwrap();
        }
        assert_eq!(g.standing(t0, 10), (7, Duration::from_secs(18)));
        // Six seconds later one unit has come back.
        assert_eq!(g.standing(t0 + 6_000, 10), (8, Duration::from_secs(12)));
        assert_eq!(g.standing(t0 + 60_000, 10), (10, Duration::ZERO));
    }

    #[test]
    fn allows_the_burst_then_spaces_requests() {
        let mut g = Gcra::default();
        let t0 = 1_000_000;
        for _ in 0..5 {
            g = g.check(t0, 1, 5).unwrap();
        }
        let Err(RateError::Wait(w)) = g.check(t0, 1, 5) else {
            panic!("sixth request in the same instant must wait");
        };
        assert_eq!(w, Duration::from_secs(12));
        // After 12 s one more fits, and only one.
        let g = g.check(t0 + 12_000, 1, 5).unwrap();
        assert!(g.check(t0 + 12_000, 1, 5).is_err());
    }

    #[test]
    fn never_fits_is_not_wait() {
        assert_eq!(
            Gcra::default().check(0, 101, 100),
            Err(RateError::NeverFits)
        );
        assert!(Gcra::default().check(0, 100, 100).is_ok());
    }

    #[test]
    fn a_check_does_not_consume() {
        let g = Gcra::default();
        let _ = g.check(0, 1, 1).unwrap();
        assert!(g.check(0, 1, 1).is_ok());
    }
}
