//! Port ranges: `80`, `"2500-3300"` (inclusive), and their split into
//! aligned prefixes for longest-prefix-match maps.

use std::{fmt, str::FromStr};

use serde::Serialize;

use super::addr::range_to_prefixes;

/// An inclusive range of ports, `lo..=hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortRange {
    /// Lowest port.
    pub lo: u16,
    /// Highest port (inclusive).
    pub hi: u16,
}

/// Why a port item did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortParseError {
    /// Not a number or `lo-hi` (the reason, naming the text).
    #[error("{0}")]
    Bad(String),
    /// A number above 65535.
    #[error("port out of range: ports are 0-65535")]
    OutOfRange,
    /// `lo-hi` with `lo` above `hi`.
    #[error("reversed port range: the low port is above the high port")]
    Reversed,
    /// `lo-` or `-hi`: one end is missing.
    #[error("a port range needs both ends, `lo-hi`")]
    Empty,
}

impl PortRange {
    /// Every port, `0-65535`.
    pub const ALL: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };

    /// The range holding only `port`.
    pub fn single(port: u16) -> Self {
        PortRange { lo: port, hi: port }
    }

    /// `lo..=hi`, or None when `lo > hi`.
    pub fn new(lo: u16, hi: u16) -> Option<Self> {
        (lo <= hi).then_some(PortRange { lo, hi })
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    /// The minimal aligned prefixes covering exactly the range, as
    /// `(first port, prefix length out of 16)`, ascending.
    pub fn to_prefixes(&self) -> Vec<(u16, u32)> {
        range_to_prefixes(u128::from(self.lo), u128::from(self.hi), 16)
            .into_iter()
            .filter_map(|(s, len)| u16::try_from(s).ok().map(|s| (s, len)))
            .collect()
    }

    /// Parses `"80"` or `"2500-3300"` (whitespace around the numbers is ignored).
    pub fn parse(s: &str) -> Result<Self, PortParseError> {
        let t = s.trim();
        match t.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.trim(), b.trim());
                if a.is_empty() || b.is_empty() {
                    return Err(PortParseError::Empty);
                }
                let lo = parse_port(a, t)?;
                let hi = parse_port(b, t)?;
                PortRange::new(lo, hi).ok_or(PortParseError::Reversed)
            }
            None => parse_port(t, t).map(PortRange::single),
        }
    }
}

/// Parses one decimal port; `whole` is the item for the message.
fn parse_port(s: &str, whole: &str) -> Result<u16, PortParseError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortParseError::Bad(format!(
            "`{whole}` is not a port number or a \"lo-hi\" port range"
        )));
    }
    // All digits: the only failure left is a value above 65535.
    s.parse::<u16>().map_err(|_| PortParseError::OutOfRange)
}

impl FromStr for PortRange {
    type Err = PortParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PortRange::parse(s)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        assert_eq!(PortRange::single(80).to_string(), "80");
        assert_eq!(
            PortRange::new(2500, 3300).expect("range").to_string(),
            "2500-3300"
        );
        assert_eq!(PortRange::ALL.to_string(), "0-65535");
    }

    #[test]
    fn parse() {
        assert_eq!(PortRange::parse("80"), Ok(PortRange::single(80)));
        assert_eq!(
            PortRange::parse(" 2500 - 3300 "),
            Ok(PortRange { lo: 2500, hi: 3300 })
        );
        assert_eq!(PortRange::parse("0-65535"), Ok(PortRange::ALL));
        assert_eq!(PortRange::parse("3300-2500"), Err(PortParseError::Reversed));
        assert_eq!(PortRange::parse("65536"), Err(PortParseError::OutOfRange));
        assert_eq!(PortRange::parse("1-70000"), Err(PortParseError::OutOfRange));
        assert_eq!(PortRange::parse("80-"), Err(PortParseError::Empty));
        assert!(matches!(
            PortRange::parse("http"),
            Err(PortParseError::Bad(_))
        ));
        assert!(matches!(
            PortRange::parse("+80"),
            Err(PortParseError::Bad(_))
        ));
        assert!(matches!(PortRange::parse(""), Err(PortParseError::Bad(_))));
        assert_eq!(PortRange::new(2, 1), None);
    }

    #[test]
    fn contains() {
        let r = PortRange { lo: 2500, hi: 3300 };
        assert!(r.contains(2500) && r.contains(3300) && r.contains(3000));
        assert!(!r.contains(2499) && !r.contains(3301));
    }

    #[test]
    fn prefixes() {
        assert_eq!(PortRange::single(80).to_prefixes(), [(80, 16)]);
        assert_eq!(PortRange::ALL.to_prefixes(), [(0, 0)]);
        assert_eq!(PortRange { lo: 0, hi: 1023 }.to_prefixes(), [(0, 6)]);
        assert_eq!(
            PortRange { lo: 1, hi: 65535 }.to_prefixes().len(),
            16,
            "1-65535 needs one prefix per bit"
        );
        assert_eq!(
            PortRange { lo: 2500, hi: 3300 }.to_prefixes(),
            [
                (2500, 14),
                (2504, 13),
                (2512, 12),
                (2528, 11),
                (2560, 7),
                (3072, 9),
                (3200, 10),
                (3264, 11),
                (3296, 14),
                (3300, 16),
            ]
        );
    }

    #[test]
    fn prefixes_cover_exactly() {
        for (lo, hi) in [
            (0u16, 0u16),
            (1, 1),
            (80, 443),
            (1024, 65535),
            (65535, 65535),
        ] {
            let r = PortRange { lo, hi };
            let mut covered = Vec::new();
            for (s, len) in r.to_prefixes() {
                let size = 1u32 << (16 - len);
                assert_eq!(u32::from(s) % size, 0);
                covered.extend(u32::from(s)..u32::from(s) + size);
            }
            let want: Vec<u32> = (u32::from(lo)..=u32::from(hi)).collect();
            assert_eq!(covered, want);
        }
    }
}
