//! The resources the clients of a pool's shared processes subscribed to, and who holds each.
//!
//! A process's subscription is every client's: the process sends
//! `notifications/resources/updated` to the node once, and the node passes it to each session
//! and listen stream that asked for the URI. So one client's `resources/unsubscribe` must not
//! reach the process while another still holds the URI:
//!
//! - the first subscriber's `resources/subscribe` goes to a process, which is remembered; a
//!   later one is answered here, unless that process is gone (then it goes to another);
//! - an unsubscribe reaches the process only when its last holder lets go (and again while it
//!   fails without an answer, `super::withdraw`); a session holds
//!   from each node that serves it (`crate::mcp::holds`: the holder is `NODE.RUN/SESSION`), and
//!   lets go when it ends or leaves that node's memory; a departed node (back from a crash,
//!   or removed from the cluster: `crate::call::Departed`) has its holds let go here
//!   ([`SharedSubscriptions::leave_all`]);
//! - a 2026-07-28 listen stream holds its URIs until the process ends (it never unsubscribes:
//!   a stream that closes leaves them, as others may share them);
//! - a URI whose process is gone is forgotten when next touched (its subscription went with
//!   the process);
//! - subscribes and unsubscribes reach the processes one at a time ([`SharedSubscriptions::turn`]),
//!   so that none overtakes another on its way.
//!
//! A dedicated process (`session_mode = dedicated`) belongs to one session and is not counted
//! here.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use super::upstream::Upstream;

/// The URIs subscribed on a pool's shared processes.
pub struct SharedSubscriptions {
    uris: Mutex<HashMap<String, Holders>>,
    /// Held across a subscribe or unsubscribe sent to a process, so that those of one pool
    /// reach its processes one at a time, in the order they were counted here.
    pub turn: Arc<tokio::sync::Mutex<()>>,
    /// `mcpd_pool_subscriptions`: the URIs subscribed on the server's processes.
    gauge: metrics::Gauge,
}

/// Who holds one URI, and the process it was subscribed on.
struct Holders {
    sessions: HashSet<Arc<str>>,
    /// A listen stream (or another caller without a session) asked for it.
    listeners: bool,
    process: Weak<dyn Upstream>,
}

/// What to do with a `resources/unsubscribe`.
pub enum Unsubscribe {
    /// Others still hold the URI: answer it here.
    Kept,
    /// The last holder let go: tell the process that has it.
    Release(Arc<dyn Upstream>),
    /// No process has it (unknown, or its process is gone): send it on as it is.
    Unknown,
}

