//! A rolling window of two counts over the last stretch of time: a breaker's calls and
//! failures ([`super::breaker`]), a retry budget's requests and retries ([`super::budget`]).
//!
//! The window is kept as [`BUCKETS`] buckets, so it slides in tenths of its length.

use std::time::{Duration, Instant};

/// Buckets of a window.
pub const BUCKETS: u64 = 10;

/// Two counts, `(a, b)`, over the last `length` of time.
#[derive(Debug)]
pub struct Window {
    width: Duration,
    /// The first instant seen; bucket indexes count from it.
    origin: Option<Instant>,
    /// The newest bucket index seen; never moves back.
    head: u64,
    buckets: [Bucket; BUCKETS as usize],
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    index: u64,
    a: u64,
    b: u64,
}

impl Window {
    pub fn new(length: Duration) -> Window {
        Window {
            width: (length / BUCKETS as u32).max(Duration::from_nanos(1)),
            origin: None,
            head: 0,
            buckets: [Bucket::default(); BUCKETS as usize],
        }
    }

    /// The bucket index of `now`. Two callers may read the clock in one order and take the
    /// lock in the other, so an older `now` counts in the newest bucket rather than reopening
    /// one that may already have been reused.
    fn advance(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        let index = now.saturating_duration_since(origin).as_nanos() / self.width.as_nanos();
        self.head = self.head.max(u64::try_from(index).unwrap_or(u64::MAX));
        self.head
    }

    /// Adds `a` and `b` to the bucket `now` counts in (emptied first if it last held an older
    /// stretch of time).
    pub fn add(&mut self, now: Instant, a: u64, b: u64) {
        let index = self.advance(now);
        let bucket = &mut self.buckets[(index % BUCKETS) as usize];
        if bucket.index != index {
            *bucket = Bucket {
                index,
                ..Bucket::default()
            };
        }
        bucket.a += a;
        bucket.b += b;
    }

    /// `(a, b)` summed over the window at `now`.
    pub fn counts(&mut self, now: Instant) -> (u64, u64) {
        let index = self.advance(now);
        self.buckets
            .iter()
            .filter(|b| index.saturating_sub(b.index) < BUCKETS)
            .fold((0, 0), |(a, b), bucket| (a + bucket.a, b + bucket.b))
    }

    /// Forgets everything counted.
    pub fn clear(&mut self) {
        // Default buckets have index 0: empty, whether or not they count as in the window.
        self.buckets = [Bucket::default(); BUCKETS as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_slide_out_bucket_by_bucket_and_a_late_clock_counts_in_the_newest() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut w = Window::new(Duration::from_millis(1000));
        w.add(ms(0), 1, 0);
        w.add(ms(450), 1, 1);
        assert_eq!(w.counts(ms(500)), (2, 1));
        // At 1000 ms the first bucket (0..100 ms) has left the window; the second has not.
        assert_eq!(w.counts(ms(1000)), (1, 1));
        assert_eq!(w.counts(ms(1500)), (0, 0));
        // A caller that read the clock before the last one counts in the newest bucket.
        w.add(ms(1400), 2, 2);
        assert_eq!(w.counts(ms(1500)), (2, 2));
        w.clear();
        assert_eq!(w.counts(ms(1500)), (0, 0));
    }
}
