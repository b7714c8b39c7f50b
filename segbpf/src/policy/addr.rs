//! Addresses in roles.toml: bare addresses, CIDRs and inclusive ranges of
//! IPv4 or IPv6, all held as an inclusive [`AddrRange`], and the prefix
//! math that turns a range into the minimal set of CIDRs covering it
//! exactly ([`range_to_prefixes`], also used for port ranges).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

/// An inclusive range of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum AddrRange {
    /// IPv4 addresses `start..=end` (host byte order).
    V4 {
        /// First address.
        start: u32,
        /// Last address (inclusive).
        end: u32,
    },
    /// IPv6 addresses `start..=end` (host byte order).
    V6 {
        /// First address.
        start: u128,
        /// Last address (inclusive).
        end: u128,
    },
}

/// Why an address item did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddrParseError {
    /// Not an address, CIDR or range (the reason, naming the text).
    #[error("{0}")]
    Bad(String),
    /// `a-b` with `a` above `b`.
    #[error("reversed range: the first address is above the last")]
    Reversed,
    /// `a-b` with one IPv4 and one IPv6 end.
    #[error("a range cannot mix IPv4 and IPv6")]
    MixedFamily,
    /// `a-` or `-b`: one end of the range is missing.
    #[error("a range needs both ends, `first-last`")]
    Empty,
}

impl AddrRange {
    /// Every IPv4 address, `0.0.0.0/0`.
    pub fn any_v4() -> Self {
        AddrRange::V4 {
            start: 0,
            end: u32::MAX,
        }
    }

    /// Every IPv6 address, `::/0`.
    pub fn any_v6() -> Self {
        AddrRange::V6 {
            start: 0,
            end: u128::MAX,
        }
    }

    /// The range holding only `ip` (a /32 or /128).
    pub fn single(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                AddrRange::V4 { start: a, end: a }
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                AddrRange::V6 { start: a, end: a }
            }
        }
    }

    /// The addresses of a network (host bits are ignored).
    pub fn from_net(net: IpNet) -> Self {
        match net {
            IpNet::V4(n) => AddrRange::V4 {
                start: u32::from(n.network()),
                end: u32::from(n.broadcast()),
            },
            IpNet::V6(n) => AddrRange::V6 {
                start: u128::from(n.network()),
                end: u128::from(n.broadcast()),
            },
        }
    }

    /// The inclusive range `first..=last`; both must be of one family and in order.
    pub fn new(first: IpAddr, last: IpAddr) -> Result<Self, AddrParseError> {
        match (first, last) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let (start, end) = (u32::from(a), u32::from(b));
                if start > end {
                    return Err(AddrParseError::Reversed);
                }
                Ok(AddrRange::V4 { start, end })
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let (start, end) = (u128::from(a), u128::from(b));
                if start > end {
                    return Err(AddrParseError::Reversed);
                }
                Ok(AddrRange::V6 { start, end })
            }
            _ => Err(AddrParseError::MixedFamily),
        }
    }

    /// Whether this is an IPv4 range.
    pub fn family_is_v4(&self) -> bool {
        matches!(self, AddrRange::V4 { .. })
    }

    /// The first address.
    pub fn first(&self) -> IpAddr {
        match *self {
            AddrRange::V4 { start, .. } => IpAddr::V4(Ipv4Addr::from(start)),
            AddrRange::V6 { start, .. } => IpAddr::V6(Ipv6Addr::from(start)),
        }
    }

    /// The last address (inclusive).
    pub fn last(&self) -> IpAddr {
        match *self {
            AddrRange::V4 { end, .. } => IpAddr::V4(Ipv4Addr::from(end)),
            AddrRange::V6 { end, .. } => IpAddr::V6(Ipv6Addr::from(end)),
        }
    }

    /// Whether `ip` is in the range (an address of the other family never is).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (*self, ip) {
            (AddrRange::V4 { start, end }, IpAddr::V4(a)) => (start..=end).contains(&u32::from(a)),
            (AddrRange::V6 { start, end }, IpAddr::V6(a)) => (start..=end).contains(&u128::from(a)),
            _ => false,
        }
    }

    /// The minimal list of CIDRs covering exactly this range, in address order.
    pub fn to_cidrs(&self) -> Vec<IpNet> {
        match *self {
            AddrRange::V4 { start, end } => {
                range_to_prefixes(u128::from(start), u128::from(end), 32)
                    .into_iter()
                    .filter_map(|(s, len)| {
                        let a = Ipv4Addr::from(u32::try_from(s).ok()?);
                        Ipv4Net::new(a, u8::try_from(len).ok()?).ok().map(IpNet::V4)
                    })
                    .collect()
            }
            AddrRange::V6 { start, end } => range_to_prefixes(start, end, 128)
                .into_iter()
                .filter_map(|(s, len)| {
                    Ipv6Net::new(Ipv6Addr::from(s), u8::try_from(len).ok()?)
                        .ok()
                        .map(IpNet::V6)
                })
                .collect(),
        }
    }
}

