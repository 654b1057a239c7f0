//! One stream's `notifications/{tools,prompts,resources}/list_changed`, coalesced: the first
//! of a list goes at once; more of the same list within [`WINDOW`] after it are held, and one
//! goes when the window closes (and opens the next). A client told lists again, so it
//! lists once per window at most, and always after the last change. A node coming back, or a
//! peer's stream ending, announces each server it runs, several at once: its clients list a
//! few times, not once per server and list.
//!
//! Used by a session's standalone stream (`super::http`) and a `subscriptions/listen` stream
//! (`super::stateless`); the notifications they hold are counted in
//! `mcpd_mcp_list_changes_coalesced_total`.

use std::collections::BTreeMap;

use mcpcp_proto::mcp::Message;
use tokio::time::{Duration, Instant};

use crate::pool::catalogue::list_of;

/// How long after a list's notification the next ones of that list are held.
pub const WINDOW: Duration = Duration::from_millis(250);

/// A list's open window: until when, and whether a notification is held for its end.
struct Window {
    until: Instant,
    held: Option<Message>,
}

/// The windows of one stream, by list.
#[derive(Default)]
pub struct ListChanges {
    windows: BTreeMap<&'static str, Window>,
}

impl ListChanges {
    /// Whether `message` goes now: anything but a list change does; a list change does when
    /// its list has no open window (and opens one), else it is held for the window's end.
    pub fn admit(&mut self, message: &Message, now: Instant) -> bool {
        // The three lists only: a server's made-up `*/list_changed` opens no window.
        let Some(list) = message.method().and_then(list_of) else {
            return true;
        };
        match self.windows.get_mut(list) {
            Some(w) if now < w.until => {
                w.held = Some(message.clone());
                metrics::counter!("mcpd_mcp_list_changes_coalesced_total").increment(1);
                false
            }
            _ => {
                let window = Window {
                    until: now + WINDOW,
                    held: None,
                };
                self.windows.insert(list, window);
                true
            }
        }
    }

    /// When the first window with a held notification closes.
    pub fn next_due(&self) -> Option<Instant> {
        self.windows
            .values()
            .filter(|w| w.held.is_some())
            .map(|w| w.until)
            .min()
    }

    /// Closes the windows that ended by `now`, and gives the notifications they held: each
    /// goes through [`ListChanges::admit`] as a new one, which opens its list's next window.
    pub fn due(&mut self, now: Instant) -> Vec<Message> {
        let mut out = Vec::new();
        self.windows.retain(|_, w| {
            if now < w.until {
                return true;
            }
            out.extend(w.held.take());
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::catalogue::list_changed;

    #[test]
    fn the_first_goes_at_once_the_rest_of_a_window_once_at_its_end() {
        let mut c = ListChanges::default();
        let t0 = Instant::now();
        let tools = list_changed("tools");
        assert!(c.admit(&tools, t0), "the first goes at once");
        assert!(
            c.admit(&list_changed("prompts"), t0),
            "another list has its own window"
        );
        assert!(!c.admit(&tools, t0 + Duration::from_millis(10)));
        assert!(!c.admit(&tools, t0 + Duration::from_millis(20)));
        assert_eq!(c.next_due(), Some(t0 + WINDOW));
        assert!(c.due(t0 + Duration::from_millis(100)).is_empty());

        let end = t0 + WINDOW;
        let sent = c.due(end);
        assert_eq!(sent.len(), 1, "one for the held ones");
        assert_eq!(sent[0].method(), Some("notifications/tools/list_changed"));
        assert!(c.admit(&sent[0], end), "it goes, and opens the next window");
        assert!(!c.admit(&tools, end + Duration::from_millis(1)));
        // The prompts' window closed with nothing held.
        assert!(c.admit(&list_changed("prompts"), end + Duration::from_millis(1)));
        let again = c.due(end + WINDOW);
        assert_eq!(again.len(), 1);
        assert!(c.admit(&again[0], end + WINDOW));
        assert!(c.due(end + WINDOW * 2).is_empty());
        assert_eq!(c.next_due(), None);
        assert!(
            c.admit(&tools, end + WINDOW * 3),
            "a quiet list starts afresh"
        );
    }

    #[test]
    fn other_notifications_are_never_held() {
        let mut c = ListChanges::default();
        let t0 = Instant::now();
        for method in ["notifications/message", "notifications/things/list_changed"] {
            let other = Message::notification(method, None);
            assert!(c.admit(&other, t0));
            assert!(c.admit(&other, t0));
        }
        assert_eq!(c.next_due(), None);
        assert!(c.windows.is_empty(), "no window for them");
    }
}
