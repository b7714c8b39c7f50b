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
}
