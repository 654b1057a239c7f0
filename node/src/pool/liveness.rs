//! Whether a remote connection (Streamable HTTP or legacy HTTP+SSE) can still take calls, and
//! the signal its supervisor waits on when it cannot.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::call::CallError;

pub struct Liveness {
    alive: AtomicBool,
    closed: watch::Sender<bool>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            alive: AtomicBool::new(true),
            closed: watch::channel(false).0,
        }
    }
}

impl Liveness {
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// `Ok` while it takes calls; else the error of a call that therefore did not run.
    pub fn check(&self, server: &str) -> Result<(), CallError> {
        if self.is_alive() {
            Ok(())
        } else {
            Err(CallError::NotRun(format!(
                "remote server {server:?} is disconnected; the call did not run"
            )))
        }
    }

    /// It takes no more calls; its supervisor connects again.
    pub fn close(&self) {
        self.alive.store(false, Ordering::Relaxed);
        let _ = self.closed.send(true);
    }

    /// Completes once it is closed.
    pub async fn closed(&self) {
        let _ = self.closed.subscribe().wait_for(|c| *c).await;
    }
}
