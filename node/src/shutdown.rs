//! Graceful shutdown as a value passed to every task (as in mini-redis), not a global flag.

use std::sync::Arc;

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

/// A request from inside the node to stop and start again in place, with the same arguments
/// (after `cluster promote --force-new-cluster` left a restore plan in the data directory).
#[derive(Clone)]
pub struct Restart(Arc<watch::Sender<bool>>);

impl Default for Restart {
    fn default() -> Self {
        Restart(Arc::new(watch::Sender::new(false)))
    }
}

impl Restart {
    pub fn request(&self) {
        self.0.send_replace(true);
    }

    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once a restart was requested.
    pub async fn wait(&self) {
        let _ = self.0.subscribe().wait_for(|asked| *asked).await;
    }
}
