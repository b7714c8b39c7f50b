//! Seeded generators for differential testing: random roles.toml policies
//! (overlapping prefixes and ranges, IPv4 and IPv6, ports and port ranges
//! near their edges, several roles, base rules, any-protocol and ICMP
//! rules, both defaults, with and without connection tracking and the ICMP
//! default) and random packets aimed at the policy's address and port
//! boundaries, with ICMP types of both families. Deterministic for a seed, so any mismatch can be
//! reproduced from the seed alone.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// A small, fast, seedable PRNG (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// One element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Addresses live in small regions so that sets overlap often.
const V4_BASE: u32 = 0xc612_0000; // 198.18.0.0
const V6_BASE: u128 = 0xfd00_0018_0000_0000_0000_0000_0000_0000; // fd00:18::

/// A generated policy and what the generator knows about it.
#[derive(Clone, Debug)]
pub struct GenPolicy {
    /// roles.toml text.
    pub text: String,
    /// Role names defined.
    pub roles: Vec<String>,
    /// Interesting IPv4 addresses (range edges and their neighbours).
    pub edges4: Vec<u32>,
    /// Interesting IPv6 addresses.
    pub edges6: Vec<u128>,
    /// Interesting ports (range edges and their neighbours).
    pub ports: Vec<u16>,
}

fn v4_item(rng: &mut Rng, edges: &mut Vec<u32>) -> String {
    let base = V4_BASE + rng.below(1 << 12) as u32;
    match rng.below(3) {
        0 => {
            let len = 20 + rng.below(13) as u32;
            let mask = if len == 32 {
                u32::MAX
            } else {
                !(u32::MAX >> len)
            };
            let net = base & mask;
            let end = net | !mask;
            edges.extend([net.wrapping_sub(1), net, end, end.wrapping_add(1)]);
            format!("{}/{len}", Ipv4Addr::from(net))
        }
        1 => {
            let end = base + rng.below(600) as u32;
            edges.extend([base.wrapping_sub(1), base, end, end.wrapping_add(1)]);
            format!("{}-{}", Ipv4Addr::from(base), Ipv4Addr::from(end))
        }
        _ => {
            edges.extend([base.wrapping_sub(1), base, base + 1]);
            Ipv4Addr::from(base).to_string()
        }
    }
}

fn v6_item(rng: &mut Rng, edges: &mut Vec<u128>) -> String {
    let base = V6_BASE + u128::from(rng.below(1 << 16));
    if rng.chance(1, 2) {
        let len = 112 + rng.below(17) as u32;
        let mask = if len == 128 {
            u128::MAX
        } else {
            !(u128::MAX >> len)
        };
        let net = base & mask;
        let end = net | !mask;
        edges.extend([net.wrapping_sub(1), net, end, end.wrapping_add(1)]);
        format!("{}/{len}", Ipv6Addr::from(net))
    } else {
        let end = base + u128::from(rng.below(3000));
        edges.extend([base.wrapping_sub(1), base, end, end.wrapping_add(1)]);
        format!("{}-{}", Ipv6Addr::from(base), Ipv6Addr::from(end))
    }
}

fn port_item(rng: &mut Rng, ports: &mut Vec<u16>) -> String {
    let specials = [0u16, 1, 22, 53, 80, 443, 1023, 1024, 8080, 65534, 65535];
    let lo = if rng.chance(1, 3) {
        *rng.pick(&specials)
    } else {
        rng.below(65536) as u16
    };
    if rng.chance(1, 2) {
        ports.extend([lo.wrapping_sub(1), lo, lo.wrapping_add(1)]);
        lo.to_string()
    } else {
        let hi = lo.saturating_add(rng.below(3000) as u16);
        ports.extend([lo.wrapping_sub(1), lo, hi, hi.wrapping_add(1)]);
        format!("\"{lo}-{hi}\"")
    }
}

