//! The retry policy as plain data, and its backoff: backon's exponential schedule
//! with full jitter (each delay drawn uniformly from zero to the schedule's value)
//! from an injectable random source.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// How often and how patiently a job is retried.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RetryPolicy {
    /// Attempts per job and run, the first one included.
    pub max_attempts: u32,
    #[serde(with = "super::secs")]
    pub first_delay: Duration,
    pub factor: f32,
    #[serde(with = "super::secs")]
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            first_delay: Duration::from_millis(500),
            factor: 2.0,
            max_delay: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The delays before retry 1, 2, … with `jitter` giving a fraction in `[0, 1)` for each.
    pub(crate) fn backoff<J: FnMut() -> f64>(&self, jitter: J) -> Backoff<J> {
        let schedule = ExponentialBuilder::new()
            .with_min_delay(self.first_delay)
            .with_factor(self.factor)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
            .build();
        Backoff { schedule, jitter }
    }
}

/// An iterator of jittered delays; `None` once the attempts are spent.
pub(crate) struct Backoff<J> {
    schedule: backon::ExponentialBackoff,
    jitter: J,
}

impl<J> std::fmt::Debug for Backoff<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backoff").finish_non_exhaustive()
    }
}

impl<J: FnMut() -> f64> Iterator for Backoff<J> {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let ceiling = self.schedule.next()?;
        let fraction = (self.jitter)().clamp(0.0, 1.0);
        // At most the ceiling (a minute): the product cannot overflow.
        Some(Duration::try_from_secs_f64(ceiling.as_secs_f64() * fraction).unwrap_or(ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_doubles_from_half_a_second_and_caps_at_a_minute() {
        let policy = RetryPolicy {
            max_attempts: 10,
            ..RetryPolicy::default()
        };
        let ceilings: Vec<u64> = policy
            .backoff(|| 1.0)
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(
            ceilings,
            [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]
        );
    }

    #[test]
    fn default_allows_eight_attempts() {
        assert_eq!(RetryPolicy::default().backoff(|| 0.5).count(), 7);
        let one = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        assert_eq!(one.backoff(|| 0.5).count(), 0);
    }

    #[test]
    fn full_jitter_draws_below_the_ceiling() {
        let mut values = [0.0, 0.25, 0.999].into_iter();
        let delays: Vec<Duration> = RetryPolicy::default()
            .backoff(move || values.next().unwrap_or(0.0))
            .take(3)
            .collect();
        assert_eq!(delays[0], Duration::ZERO);
        assert_eq!(delays[1], Duration::from_millis(250));
        assert!(delays[2] < Duration::from_secs(2));
    }
}
