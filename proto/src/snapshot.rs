//! The registry snapshot file: what `GET /v1/snapshot` streams, `mcpctl snapshot save` writes
//! and `mcpctl snapshot restore` reads back.
//!
//! ```text
//! MCPD-SNAPSHOT 1\n          magic and format version
//! {"cluster":..,...}\n        the header (JSON, one line): where and when it was taken, and
//!                             the length and SHA-256 of the state that follows
//! <data_bytes bytes>          the registry's state machine (JSON), exactly as a node holds it
//! ```
//!
//! The checksum is known before the first byte of state is sent (a node serialises its state
//! first), so a reader verifies the file in one pass and never trusts a file it has not read to
//! the end: a truncated download, a flipped bit or bytes appended after the state are each
//! refused with their own error.

use std::io::{BufRead, BufReader, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first line of every snapshot file.
pub const MAGIC: &str = "MCPD-SNAPSHOT";
/// The file format this build writes and reads.
pub const FORMAT: u32 = 1;
/// The longest header line a reader accepts.
const MAX_HEADER: u64 = 64 * 1024;

/// Where and when a snapshot was taken, and how to check the state that follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// The cluster id of the CA of the node that took it.
    pub cluster: String,
    /// The registry revision the snapshot holds.
    pub revision: u64,
    /// The Raft log position it was taken at (last applied entry).
    pub last_log_index: u64,
    pub last_log_term: u64,
    /// The node that took it, and whether it was the leader then.
    pub node: u64,
    pub leader: bool,
    /// Unix seconds.
    pub taken_at: u64,
    /// The mcpd version that took it.
    pub version: String,
    /// The length and SHA-256 (hex) of the state after the header.
    pub data_bytes: u64,
    pub sha256: String,
}

/// What `mcpctl snapshot restore` leaves in a new node's data directory for `mcpd` to build
/// its stores from at its first start: this plan ([`RESTORE_PLAN`]) beside a copy of the
/// snapshot file ([`RESTORE_SNAPSHOT`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePlan {
    /// The node this data directory belongs to.
    pub node: u64,
    /// Every member of the restored cluster (all voters); `node` among them.
    pub members: Vec<crate::api::Member>,
    /// A learner's own state made into a one-node cluster (`mcpctl cluster promote
    /// --force-new-cluster`): the node keeps its id, which the snapshot's cluster knew.
    #[serde(default)]
    pub force_new_cluster: bool,
    /// Accept audit events without a MAC before the first that has one (a snapshot whose
    /// trail began on a release that did not key it). Otherwise such a trail is refused: its
    /// MACs may have been taken off.
    #[serde(default)]
    pub allow_unkeyed_audit: bool,
}

impl RestorePlan {
    /// What every member of one restore shares, and a member given another member list or
    /// another snapshot does not: SHA-256 over the snapshot's checksum and the members.
    pub fn fingerprint(&self, snapshot_sha256: &str) -> String {
        let mut members: Vec<String> = self.members.iter().map(member_arg).collect();
        members.sort();
        let text = format!("{snapshot_sha256}\n{}", members.join("\n"));
        hex::encode(&Sha256::digest(text.as_bytes())[..16])
    }

    /// Checks that the plan names this node among the members, each once, and that the members
    /// are new to the snapshot's cluster, whose every node id is `ever` (a node made a cluster
    /// of its own by force keeps its id).
    pub fn check(&self, ever: &std::collections::BTreeSet<u64>) -> Result<(), String> {
        let ids: std::collections::BTreeSet<u64> = self.members.iter().map(|m| m.id).collect();
        if ids.len() != self.members.len() {
            return Err("a member id is given twice".into());
        }
        if !ids.contains(&self.node) {
            return Err(format!("node {} is not one of the members", self.node));
        }
        let reused: Vec<String> = ids
            .iter()
            .filter(|id| ever.contains(id) && !(self.force_new_cluster && **id == self.node))
            .map(u64::to_string)
            .collect();
        if reused.is_empty() {
            return Ok(());
        }
        let next = ever.iter().max().map_or(1, |m| m + 1);
        Err(format!(
            "node ids {} were members of the snapshot's cluster; a restored cluster takes new ids ({next} and up), so that a node of the old cluster can never talk to it",
            reused.join(", ")
        ))
    }
}

