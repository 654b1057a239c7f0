//! Live traffic: this node's own figures per server over the last minutes (calls, errors,
//! p50 and p99 latency per time bucket), kept in memory for the console's charts
//! (`GET /v1/traffic`). Prometheus and Grafana stay the long-term view; this ring is what a
//! person looking at one node needs without either.
//!
//! One mutex-guarded map; a call takes it once, after its answer, to add one sample. Each
//! bucket keeps a log-scaled latency histogram (bounds growing by 25 %), so a percentile is
//! within a quarter of the true value whatever the spread.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use mcpcp_proto::api::{TrafficPoint, TrafficReport};
use serde::Deserialize;

/// Latency bounds: 0.05 ms × 1.25^i, i < BINS (up to about 20 minutes); the last bin
/// takes anything slower.
const BINS: usize = 77;
const FIRST_BOUND_MS: f64 = 0.05;
const GROWTH: f64 = 1.25;
/// Buckets the ring may hold in all (`max_servers` × the window's buckets).
const MAX_BUCKETS: u64 = 200_000;

/// `[traffic]`: how much of its own traffic a node keeps for the console.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrafficConfig {
    /// Width of one point of the charts, seconds (1 to 300).
    pub bucket_s: u64,
    /// How far back the ring reaches, seconds (a multiple of `bucket_s`, at most 86400).
    pub window_s: u64,
    /// Servers followed at most; calls to further servers are counted in
    /// `mcpd_traffic_untracked_total` and not charted.
    pub max_servers: usize,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            bucket_s: 10,
            window_s: 900,
            max_servers: 512,
        }
    }
}

impl TrafficConfig {
    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=300).contains(&self.bucket_s) {
            return Err(("traffic.bucket_s", "must be 1 to 300".into()));
        }
        if self.window_s < self.bucket_s
            || self.window_s > 86_400
            || !self.window_s.is_multiple_of(self.bucket_s)
        {
            return Err((
                "traffic.window_s",
                "must be a multiple of bucket_s, at most 86400".into(),
            ));
        }
        if !(1..=100_000).contains(&self.max_servers) {
            return Err(("traffic.max_servers", "must be 1 to 100000".into()));
        }
        // Each bucket is about 330 bytes: this bounds the ring at about 66 MB.
        let buckets = self.max_servers as u64 * (self.window_s / self.bucket_s);
        if buckets > MAX_BUCKETS {
            return Err((
                "traffic.max_servers",
                format!("max_servers × window_s / bucket_s is {buckets}; at most {MAX_BUCKETS}"),
            ));
        }
        Ok(())
    }
}

/// One time bucket of one server.
struct Bucket {
    /// Its start, unix seconds, a multiple of `bucket_s`.
    start: u64,
    calls: u64,
    errors: u64,
    latency: [u32; BINS],
}

impl Bucket {
    fn new(start: u64) -> Bucket {
        Bucket {
            start,
            calls: 0,
            errors: 0,
            latency: [0; BINS],
        }
    }

    /// The upper bound of the bin holding quantile `q` (0 < q ≤ 1).
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().map(|&c| u64::from(c)).sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &c) in self.latency.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return Some(bound_ms(i));
            }
        }
        Some(bound_ms(BINS - 1))
    }
}

fn bound_ms(bin: usize) -> f64 {
    FIRST_BOUND_MS * GROWTH.powi(bin as i32)
}

fn bin_of(ms: f64) -> usize {
    if ms <= FIRST_BOUND_MS {
        return 0;
    }
    let i = ((ms / FIRST_BOUND_MS).ln() / GROWTH.ln()).ceil() as usize;
    i.min(BINS - 1)
}

/// The ring. Cheap to clone.
#[derive(Clone)]
pub struct Traffic {
    config: Arc<TrafficConfig>,
    servers: Arc<Mutex<HashMap<String, VecDeque<Bucket>>>>,
}

impl Traffic {
    pub fn new(config: TrafficConfig) -> Traffic {
        Traffic {
            config: Arc::new(config),
            servers: Arc::default(),
        }
    }

    /// Adds one call to `server` that ended at unix second `now`.
    pub fn observe(&self, server: &str, failed: bool, latency_ms: f64, now: u64) {
        let bucket_s = self.config.bucket_s;
        let keep = (self.config.window_s / bucket_s) as usize;
        let start = now - now % bucket_s;
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if !servers.contains_key(server) {
            if servers.len() >= self.config.max_servers {
                // Make room from servers with no call in the window (removed or idle ones).
                let window = self.config.window_s;
                servers.retain(|_, ring| ring.back().is_some_and(|b| b.start + window > start));
                if servers.len() >= self.config.max_servers {
                    metrics::counter!("mcpd_traffic_untracked_total").increment(1);
                    return;
                }
            }
            // The name is copied once per server, not once per call.
            servers.insert(server.to_string(), VecDeque::new());
        }
        let Some(ring) = servers.get_mut(server) else {
            return;
        };
        if ring.back().is_none_or(|b| b.start < start) {
            ring.push_back(Bucket::new(start));
        }
        while ring.len() > keep
            || ring
                .front()
                .is_some_and(|b| b.start + keep as u64 * bucket_s <= start)
        {
            ring.pop_front();
        }
        // A call that ended in an earlier bucket than the newest (clocks step back) joins the
        // newest: the ring only grows forwards.
        let Some(b) = ring.back_mut() else {
            return;
        };
        b.calls += 1;
        b.errors += u64::from(failed);
        b.latency[bin_of(latency_ms)] += 1;
    }

