//! Protocol names and numbers, one spelling for every command and record:
//! `tcp`, `udp`, `icmp`, `icmpv6`, else the number.

use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

/// Parses a protocol name or number (`tcp`, `udp`, `icmp`, `icmpv6`, `6`).
pub fn parse_proto(s: &str) -> Result<u8, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(IPPROTO_TCP),
        "udp" => Ok(IPPROTO_UDP),
        "icmp" => Ok(IPPROTO_ICMP),
        "icmpv6" | "ipv6-icmp" => Ok(IPPROTO_ICMPV6),
        other => other
            .parse::<u8>()
            .map_err(|_| format!("unknown protocol {s:?} (tcp, udp, icmp, icmpv6 or a number)")),
    }
}

/// An address as the kernel's records hold it (16 bytes, an IPv4 address
/// in the first four): IPv4 for family `4`, else IPv6.
pub fn ip_from(family: u8, b: [u8; 16]) -> std::net::IpAddr {
    if family == 4 {
        std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
    } else {
        std::net::Ipv6Addr::from(b).into()
    }
}

/// Name of a protocol number for output.
pub fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_ICMPV6 => "icmpv6".into(),
        n => n.to_string(),
    }
}

/// TCP flags as letters (`S`, `A`, `F`, `R`, `P`, `U`, in that order), as
/// events and flows print them.
pub fn tcp_flag_letters(flags: u8) -> String {
    [
        (0x02, 'S'),
        (0x10, 'A'),
        (0x01, 'F'),
        (0x04, 'R'),
        (0x08, 'P'),
        (0x20, 'U'),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, c)| *c)
    .collect()
}

/// TCP flags by name, in header bit order (`FIN`, `SYN`, `RST`, `PSH`,
/// `ACK`, `URG`, `ECE`, `CWR`), as flow records carry them.
pub fn tcp_flag_names(flags: u8) -> Vec<&'static str> {
    ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"]
        .iter()
        .enumerate()
        .filter(|(bit, _)| flags & (1 << bit) != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// Parses TCP flags written as letters (`S`, `SA`, `FA`: `S` `A` `F` `R`
/// `P` `U`, as events print them), names (`SYN,ACK`, any case), or a number
/// (`0x12`, `18`). `none` is no flag.
pub fn parse_tcp_flags(s: &str) -> Result<u8, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(0);
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u8::from_str_radix(hex, 16).map_err(|_| format!("bad TCP flags `{s}`"));
    }
    if let Ok(n) = t.parse::<u8>() {
        return Ok(n);
    }
    let names = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    if t.contains(',') || names.iter().any(|n| n.eq_ignore_ascii_case(t)) {
        let mut flags = 0;
        for part in t.split(',') {
            let bit = names
                .iter()
                .position(|n| n.eq_ignore_ascii_case(part.trim()))
                .ok_or_else(|| {
                    format!(
                        "unknown TCP flag `{}` (FIN, SYN, RST, PSH, ACK, URG, ECE, CWR)",
                        part.trim()
                    )
                })?;
            flags |= 1 << bit;
        }
        return Ok(flags);
    }
    let mut flags = 0;
    for c in t.chars() {
        flags |= match c.to_ascii_uppercase() {
            'F' => 0x01,
            'S' => 0x02,
            'R' => 0x04,
            'P' => 0x08,
            'A' => 0x10,
            'U' => 0x20,
            'E' => 0x40,
            'C' => 0x80,
            _ => {
                return Err(format!(
                    "bad TCP flags `{s}`: letters S A F R P U E C, names such as SYN,ACK, or a number"
                ));
            }
        };
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        for p in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6, 47] {
            assert_eq!(parse_proto(&proto_name(p)), Ok(p));
        }
        assert_eq!(parse_proto("TCP"), Ok(IPPROTO_TCP));
        assert!(parse_proto("tcpp").is_err());
        assert_eq!(tcp_flag_letters(0x12), "SA");
        assert_eq!(tcp_flag_letters(0x1b), "SAFP");
        assert_eq!(tcp_flag_letters(0), "");
    }

    #[test]
    fn tcp_flags_parse_as_letters_names_or_numbers() {
        assert_eq!(parse_tcp_flags("SA"), Ok(0x12));
        assert_eq!(parse_tcp_flags("syn,ack"), Ok(0x12));
        assert_eq!(parse_tcp_flags("ACK"), Ok(0x10));
        assert_eq!(parse_tcp_flags("RST"), Ok(0x04));
        assert_eq!(parse_tcp_flags("0x11"), Ok(0x11));
        assert_eq!(parse_tcp_flags("none"), Ok(0));
        assert!(parse_tcp_flags("SX").is_err());
        assert!(parse_tcp_flags("SYN,FOO").is_err());
    }
}