impl SharedSubscriptions {
    pub fn new(server: &str) -> SharedSubscriptions {
        SharedSubscriptions {
            uris: Mutex::default(),
            turn: Arc::default(),
            gauge: metrics::gauge!("mcpd_pool_subscriptions", "server" => server.to_string()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Holders>> {
        self.uris.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `owner` (a session; `None`: a listen stream) to the holders of `uri` if a live
    /// process has it already: `true` when the subscribe is answered by that.
    pub fn join(&self, uri: &str, owner: Option<&Arc<str>>) -> bool {
        let mut uris = self.lock();
        let Some(h) = uris.get_mut(uri) else {
            return false;
        };
        if h.live().is_none() {
            // Its process is gone, and the subscription with it: subscribe again.
            return false;
        }
        h.hold(owner);
        true
    }

    /// Records that `process` took the subscription to `uri` for `owner`.
    pub fn subscribed(&self, uri: &str, owner: Option<&Arc<str>>, process: &Arc<dyn Upstream>) {
        let mut uris = self.lock();
        let h = uris.entry(uri.to_string()).or_insert_with(|| Holders {
            sessions: HashSet::new(),
            listeners: false,
            process: Arc::downgrade(process),
        });
        h.process = Arc::downgrade(process);
        h.hold(owner);
        self.gauge.set(uris.len() as f64);
    }

    /// Whether the books have `uri` subscribed on `process`, for someone.
    pub fn held_on(&self, uri: &str, process: &Arc<dyn Upstream>) -> bool {
        let same = |p: Arc<dyn Upstream>| std::ptr::addr_eq(Arc::as_ptr(&p), Arc::as_ptr(process));
        self.lock()
            .get(uri)
            .is_some_and(|h| h.live().is_some_and(same))
    }

    /// Takes `owner` off the holders of `uri` (see [`Unsubscribe`]).
    pub fn leave(&self, uri: &str, owner: Option<&Arc<str>>) -> Unsubscribe {
        let mut uris = self.lock();
        let Some(h) = uris.get_mut(uri) else {
            return Unsubscribe::Unknown;
        };
        if let Some(owner) = owner {
            h.sessions.remove(owner);
        }
        let process = h.live();
        if process.is_some() && (h.listeners || !h.sessions.is_empty()) {
            return Unsubscribe::Kept;
        }
        uris.remove(uri);
        self.gauge.set(uris.len() as f64);
        match process {
            Some(p) => Unsubscribe::Release(p),
            None => Unsubscribe::Unknown,
        }
    }
}

/// What [`SharedSubscriptions::leave_all`] took.
pub struct LeftAll {
    /// The URIs whose last holder went, each with the process to unsubscribe it on.
    pub released: Vec<(String, Arc<dyn Upstream>)>,
    /// How many holds went.
    pub dropped: usize,
}

impl SharedSubscriptions {
    /// Takes every holder `stale` picks off every URI.
    pub fn leave_all(&self, stale: impl Fn(&str) -> bool) -> LeftAll {
        let mut uris = self.lock();
        let mut released = Vec::new();
        let mut dropped = 0;
        uris.retain(|uri, h| {
            let before = h.sessions.len();
            h.sessions.retain(|holder| !stale(holder));
            dropped += before - h.sessions.len();
            if before == h.sessions.len() || h.listeners || !h.sessions.is_empty() {
                return true;
            }
            if let Some(p) = h.live() {
                released.push((uri.clone(), p));
            }
            false
        });
        self.gauge.set(uris.len() as f64);
        LeftAll { released, dropped }
    }
}

impl Holders {
    /// The process that has the subscription, while it runs.
    fn live(&self) -> Option<Arc<dyn Upstream>> {
        self.process.upgrade().filter(|p| p.is_alive())
    }

    fn hold(&mut self, owner: Option<&Arc<str>>) {
        match owner {
            Some(o) => {
                self.sessions.insert(o.clone());
            }
            None => self.listeners = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use futures_util::future::BoxFuture;
    use serde_json::Value;

    use super::*;
    use crate::call::CallError;

    /// A process that is only alive or not: the books are what is tested.
    struct Held {
        alive: AtomicBool,
        init: Value,
    }

    impl Upstream for Held {
        fn init(&self) -> &Value {
            &self.init
        }
        fn transport(&self) -> &'static str {
            "stdio"
        }
        fn pid(&self) -> Option<u32> {
            None
        }
        fn shard(&self) -> Option<usize> {
            None
        }
        fn is_alive(&self) -> bool {
            self.alive.load(Ordering::Relaxed)
        }
        fn in_flight(&self) -> usize {
            0
        }
        fn exited(&self) -> BoxFuture<'_, ()> {
            Box::pin(std::future::pending())
        }
        fn call_owned<'a>(
            &'a self,
            _: &'a str,
            _: Option<Value>,
            _: Option<crate::call::EventSink>,
            _: Option<Arc<str>>,
        ) -> BoxFuture<'a, Result<Value, CallError>> {
            Box::pin(async { Ok(Value::Null) })
        }
        fn notify<'a>(&'a self, _: &'a str, _: Option<Value>) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }
        fn stop(&self, _: Duration) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    fn process(alive: bool) -> Arc<dyn Upstream> {
        Arc::new(Held {
            alive: AtomicBool::new(alive),
            init: Value::Null,
        })
    }

    #[test]
    fn a_departed_node_s_holds_go_and_what_no_one_else_holds_is_released() {
        let subs = SharedSubscriptions::new("test");
        let (p, dead) = (process(true), process(false));
        let (gone, stays) = (Arc::<str>::from("2.1/s"), Arc::<str>::from("3.1/s"));
        subs.subscribed("only-gone", Some(&gone), &p);
        subs.subscribed("shared", Some(&gone), &p);
        subs.subscribed("shared", Some(&stays), &p);
        subs.subscribed("listened", Some(&gone), &p);
        subs.subscribed("listened", None, &p);
        subs.subscribed("on-a-dead-process", Some(&gone), &dead);
        subs.subscribed("untouched", Some(&stays), &p);

        let left = subs.leave_all(|h| h.starts_with("2."));
        assert_eq!(left.dropped, 4, "one hold of node 2 on each of four URIs");
        let released: Vec<&str> = left.released.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(
            released,
            ["only-gone"],
            "only what no one else holds goes to its process, if it still runs"
        );
        assert!(
            subs.join("shared", Some(&stays)),
            "kept for the other session"
        );
        assert!(subs.join("listened", None), "kept for the listen stream");
        assert!(subs.join("untouched", Some(&stays)));
        assert!(!subs.join("only-gone", Some(&stays)), "forgotten");

        let again = subs.leave_all(|h| h.starts_with("2."));
        assert_eq!(
            (again.dropped, again.released.len()),
            (0, 0),
            "nothing left of node 2"
        );
    }
}