    /// The figures of the servers `visible` lets through, as of unix second `now`.
    pub fn report(&self, node: u64, now: u64, visible: impl Fn(&str) -> bool) -> TrafficReport {
        let bucket_s = self.config.bucket_s;
        let oldest = now.saturating_sub(self.config.window_s);
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        // Servers without a call in the window (removed or idle) leave the ring.
        servers.retain(|_, ring| ring.back().is_some_and(|b| b.start + bucket_s > oldest));
        let figures: BTreeMap<String, Vec<TrafficPoint>> = servers
            .iter()
            .filter(|(name, _)| visible(name))
            .map(|(name, ring)| {
                let points = ring
                    .iter()
                    .filter(|b| b.start + bucket_s > oldest)
                    .map(|b| TrafficPoint {
                        t: b.start,
                        calls: b.calls,
                        errors: b.errors,
                        p50_ms: b.quantile_ms(0.5),
                        p99_ms: b.quantile_ms(0.99),
                    })
                    .collect();
                (name.clone(), points)
            })
            .collect();
        TrafficReport {
            node,
            now,
            bucket_s,
            window_s: self.config.window_s,
            servers: figures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(bucket_s: u64, window_s: u64, max_servers: usize) -> Traffic {
        Traffic::new(TrafficConfig {
            bucket_s,
            window_s,
            max_servers,
        })
    }

    #[test]
    fn calls_land_in_their_bucket_with_counts_and_percentiles() {
        let t = ring(10, 60, 8);
        for i in 0..100 {
            // 1..=100 ms, one of them failed.
            t.observe("time", i == 0, f64::from(i + 1), 1005);
        }
        t.observe("time", false, 3.0, 1012);
        let r = t.report(1, 1012, |_| true);
        let points = &r.servers["time"];
        assert_eq!(points.len(), 2);
        assert_eq!(
            (points[0].t, points[0].calls, points[0].errors),
            (1000, 100, 1)
        );
        let p50 = points[0].p50_ms.unwrap();
        let p99 = points[0].p99_ms.unwrap();
        assert!((50.0..=62.5).contains(&p50), "p50 {p50}");
        assert!((99.0..=124.0).contains(&p99), "p99 {p99}");
        assert_eq!((points[1].t, points[1].calls), (1010, 1));
    }

    #[test]
    fn the_ring_forgets_what_is_older_than_its_window() {
        let t = ring(10, 30, 8);
        for now in [100, 110, 120, 130, 140] {
            t.observe("a", false, 1.0, now);
        }
        let r = t.report(1, 140, |_| true);
        let starts: Vec<u64> = r.servers["a"].iter().map(|p| p.t).collect();
        assert_eq!(starts, vec![120, 130, 140]);
        // Read later without new calls: old points drop out of the report too.
        assert_eq!(t.report(1, 175, |_| true).servers["a"].len(), 1);
    }

    #[test]
    fn servers_past_the_bound_are_not_followed_and_hidden_ones_not_shown() {
        let t = ring(10, 60, 2);
        t.observe("a", false, 1.0, 100);
        t.observe("b", false, 1.0, 100);
        t.observe("c", false, 1.0, 100);
        let r = t.report(1, 100, |s| s != "b");
        assert_eq!(r.servers.keys().collect::<Vec<_>>(), vec!["a"]);
        // Once a and b have had no call for the window, c takes a place.
        t.observe("b", false, 1.0, 130);
        t.observe("c", false, 1.0, 170);
        let r = t.report(1, 170, |_| true);
        assert_eq!(r.servers.keys().collect::<Vec<_>>(), vec!["b", "c"]);
    }

    #[test]
    fn latency_bins_cover_the_range_and_grow_by_a_quarter() {
        assert_eq!(bin_of(0.0), 0);
        assert_eq!(bin_of(0.05), 0);
        assert_eq!(bin_of(0.0626), 2);
        assert_eq!(bin_of(1e12), BINS - 1);
        for ms in [0.3, 7.0, 120.0, 9000.0] {
            let b = bin_of(ms);
            assert!(
                bound_ms(b) >= ms && bound_ms(b) < ms * GROWTH,
                "{ms} → {}",
                bound_ms(b)
            );
        }
    }

    #[test]
    fn config_names_the_bad_field() {
        let bad = TrafficConfig {
            window_s: 905,
            ..TrafficConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "traffic.window_s");
        let bad = TrafficConfig {
            bucket_s: 0,
            ..TrafficConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "traffic.bucket_s");
        let bad = TrafficConfig {
            bucket_s: 1,
            window_s: 86_400,
            max_servers: 100,
        };
        assert_eq!(bad.validate().unwrap_err().0, "traffic.max_servers");
        assert!(TrafficConfig::default().validate().is_ok());
    }
}