impl fmt::Display for AddrRange {
    /// A single address as itself, a range that is exactly one CIDR as that
    /// CIDR, anything else as `first-last`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (first, last) = (self.first(), self.last());
        if first == last {
            return write!(f, "{first}");
        }
        let cidrs = self.to_cidrs();
        if let [only] = cidrs.as_slice() {
            return write!(f, "{only}");
        }
        write!(f, "{first}-{last}")
    }
}

impl FromStr for AddrRange {
    type Err = AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_item(s)
    }
}

/// Parses one address item: a bare address (IPv4 → /32, IPv6 → /128), a
/// CIDR without host bits (`10.0.0.0/24`), or an inclusive range
/// `first-last` of one family. Surrounding whitespace is ignored.
pub fn parse_item(s: &str) -> Result<AddrRange, AddrParseError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(AddrParseError::Bad("empty address".to_string()));
    }
    if let Some((a, b)) = t.split_once('-') {
        let (a, b) = (a.trim(), b.trim());
        if a.is_empty() || b.is_empty() {
            return Err(AddrParseError::Empty);
        }
        let first = parse_ip(a, t)?;
        let last = parse_ip(b, t)?;
        return AddrRange::new(first, last);
    }
    if let Some((a, len)) = t.split_once('/') {
        let ip = parse_ip(a.trim(), t)?;
        let len = len.trim();
        let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let plen: u8 = len.parse().map_err(|_| {
            AddrParseError::Bad(format!("`{t}`: prefix length `{len}` is not a number"))
        })?;
        if plen > max {
            let fam = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
            return Err(AddrParseError::Bad(format!(
                "`{t}`: prefix length {plen} is too long for {fam} (at most {max})"
            )));
        }
        let net = IpNet::new(ip, plen)
            .map_err(|_| AddrParseError::Bad(format!("`{t}` is not a valid CIDR")))?;
        if net.network() != ip {
            return Err(AddrParseError::Bad(format!(
                "{t} has host bits set; did you mean {}?",
                net.trunc()
            )));
        }
        return Ok(AddrRange::from_net(net));
    }
    Ok(AddrRange::single(parse_ip(t, t)?))
}

/// Parses a bare IPv4 or IPv6 address; `whole` is the item for the message.
fn parse_ip(s: &str, whole: &str) -> Result<IpAddr, AddrParseError> {
    s.parse::<IpAddr>().map_err(|_| {
        if s == whole {
            AddrParseError::Bad(format!("`{s}` is not an IPv4 or IPv6 address"))
        } else {
            AddrParseError::Bad(format!("`{whole}`: `{s}` is not an IPv4 or IPv6 address"))
        }
    })
}

