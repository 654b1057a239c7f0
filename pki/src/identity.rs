//! Who a certificate names. A node's peer certificate carries one URI SAN,
//! `spiffe://<cluster-id>/node/<id>`, and one DNS SAN, [`ClusterId::peer_server_name`], which
//! every node's certificate shares: a node dialing a peer checks that the peer holds a
//! certificate of the cluster (chain and name), and the node that accepts the call reads the
//! caller's node id from the URI to check it against the membership.

use std::fmt;

use x509_parser::extensions::GeneralName;

use crate::PkiError;

/// A cluster's id: 1 to 63 lowercase letters, digits and `-` (a DNS label), chosen when its
/// CA is made and named in every certificate the CA issues.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterId(String);

impl ClusterId {
    pub fn new(id: &str) -> Result<ClusterId, PkiError> {
        let ok = !id.is_empty()
            && id.len() <= 63
            && !id.starts_with('-')
            && !id.ends_with('-')
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(ClusterId(id.to_string()))
        } else {
            Err(PkiError::BadClusterId(id.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE trust domain URI of the cluster, named by its CA.
    pub fn uri(&self) -> String {
        format!("spiffe://{}", self.0)
    }

    /// The TLS server name every node's peer certificate carries and every node dials its
    /// peers by (peers are reached by address; their identity is the cluster's).
    pub fn peer_server_name(&self) -> String {
        format!("mcpd.{}.internal", self.0)
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A node of a cluster, as its certificate names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeIdentity {
    pub cluster: ClusterId,
    pub node: u64,
}

impl NodeIdentity {
    pub fn uri(&self) -> String {
        format!("spiffe://{}/node/{}", self.cluster, self.node)
    }

    /// Parses `spiffe://<cluster>/node/<id>`.
    pub fn from_uri(uri: &str) -> Option<NodeIdentity> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (cluster, path) = rest.split_once('/')?;
        let node: u64 = path.strip_prefix("node/")?.parse().ok()?;
        (node > 0).then_some(())?;
        Some(NodeIdentity {
            cluster: ClusterId::new(cluster).ok()?,
            node,
        })
    }

    /// The node identity a (DER) certificate names, if it names exactly one.
    pub fn from_cert(der: &[u8]) -> Option<NodeIdentity> {
        let mut found = uri_sans(der).into_iter().filter_map(|u| Self::from_uri(&u));
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// The URI SANs of a DER certificate (none when it does not parse).
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// The cluster a CA certificate names (its `spiffe://<cluster-id>` URI SAN).
pub fn cluster_of_ca(der: &[u8]) -> Result<ClusterId, PkiError> {
    uri_sans(der)
        .iter()
        .find_map(|u| {
            let id = u.strip_prefix("spiffe://")?;
            (!id.contains('/')).then(|| ClusterId::new(id).ok())?
        })
        .ok_or(PkiError::NoClusterInCa)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_uris_round_trip_and_junk_is_refused() {
        let id = NodeIdentity {
            cluster: ClusterId::new("prod-eu").expect("valid"),
            node: 7,
        };
        assert_eq!(id.uri(), "spiffe://prod-eu/node/7");
        assert_eq!(NodeIdentity::from_uri(&id.uri()), Some(id));
        for bad in [
            "spiffe://prod/node/0",
            "spiffe://prod/node/x",
            "spiffe://Prod/node/1",
            "spiffe://prod/admin/1",
            "https://prod/node/1",
        ] {
            assert_eq!(NodeIdentity::from_uri(bad), None, "{bad}");
        }
        assert!(ClusterId::new("-x").is_err());
        assert!(ClusterId::new(&"a".repeat(64)).is_err());
    }
}