/// A member as `mcpctl snapshot restore --member` takes it: `ID=HTTP_ADDR,GRPC_ADDR`.
pub fn member_arg(m: &crate::api::Member) -> String {
    format!("{}={},{}", m.id, m.http_addr, m.grpc_addr)
}

/// Reads [`member_arg`]'s form back.
pub fn parse_member(text: &str) -> Result<crate::api::Member, String> {
    let (id, addrs) = text
        .split_once('=')
        .ok_or_else(|| format!("--member {text}: expected ID=HTTP_ADDR,GRPC_ADDR"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("--member {text}: the id must be a number"))?;
    let (http, grpc) = addrs
        .split_once(',')
        .ok_or_else(|| format!("--member {text}: expected ID=HTTP_ADDR,GRPC_ADDR"))?;
    Ok(crate::api::Member {
        id,
        http_addr: http.trim().to_string(),
        grpc_addr: grpc.trim().to_string(),
    })
}

/// The restore plan's file name in a data directory.
pub const RESTORE_PLAN: &str = "restore.json";
/// The snapshot's file name in a data directory that waits for its restore.
pub const RESTORE_SNAPSHOT: &str = "restore.snapshot";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not an mcpd snapshot (the file does not start with {MAGIC})")]
    NotASnapshot,
    #[error("snapshot format {0} is not one this build reads (it reads format {FORMAT})")]
    Format(String),
    #[error("the snapshot's header is unreadable: {0}")]
    Header(String),
    #[error("the snapshot's state is unreadable: {0}")]
    State(String),
    #[error("the snapshot is truncated: its header promises {expected} bytes of state, the file holds {got}")]
    Truncated { expected: u64, got: u64 },
    #[error("the snapshot has bytes after its state: it was appended to or is not one file")]
    TrailingBytes,
    #[error(
        "the snapshot is corrupted: its state's SHA-256 is {actual}, its header says {expected}"
    )]
    Checksum { expected: String, actual: String },
    #[error("reading the snapshot: {0}")]
    Io(#[from] std::io::Error),
}

impl SnapshotHeader {
    /// A header for `data`, filling in its length and checksum.
    pub fn describe(mut self, data: &[u8]) -> SnapshotHeader {
        self.data_bytes = data.len() as u64;
        self.sha256 = hex::encode(Sha256::digest(data));
        self
    }

    /// The magic line and the header line: everything before the state.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{MAGIC} {FORMAT}\n").into_bytes();
        // A struct of strings and numbers always serialises.
        out.extend(serde_json::to_vec(self).unwrap_or_default());
        out.push(b'\n');
        out
    }
}

/// Reads the magic and header lines, leaving `r` at the first byte of state.
pub fn read_header<R: BufRead>(r: &mut R) -> Result<SnapshotHeader, SnapshotError> {
    let magic = read_line(r)?;
    let Some(format) = magic.strip_prefix(MAGIC).map(str::trim) else {
        return Err(SnapshotError::NotASnapshot);
    };
    if format != FORMAT.to_string() {
        return Err(SnapshotError::Format(format.to_string()));
    }
    let header = read_line(r)?;
    serde_json::from_str(&header).map_err(|e| SnapshotError::Header(e.to_string()))
}

fn read_line<R: BufRead>(r: &mut R) -> Result<String, SnapshotError> {
    let mut line = Vec::new();
    r.take(MAX_HEADER).read_until(b'\n', &mut line)?;
    if line.pop() != Some(b'\n') {
        return Err(SnapshotError::NotASnapshot);
    }
    String::from_utf8(line).map_err(|_| SnapshotError::NotASnapshot)
}

/// Reads a whole snapshot, checking its length and checksum, and returns its header and state.
pub fn read(r: impl Read) -> Result<(SnapshotHeader, Vec<u8>), SnapshotError> {
    let mut r = BufReader::new(r);
    let header = read_header(&mut r)?;
    // The header is not trusted yet: it only hints at the size.
    let mut data = Vec::with_capacity(header.data_bytes.min(64 << 20) as usize);
    (&mut r).take(header.data_bytes).read_to_end(&mut data)?;
    check(&header, &data, &mut r)?;
    Ok((header, data))
}

