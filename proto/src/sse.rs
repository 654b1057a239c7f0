//! A minimal server-sent-events reader (the Streamable HTTP transport's streams): splits a byte
//! stream into events and yields the data of each (`data:` lines joined), with its id.
//! Comments are skipped. It keeps the stream's last event id (also of a priming event, an id
//! with no data) and its `retry:` hint, which a reader that lost the stream resumes with
//! (`Last-Event-ID`). Used by the nodes, the bridge, the chaos harness, the tests and the
//! benchmarks alike.

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    /// The event's type (`event:`), when it names one (`endpoint` in the legacy HTTP+SSE
    /// transport).
    pub event: Option<String>,
    pub data: String,
}

/// Incremental parser: feed it chunks, take complete events.
#[derive(Default)]
pub struct SseParser {
    /// Bytes not yet ending in a newline.
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline (a long line is scanned once).
    scanned: usize,
    data: Vec<String>,
    id: Option<String>,
    event: Option<String>,
    /// The id of the last event read whole, priming events included (the SSE "last event
    /// ID", which a resumed stream is asked to follow).
    last_event_id: Option<String>,
    /// The last `retry:` hint (ms).
    retry_ms: Option<u64>,
}

impl SseParser {
    /// Feeds a chunk; returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        loop {
            let Some(at) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buf.len();
                break;
            };
            let pos = self.scanned + at;
            self.scanned = 0;
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if let Some(id) = &self.id {
                    self.last_event_id = Some(id.clone()).filter(|id| !id.is_empty());
                }
                // A priming event (an id and empty data) carries no message.
                if self.data.iter().any(|d| !d.is_empty()) {
                    out.push(SseEvent {
                        id: self.id.take(),
                        event: self.event.take(),
                        data: self.data.join("\n"),
                    });
                }
                self.data.clear();
                self.id = None;
                self.event = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "data" => self.data.push(value.to_string()),
                // An empty id resets the stream's last event id (the SSE rules).
                "id" => self.id = Some(value.to_string()),
                "event" => self.event = Some(value.to_string()),
                "retry" => {
                    if let Ok(ms) = value.parse() {
                        self.retry_ms = Some(ms);
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// The id of the last event read whole, if the stream gave one.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// The stream's last `retry:` hint (ms).
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Drops the event being read when its stream broke off, keeping the last event id and
    /// the retry hint, to read the stream that resumes it.
    pub fn resume(&mut self) {
        self.buf.clear();
        self.scanned = 0;
        self.data.clear();
        self.id = None;
        self.event = None;
    }

    /// Bytes held for the event being read (a reader of an endless stream bounds it).
    pub fn pending(&self) -> usize {
        self.buf.len() + self.data.iter().map(String::len).sum::<usize>()
    }

    /// Ends the stream: the event still being read when it ends without a blank line.
    pub fn finish(&mut self) -> Option<SseEvent> {
        self.feed(b"\n\n").pop()
    }
}

/// The data of every event of a whole SSE body, the last one also without a blank line after it.
pub fn events(body: &[u8]) -> Vec<String> {
    let mut p = SseParser::default();
    let mut out: Vec<String> = p.feed(body).into_iter().map(|e| e.data).collect();
    out.extend(p.finish().map(|e| e.data));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_bodies_are_split_into_events() {
        let body = b"event: message\ndata: {\"a\":1}\n\ndata: {\"id\":3,\ndata: \"result\":{}}\n\n: ping\ndata: last";
        assert_eq!(
            events(body),
            vec!["{\"a\":1}", "{\"id\":3,\n\"result\":{}}", "last"]
        );
        assert!(events(b"").is_empty());
        assert_eq!(events(b"data: x\r\n\r\n"), vec!["x"]);
    }

    #[test]
    fn events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.feed(b"event: message\nid: 1\ndata: {\"a\"").is_empty());
        let ev = p.feed(b":1}\n\n: keep-alive\n\ndata: x\r\ndata: y\r\n\r\n");
        assert_eq!(
            ev,
            vec![
                SseEvent {
                    id: Some("1".into()),
                    event: Some("message".into()),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    id: None,
                    event: None,
                    data: "x\ny".into()
                }
            ]
        );
    }

    #[test]
    fn priming_events_without_data_are_skipped() {
        let mut p = SseParser::default();
        assert!(p.feed(b"id: e1\nretry: 500\ndata: \n\n").is_empty());
        assert_eq!(p.feed(b"data: z\n\n")[0].id, None);
    }

    #[test]
    fn the_last_event_id_and_retry_hint_are_kept_to_resume_with() {
        let mut p = SseParser::default();
        assert_eq!(p.last_event_id(), None);
        p.feed(b"id: e1\nretry: 500\ndata: \n\n");
        assert_eq!((p.last_event_id(), p.retry_ms()), (Some("e1"), Some(500)));
        p.feed(b"id: e2\ndata: {}\n\ndata: no id\n\n");
        assert_eq!(
            p.last_event_id(),
            Some("e2"),
            "an event without an id keeps it"
        );
        // An event cut off halfway does not count, and is dropped on resuming.
        p.feed(b"id: e3\ndata: {\"half");
        assert_eq!(p.last_event_id(), Some("e2"));
        p.resume();
        assert_eq!(p.pending(), 0);
        let ev = p.feed(b"id: e3\ndata: {}\n\n");
        assert_eq!(ev[0].data, "{}");
        assert_eq!((p.last_event_id(), p.retry_ms()), (Some("e3"), Some(500)));
        p.feed(b"id:\ndata: {}\n\n");
        assert_eq!(p.last_event_id(), None, "an empty id resets it");
    }

    #[test]
    fn an_event_split_over_many_chunks_is_read_once_whole() {
        let mut p = SseParser::default();
        let body = format!("id: 7\ndata: {}\n\n", "x".repeat(10_000));
        let mut got = Vec::new();
        for chunk in body.as_bytes().chunks(7) {
            got.extend(p.feed(chunk));
            assert!(p.pending() <= body.len());
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id.as_deref(), Some("7"));
        assert_eq!(got[0].data.len(), 10_000);
        assert_eq!(p.pending(), 0);
    }
}
