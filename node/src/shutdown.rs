//! Graceful shutdown as a value passed to every task (as in mini-redis), not a global flag.

use tokio::sync::watch;

/// The sending side: [`Trigger::fire`] asks every [`Shutdown`] to finish.
#[derive(Clone)]
pub struct Trigger(watch::Sender<bool>);

/// The receiving side; cheap to clone, one per task.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Whether shutdown was requested.
    pub fn fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once shutdown was requested (or every trigger was dropped).
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}
