//! Where a tenant's remote server may be reached: not at an address only the nodes can use.
//! A tenant admin cannot write such an address into a URL (`api::objects`), and a DNS name is
//! resolved here, at every connection, keeping only other addresses: a name pointed at
//! `127.0.0.1` or the cloud metadata address `169.254.169.254` cannot make a node call its own
//! services on a tenant's behalf (SSRF), and a name re-pointed after the check (DNS rebinding)
//! meets the same filter.

use std::net::{IpAddr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether `ip` is one only the nodes themselves can use: loopback, link-local (the AWS, GCP
/// and Azure metadata address among them), `0.0.0.0/8`, unspecified, and the other clouds'
/// metadata addresses (Alibaba's `100.100.100.200`, AWS's IPv6 `fd00:ec2::254`); an IPv4
/// address inside an IPv6 one (mapped, compatible, NAT64) counts as itself.
pub fn node_only(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            ip.is_loopback()
                || ip.is_link_local()
                || ip.octets()[0] == 0
                || ip == std::net::Ipv4Addr::new(100, 100, 100, 200)
        }
        IpAddr::V6(ip) => {
            let s = ip.segments();
            let embedded = if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
                || s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified()
            {
                let o = ip.octets();
                Some(std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]))
            } else {
                ip.to_ipv4_mapped()
            };
            match embedded {
                Some(v4) => node_only(IpAddr::V4(v4)),
                None => {
                    ip.is_loopback()
                        || ip.is_unspecified()
                        || (s[0] & 0xffc0) == 0xfe80
                        || ip == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                }
            }
        }
    }
}

/// The system resolver, less the addresses of [`node_only`].
pub struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found.into_iter().filter(|a| !node_only(a.ip())).collect();
            if kept.is_empty() {
                metrics::counter!("mcpd_egress_refused_total").increment(1);
                return Err(format!(
                    "{host} resolves only to addresses the nodes keep to themselves (loopback, link-local, unspecified): refused for a tenant's server"
                )
                .into());
            }
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_own_addresses_are_kept_from_tenants() {
        for ip in [
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.100.100.200",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::169.254.169.254",
        ] {
            assert!(node_only(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.5",
            "93.184.216.34",
            "2001:db8::1",
            "64:ff9b::5db8:d822",
        ] {
            assert!(!node_only(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_only_is_refused() {
        let name: Name = "localhost".parse().unwrap();
        let err = match PublicOnly.resolve(name).await {
            Ok(_) => panic!("localhost resolved for a tenant"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("keep to themselves"), "{err}");
    }
}
