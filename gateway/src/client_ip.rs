//! Who the client is, for per-IP rate limits. Behind a proxy (an ingress
//! controller) every connection comes from the proxy, so the address it
//! appends to `X-Forwarded-For` is taken instead — only when the connection
//! comes from a proxy listed in `FLASHMESH_GATEWAY_TRUSTED_PROXIES`, since a
//! client can send any `X-Forwarded-For` it likes.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The client's address: the peer, unless the peer is a trusted proxy; then
/// the right-most `X-Forwarded-For` entry that is not a trusted proxy (the
/// entries left of it were written by the client and prove nothing).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.into_iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if is_trusted(&ip) => continue,
            Ok(ip) => return ip,
            // A proxy wrote something unusable: the last trusted hop is as
            // far as the chain can be followed.
            Err(_) => return peer,
        }
    }
    peer
}

/// `CIDR` or `address` entries, comma-separated.
pub fn parse_networks(raw: &str) -> Result<Vec<IpNet>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{entry:?} is not an address or a CIDR such as 10.0.0.0/8"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(forwarded: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in forwarded {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_a_trusted_peer_is_looked_through() {
        let trusted = parse_networks("10.0.0.0/8, 192.168.1.7").unwrap();
        let spoofed = headers(&["203.0.113.9"]);
        // A client connecting directly cannot choose its address.
        assert_eq!(
            client_ip(ip("198.51.100.1"), &spoofed, &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            client_ip(ip("198.51.100.1"), &spoofed, &[]),
            ip("198.51.100.1")
        );
        // Through the proxy: the address the proxy appended.
        assert_eq!(
            client_ip(ip("10.1.2.3"), &spoofed, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(ip("192.168.1.7"), &spoofed, &trusted),
            ip("203.0.113.9")
        );
        // Entries the client forged sit left of it and are ignored; trusted
        // hops (a second proxy) are skipped, across header lines too.
        let chain = headers(&["1.1.1.1, 203.0.113.9", "10.9.9.9"]);
        assert_eq!(
            client_ip(ip("10.1.2.3"), &chain, &trusted),
            ip("203.0.113.9")
        );
        // No header, only proxies, or garbage where the client should be:
        // the peer.
        assert_eq!(
            client_ip(ip("10.1.2.3"), &headers(&[]), &trusted),
            ip("10.1.2.3")
        );
        let proxies = headers(&["10.0.0.1"]);
        assert_eq!(
            client_ip(ip("10.1.2.3"), &proxies, &trusted),
            ip("10.1.2.3")
        );
        let garbage = headers(&["1.1.1.1, not-an-ip"]);
        assert_eq!(
            client_ip(ip("10.1.2.3"), &garbage, &trusted),
            ip("10.1.2.3")
        );
        // IPv6 too.
        let trusted = parse_networks("fd00::/8").unwrap();
        let v6 = headers(&["2001:db8::1"]);
        assert_eq!(client_ip(ip("fd00::5"), &v6, &trusted), ip("2001:db8::1"));
    }

    #[test]
    fn networks_parse_or_say_what_is_wrong() {
        assert_eq!(parse_networks("").unwrap(), []);
        assert_eq!(parse_networks(" 10.0.0.0/8 ,::1").unwrap().len(), 2);
        let err = parse_networks("10.0.0.0/33").unwrap_err();
        assert!(err.contains("10.0.0.0/33"), "{err}");
        assert!(parse_networks("proxy.local").is_err());
    }
}
