//! The one rule for which rate-limit bucket a client address counts in, at the edge and
//! at the origin: an IPv4 address is its own bucket (an IPv4-mapped IPv6 address is its
//! IPv4 address); an IPv6 address counts by its /64 — one subscriber's allocation, so a
//! client cannot walk through 2^64 addresses of its own network to get 2^64 buckets.

use std::net::{IpAddr, Ipv6Addr};

/// The address a client is counted by (see the module doc).
pub fn rate_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// [`rate_key`] of an address written as text (`cf-connecting-ip`), as canonical text:
/// `None` when it is not an IP literal.
pub fn rate_key_of(text: &str) -> Option<String> {
    text.trim()
        .parse::<IpAddr>()
        .ok()
        .map(|ip| rate_key(ip).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_counts_by_its_64_and_ipv4_by_itself() {
        assert_eq!(
            rate_key(ip("2001:db8:1:2:aaaa::1")),
            rate_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_eq!(rate_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_ne!(
            rate_key(ip("2001:db8:1:2::1")),
            rate_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(rate_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(rate_key(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_ne!(rate_key(ip("10.1.2.3")), rate_key(ip("10.1.2.4")));
    }

    #[test]
    fn text_forms_of_one_64_give_one_key() {
        assert_eq!(
            rate_key_of("2001:DB8:1:2::5").as_deref(),
            Some("2001:db8:1:2::")
        );
        assert_eq!(
            rate_key_of(" 2001:db8:0001:0002:dead:beef:0:1 "),
            rate_key_of("2001:db8:1:2::1")
        );
        assert_eq!(rate_key_of("203.0.113.9").as_deref(), Some("203.0.113.9"));
        assert_eq!(
            rate_key_of("::ffff:203.0.113.9").as_deref(),
            Some("203.0.113.9")
        );
        for bad in ["", "evil.example", "1.2.3", "2001:db8::1::2", "::g"] {
            assert_eq!(rate_key_of(bad), None, "{bad}");
        }
    }
}
