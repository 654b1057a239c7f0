//! Waiting for a condition with a deadline: the harness polls what it can observe instead of
//! sleeping for a guessed time.

use std::future::Future;
use std::time::{Duration, Instant};

/// Runs `check` every `every` until it yields a value, or until `within` has passed (`None`).
/// `check` runs at least once, and once more after the deadline has passed.
pub async fn until<T, F, Fut>(within: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        let expired = Instant::now() > deadline;
        if let Some(v) = check().await {
            return Some(v);
        }
        if expired {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn polls_until_the_condition_holds_or_the_deadline_passes() {
        let n = AtomicU32::new(0);
        let third = until(Duration::from_secs(5), Duration::from_millis(1), || async {
            let i = n.fetch_add(1, Ordering::Relaxed) + 1;
            (i == 3).then_some(i)
        })
        .await;
        assert_eq!(third, Some(3));
        let checks = AtomicU32::new(0);
        let never = until(
            Duration::from_millis(20),
            Duration::from_millis(5),
            || async {
                checks.fetch_add(1, Ordering::Relaxed);
                None::<()>
            },
        )
        .await;
        assert_eq!(never, None);
        assert!(checks.load(Ordering::Relaxed) >= 2);
    }
}