/// A random policy for `seed`.
pub fn policy(rng: &mut Rng) -> GenPolicy {
    let mut edges4 = Vec::new();
    let mut edges6 = Vec::new();
    let mut ports = Vec::new();
    let mut t = String::from("version = 1\n[sets]\n");
    let nsets = 2 + rng.below(4);
    for i in 0..nsets {
        let items: Vec<String> = (0..=rng.below(4))
            .map(|_| {
                if rng.chance(1, 3) {
                    format!("\"{}\"", v6_item(rng, &mut edges6))
                } else {
                    format!("\"{}\"", v4_item(rng, &mut edges4))
                }
            })
            .collect();
        let _ = writeln!(t, "s{i} = [{}]", items.join(", "));
    }
    let _ = writeln!(
        t,
        "[defaults]\ningress = \"{}\"\negress = \"{}\"\nicmp = {}\nestablished = {}\nlog_rate = 0",
        if rng.chance(1, 5) { "allow" } else { "drop" },
        if rng.chance(1, 2) { "allow" } else { "drop" },
        rng.chance(1, 2),
        rng.chance(3, 4)
    );
    let rule = |rng: &mut Rng,
                t: &mut String,
                header: &str,
                ports: &mut Vec<u16>,
                edges4: &mut Vec<u32>,
                edges6: &mut Vec<u128>| {
        let _ = writeln!(t, "[[{header}]]");
        let peer = match rng.below(5) {
            0 => "\"any\"".to_string(),
            1 | 2 => format!("\"s{}\"", rng.below(nsets)),
            3 => format!("\"{}\"", v4_item(rng, edges4)),
            _ => format!(
                "[\"s{}\", \"{}\"]",
                rng.below(nsets),
                if rng.chance(1, 2) {
                    v4_item(rng, edges4)
                } else {
                    v6_item(rng, edges6)
                }
            ),
        };
        let _ = writeln!(t, "from = {peer}");
        let mut any = false;
        if rng.chance(1, 8) {
            let _ = writeln!(t, "proto = \"any\"");
            any = true;
        }
        if rng.chance(2, 3) || !any {
            let list: Vec<String> = (0..=rng.below(3)).map(|_| port_item(rng, ports)).collect();
            let _ = writeln!(t, "tcp = [{}]", list.join(", "));
        }
        if rng.chance(1, 3) {
            let list: Vec<String> = (0..=rng.below(2)).map(|_| port_item(rng, ports)).collect();
            let _ = writeln!(t, "udp = [{}]", list.join(", "));
        }
        if rng.chance(1, 5) {
            let _ = writeln!(t, "icmp = true");
        }
        if rng.chance(1, 6) {
            let _ = writeln!(t, "icmpv6 = true");
        }
    };
    for _ in 0..rng.below(3) {
        rule(
            rng,
            &mut t,
            "base.ingress",
            &mut ports,
            &mut edges4,
            &mut edges6,
        );
    }
    let nroles = 1 + rng.below(3);
    let mut roles = Vec::new();
    for r in 0..nroles {
        let name = format!("r{r}");
        let _ = writeln!(t, "[roles.{name}]\nhosts = \"any\"");
        for _ in 0..=rng.below(4) {
            rule(
                rng,
                &mut t,
                &format!("roles.{name}.ingress"),
                &mut ports,
                &mut edges4,
                &mut edges6,
            );
        }
        roles.push(name);
    }
    GenPolicy {
        text: t,
        roles,
        edges4,
        edges6,
        ports,
    }
}

/// A random packet for `p`: (source, protocol, destination port, ICMP type).
pub fn packet(rng: &mut Rng, p: &GenPolicy) -> (IpAddr, u8, u16, u8) {
    let v6 = !p.edges6.is_empty() && rng.chance(1, 3);
    let src = if v6 {
        let a = if rng.chance(4, 5) {
            *rng.pick(&p.edges6)
        } else {
            V6_BASE + u128::from(rng.below(1 << 17))
        };
        IpAddr::V6(Ipv6Addr::from(a))
    } else {
        let a = if !p.edges4.is_empty() && rng.chance(4, 5) {
            *rng.pick(&p.edges4)
        } else {
            V4_BASE + rng.below(1 << 13) as u32
        };
        IpAddr::V4(Ipv4Addr::from(a))
    };
    let proto = *rng.pick(&[6u8, 6, 6, 17, 17, 1, 58, 47]);
    let dport = if !p.ports.is_empty() && rng.chance(4, 5) {
        *rng.pick(&p.ports)
    } else {
        rng.below(65536) as u16
    };
    (src, proto, dport, icmp_type(rng, v6))
}

/// A random ICMP type, most often one of the packet's family: echo
/// request and reply, the errors (destination unreachable, source quench,
/// redirect, time exceeded, parameter problem, packet too big), timestamp
/// and information requests, router and neighbour messages, and now and
/// then one of the other family or an unassigned one.
pub fn icmp_type(rng: &mut Rng, v6: bool) -> u8 {
    const V4: [u8; 10] = [0, 8, 3, 4, 5, 11, 12, 13, 14, 9];
    const V6: [u8; 11] = [128, 129, 1, 2, 3, 4, 133, 134, 135, 137, 130];
    match rng.below(10) {
        0 => *rng.pick(if v6 { &V4[..] } else { &V6[..] }),
        1 => rng.below(256) as u8,
        _ => *rng.pick(if v6 { &V6[..] } else { &V4[..] }),
    }
}