/// Splits the inclusive range `start..=end` of `bits`-bit values into the
/// minimal list of aligned prefixes covering it exactly, as
/// `(prefix start, prefix length)` in ascending order. `bits` is 32 for IPv4,
/// 128 for IPv6 and 16 for ports. Returns an empty list when `start > end`,
/// `bits` is above 128 or `end` does not fit in `bits` bits.
pub fn range_to_prefixes(start: u128, end: u128, bits: u32) -> Vec<(u128, u32)> {
    let mut out = Vec::new();
    if start > end || bits > 128 || (bits < 128 && end >> bits != 0) {
        return out;
    }
    let mut cur = start;
    loop {
        // The largest block that starts at `cur` (alignment) ...
        let align = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        // ... and fits in what remains, `end - cur + 1` values: floor(log2).
        let remaining = end - cur;
        let fit = match remaining.checked_add(1) {
            None => 128,
            Some(count) => count.ilog2(),
        };
        let k = align.min(fit);
        out.push((cur, bits - k));
        let mask = if k >= 128 {
            u128::MAX
        } else {
            (1u128 << k) - 1
        };
        let last = cur | mask;
        if last >= end {
            break;
        }
        cur = last + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().expect("test address"))
    }

    fn nets(r: &AddrRange) -> Vec<String> {
        r.to_cidrs()
            .iter()
            .map(std::string::ToString::to_string)
            .collect()
    }

    #[test]
    fn bare_addresses() {
        assert_eq!(
            parse_item("10.10.2.50"),
            Ok(AddrRange::V4 {
                start: v4("10.10.2.50"),
                end: v4("10.10.2.50")
            })
        );
        let r = parse_item("fd00::1").expect("v6");
        assert!(!r.family_is_v4());
        assert_eq!(nets(&r), ["fd00::1/128"]);
        assert_eq!(r.to_string(), "fd00::1");
        assert_eq!(
            nets(&parse_item(" 10.0.0.1 ").expect("v4")),
            ["10.0.0.1/32"]
        );
    }

    #[test]
    fn cidrs() {
        let r = parse_item("10.10.0.0/26").expect("cidr");
        assert_eq!(
            r,
            AddrRange::V4 {
                start: v4("10.10.0.0"),
                end: v4("10.10.0.63")
            }
        );
        assert_eq!(r.to_string(), "10.10.0.0/26");
        let r = parse_item("fd00:10:1::30/124").expect("v6 cidr");
        assert_eq!(nets(&r), ["fd00:10:1::30/124"]);
        assert_eq!(parse_item("0.0.0.0/0"), Ok(AddrRange::any_v4()));
        assert_eq!(parse_item("::/0"), Ok(AddrRange::any_v6()));
        assert_eq!(AddrRange::any_v4().to_string(), "0.0.0.0/0");
        assert_eq!(AddrRange::any_v6().to_string(), "::/0");
    }

    #[test]
    fn cidr_errors() {
        assert_eq!(
            parse_item("10.0.0.1/24"),
            Err(AddrParseError::Bad(
                "10.0.0.1/24 has host bits set; did you mean 10.0.0.0/24?".into()
            ))
        );
        assert!(
            matches!(parse_item("10.0.0.0/33"), Err(AddrParseError::Bad(m)) if m.contains("too long"))
        );
        assert!(
            matches!(parse_item("10.0.0.0/x"), Err(AddrParseError::Bad(m)) if m.contains("not a number"))
        );
        assert!(
            matches!(parse_item("fd00::1/64"), Err(AddrParseError::Bad(m)) if m.contains("fd00::/64"))
        );
        assert!(matches!(
            parse_item("10.0.0.256"),
            Err(AddrParseError::Bad(_))
        ));
        assert!(matches!(
            parse_item("web_nodes"),
            Err(AddrParseError::Bad(_))
        ));
        assert!(matches!(parse_item(""), Err(AddrParseError::Bad(_))));
    }

    #[test]
    fn ranges_and_errors() {
        let r = parse_item("10.10.1.10-10.10.1.19").expect("range");
        assert_eq!(
            r,
            AddrRange::V4 {
                start: v4("10.10.1.10"),
                end: v4("10.10.1.19")
            }
        );
        assert_eq!(r.to_string(), "10.10.1.10-10.10.1.19");
        assert!(parse_item("10.0.0.1 - 10.0.0.5").is_ok());
        assert_eq!(
            parse_item("10.0.0.9-10.0.0.1"),
            Err(AddrParseError::Reversed)
        );
        assert_eq!(parse_item("fd00::9-fd00::1"), Err(AddrParseError::Reversed));
        assert_eq!(
            parse_item("10.0.0.1-fd00::1"),
            Err(AddrParseError::MixedFamily)
        );
        assert_eq!(parse_item("10.0.0.1-"), Err(AddrParseError::Empty));
        assert_eq!(parse_item("-10.0.0.1"), Err(AddrParseError::Empty));
        assert!(matches!(
            parse_item("10.0.0.1-10.0.0.0/24"),
            Err(AddrParseError::Bad(_))
        ));
        // A range of one address is that address.
        assert_eq!(parse_item("10.0.0.7-10.0.0.7"), parse_item("10.0.0.7"));
        // A range that is exactly one CIDR displays as it.
        assert_eq!(
            parse_item("10.0.0.0-10.0.0.255").expect("r").to_string(),
            "10.0.0.0/24"
        );
    }

    #[test]
    fn contains_checks_family_and_bounds() {
        let r = parse_item("10.10.1.10-10.10.1.19").expect("range");
        assert!(r.contains("10.10.1.10".parse().expect("ip")));
        assert!(r.contains("10.10.1.19".parse().expect("ip")));
        assert!(!r.contains("10.10.1.20".parse().expect("ip")));
        assert!(!r.contains("10.10.1.9".parse().expect("ip")));
        assert!(!r.contains("::ffff:10.10.1.12".parse().expect("ip")));
        assert!(AddrRange::any_v6().contains("::".parse().expect("ip")));
        assert!(!AddrRange::any_v6().contains("1.2.3.4".parse().expect("ip")));
        assert!(AddrRange::any_v4().contains("255.255.255.255".parse().expect("ip")));
    }

    #[test]
    fn cidr_cover_of_unaligned_range() {
        let r = parse_item("10.10.1.10-10.10.1.19").expect("range");
        assert_eq!(
            nets(&r),
            ["10.10.1.10/31", "10.10.1.12/30", "10.10.1.16/30"]
        );
        let r = parse_item("10.10.1.20-10.10.1.29").expect("range");
        assert_eq!(
            nets(&r),
            ["10.10.1.20/30", "10.10.1.24/30", "10.10.1.28/31"]
        );
    }

    #[test]
    fn cidr_cover_of_full_and_edge_ranges() {
        assert_eq!(nets(&AddrRange::any_v4()), ["0.0.0.0/0"]);
        assert_eq!(nets(&AddrRange::any_v6()), ["::/0"]);
        assert_eq!(
            nets(&parse_item("0.0.0.1-255.255.255.255").expect("r")).len(),
            32
        );
        assert_eq!(
            nets(&parse_item("0.0.0.0-255.255.255.254").expect("r")).len(),
            32
        );
        assert_eq!(
            nets(&parse_item("255.255.255.255").expect("r")),
            ["255.255.255.255/32"]
        );
        assert_eq!(
            nets(&parse_item("128.0.0.0-255.255.255.255").expect("r")),
            ["128.0.0.0/1"]
        );
        let all_but_zero = AddrRange::V6 {
            start: 1,
            end: u128::MAX,
        };
        let c = all_but_zero.to_cidrs();
        assert_eq!(c.len(), 128);
        assert_eq!(c[0].to_string(), "::1/128");
        assert_eq!(c[127].to_string(), "8000::/1");
        let all_but_last = AddrRange::V6 {
            start: 0,
            end: u128::MAX - 1,
        };
        let c = all_but_last.to_cidrs();
        assert_eq!(c.len(), 128);
        assert_eq!(c[0].to_string(), "::/1");
        assert_eq!(
            c[127].to_string(),
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/128"
        );
    }

    #[test]
    fn cidr_cover_of_v6_range() {
        let r = parse_item("fd00::3-fd00::10").expect("range");
        assert_eq!(
            nets(&r),
            ["fd00::3/128", "fd00::4/126", "fd00::8/125", "fd00::10/128"]
        );
        assert_eq!(r.to_string(), "fd00::3-fd00::10");
    }

    #[test]
    fn range_to_prefixes_bounds() {
        assert_eq!(range_to_prefixes(0, 65535, 16), [(0, 0)]);
        assert_eq!(range_to_prefixes(5, 4, 16), []);
        assert_eq!(range_to_prefixes(0, 65536, 16), []);
        assert_eq!(range_to_prefixes(0, 0, 129), []);
        assert_eq!(range_to_prefixes(0, u128::MAX, 128), [(0, 0)]);
        assert_eq!(range_to_prefixes(7, 7, 32), [(7, 32)]);
        assert_eq!(range_to_prefixes(0, 0, 0), [(0, 0)]);
    }

    /// Checks that the prefixes cover exactly `start..=end` (brute force over
    /// the whole `bits`-bit space), are aligned, ascending, and minimal (no
    /// two neighbours could merge into one prefix).
    fn check_cover(start: u128, end: u128, bits: u32) {
        let p = range_to_prefixes(start, end, bits);
        let mut covered = Vec::new();
        for &(s, len) in &p {
            let size = 1u128 << (bits - len);
            assert_eq!(s % size, 0, "unaligned prefix {s}/{len}");
            covered.extend(s..s + size);
        }
        let want: Vec<u128> = (start..=end).collect();
        assert_eq!(covered, want, "cover of {start}-{end}");
        for w in p.windows(2) {
            let ((a, la), (b, lb)) = (w[0], w[1]);
            if la == lb && la > 0 {
                let parent = 1u128 << (bits - la + 1);
                assert!(
                    !(a % parent == 0 && b == a + (parent >> 1)),
                    "{a}/{la} and {b}/{lb} could merge"
                );
            }
        }
    }

    #[test]
    fn prefix_cover_matches_brute_force() {
        for bits in [1u32, 3, 5, 8] {
            let max = (1u128 << bits) - 1;
            for start in 0..=max {
                for end in start..=max {
                    check_cover(start, end, bits);
                }
            }
        }
    }

    #[test]
    fn prefix_cover_random_ranges() {
        // A small xorshift generator: deterministic, no dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let a = u128::from(next() % 4096);
            let len = u128::from(next() % 600);
            let end = (a + len).min(4095);
            check_cover(a, end, 12);
            // The same shape high in the 128-bit space (no overflow at the top).
            let base = u128::MAX - 4095;
            let p = range_to_prefixes(base + a, base + end, 128);
            let q = range_to_prefixes(a, end, 12);
            assert_eq!(p.len(), q.len());
            for ((ps, pl), (qs, ql)) in p.iter().zip(&q) {
                assert_eq!(ps - base, *qs);
                assert_eq!(*pl, ql + 116);
            }
        }
    }
}