/// Checks a whole snapshot without keeping its state, and returns its header.
pub fn verify(r: impl Read) -> Result<SnapshotHeader, SnapshotError> {
    let mut r = BufReader::new(r);
    let header = read_header(&mut r)?;
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let mut data = (&mut r).take(header.data_bytes);
    loop {
        let n = data.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        got += n as u64;
    }
    finish(&header, got, hex::encode(hasher.finalize()), &mut r)?;
    Ok(header)
}

fn check<R: Read>(header: &SnapshotHeader, data: &[u8], rest: &mut R) -> Result<(), SnapshotError> {
    let actual = hex::encode(Sha256::digest(data));
    finish(header, data.len() as u64, actual, rest)
}

fn finish<R: Read>(
    header: &SnapshotHeader,
    got: u64,
    actual: String,
    rest: &mut R,
) -> Result<(), SnapshotError> {
    if got < header.data_bytes {
        return Err(SnapshotError::Truncated {
            expected: header.data_bytes,
            got,
        });
    }
    if rest.read(&mut [0u8; 1])? != 0 {
        return Err(SnapshotError::TrailingBytes);
    }
    if actual != header.sha256 {
        return Err(SnapshotError::Checksum {
            expected: header.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(data: &[u8]) -> Vec<u8> {
        let header = SnapshotHeader {
            cluster: "prod".into(),
            revision: 7,
            last_log_index: 12,
            last_log_term: 3,
            node: 1,
            leader: true,
            taken_at: 1_700_000_000,
            version: "0.1.0".into(),
            data_bytes: 0,
            sha256: String::new(),
        }
        .describe(data);
        let mut out = header.encode();
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn a_member_reads_back_as_written_and_a_bad_one_is_named() {
        let m = parse_member("4=10.0.0.4:7000,10.0.0.4:7001").expect("parses");
        assert_eq!((m.id, m.http_addr.as_str()), (4, "10.0.0.4:7000"));
        assert_eq!(m.grpc_addr, "10.0.0.4:7001");
        assert_eq!(parse_member(&member_arg(&m)), Ok(m));
        for bad in ["4", "x=a,b", "4=a"] {
            assert!(parse_member(bad).is_err_and(|e| e.contains(bad)), "{bad}");
        }
    }

    #[test]
    fn a_snapshot_reads_back_whole() {
        let f = file(br#"{"state":1}"#);
        let (header, data) = read(f.as_slice()).expect("reads");
        assert_eq!(data, br#"{"state":1}"#);
        assert_eq!(header.revision, 7);
        assert_eq!(verify(f.as_slice()).expect("verifies"), header);
    }

    #[test]
    fn a_flipped_bit_is_refused_as_corrupted() {
        let mut f = file(br#"{"state":1}"#);
        let last = f.len() - 2;
        f[last] ^= 1;
        assert!(matches!(
            read(f.as_slice()),
            Err(SnapshotError::Checksum { .. })
        ));
        assert!(matches!(
            verify(f.as_slice()),
            Err(SnapshotError::Checksum { .. })
        ));
    }

    #[test]
    fn a_truncated_or_extended_file_is_refused() {
        let f = file(br#"{"state":1}"#);
        let short = &f[..f.len() - 3];
        assert!(matches!(
            verify(short),
            Err(SnapshotError::Truncated {
                expected: 11,
                got: 8
            })
        ));
        let mut long = f.clone();
        long.push(b'x');
        assert!(matches!(
            verify(long.as_slice()),
            Err(SnapshotError::TrailingBytes)
        ));
    }

    #[test]
    fn another_file_or_format_is_named_as_such() {
        assert!(matches!(
            verify(&b"{\"servers\":{}}\n"[..]),
            Err(SnapshotError::NotASnapshot)
        ));
        assert!(matches!(
            verify(&b"MCPD-SNAPSHOT 9\n{}\n"[..]),
            Err(SnapshotError::Format(f)) if f == "9"
        ));
        assert!(matches!(
            verify(&b"MCPD-SNAPSHOT 1\n{\"cluster\":1}\n"[..]),
            Err(SnapshotError::Header(_))
        ));
    }
}
