//! Stateful sequences through the real programs with BPF_PROG_TEST_RUN:
//! connection tracking (replies pass, unsolicited look-alike replies do
//! not, entries expire, RST closes), ICMP echo and errors related to
//! tracked flows (PMTU), and fragments (a leading fragment that passes lets
//! its followers through; a follower without an allowed leader is dropped).
//!
//! One table of sequences; each step is a packet, its direction (ingress
//! runs the XDP program, egress the TC program) and the expected reason.
//! The instance runs in record mode: it tracks state like a live one and
//! also records each decision. The host takes the web, app and db roles of
//! `examples/roles.toml` at once, with short timeouts so expiry is quick.

use std::{net::IpAddr, time::Duration};

use aya::programs::{TestRun as _, TestRunOptions};
use segbpf::{
    compile::{self, Capacity},
    loader, maps,
    packet::{Ext, Frag4, PacketSpec, TCP_ACK, TCP_SYN},
    policy::Policy,
};
use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, RUN_RECORD, reason};

const TCP_RST: u8 = 0x04;

#[derive(Clone, Copy)]
enum Dir {
    In,
    Out,
}

enum Step {
    Packet {
        what: &'static str,
        dir: Dir,
        frame: Vec<u8>,
        want: u8,
    },
    Sleep(Duration),
}

struct Sequence {
    name: &'static str,
    steps: Vec<Step>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn pkt(what: &'static str, dir: Dir, spec: &PacketSpec, want: u8) -> Step {
    Step::Packet {
        what,
        dir,
        frame: spec.build().bytes,
        want,
    }
}

fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> PacketSpec {
    PacketSpec {
        tcp_flags: flags,
        ..PacketSpec::tcp(ip(src), ip(dst), sport, dport)
    }
}

fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> PacketSpec {
    PacketSpec::udp(ip(src), ip(dst), sport, dport)
}

/// An ICMP/ICMPv6 error from `src` to `dst` quoting `quoted`'s IP packet.
fn icmp_error(src: &str, dst: &str, icmp_type: u8, quoted: &PacketSpec) -> PacketSpec {
    let proto = if ip(src).is_ipv4() {
        IPPROTO_ICMP
    } else {
        IPPROTO_ICMPV6
    };
    PacketSpec {
        icmp_type,
        sport: 0,
        payload: quoted.build().ip_packet().to_vec(),
        ..PacketSpec::new(ip(src), ip(dst), proto)
    }
}

fn echo(src: &str, dst: &str, id: u16, reply: bool) -> PacketSpec {
    let mut s = PacketSpec::echo(ip(src), ip(dst));
    s.sport = id;
    if reply {
        s.icmp_type = if s.proto == IPPROTO_ICMP { 0 } else { 129 };
    }
    s
}

fn frag4(mut s: PacketSpec, id: u16, offset: u16, more: bool) -> PacketSpec {
    s.ipv4_id = id;
    s.frag4 = Frag4 { offset, more };
    s
}

fn frag6(mut s: PacketSpec, id: u32, offset: u16, more: bool) -> PacketSpec {
    s.ipv6_ext = vec![Ext::fragment(offset, more, id)];
    s
}

const APP: &str = "10.10.1.20";
const DB: &str = "10.10.1.30";
const WEB: &str = "10.10.1.15";
const DB6: &str = "fd00:10:1::31";
const OUT: &str = "198.51.100.7";
const OUT6: &str = "2001:db8::7";

fn sequences() -> Vec<Sequence> {
    use Dir::{In, Out};
    use reason::*;
    let syn_to_db = tcp(APP, DB, 40000, 5432, TCP_SYN);
    let dns = udp(APP, OUT, 40001, 53);
    let ntp = udp(APP, OUT, 40002, 123);
    let https6 = tcp(DB6, OUT6, 40003, 443, TCP_SYN);
    let web_syn = tcp(WEB, APP, 40004, 8080, TCP_SYN);
    let stranger_syn = tcp("10.10.1.35", APP, 40005, 8080, TCP_SYN);
    let web_frag = tcp(WEB, APP, 40010, 8080, TCP_SYN);
    vec![
        Sequence {
            name: "tcp_replies_of_allowed_egress_pass",
            steps: vec![
                pkt("SYN app->db:5432", Out, &syn_to_db, PASS_RULE),
                pkt(
                    "SYN-ACK db->app",
                    In,
                    &tcp(DB, APP, 5432, 40000, TCP_SYN | TCP_ACK),
                    PASS_CT,
                ),
                pkt(
                    "ACK app->db",
                    Out,
                    &tcp(APP, DB, 40000, 5432, TCP_ACK),
                    PASS_CT,
                ),
                pkt(
                    "data db->app",
                    In,
                    &tcp(DB, APP, 5432, 40000, TCP_ACK),
                    PASS_CT,
                ),
            ],
        },
        Sequence {
            name: "unsolicited_reply_lookalikes_are_dropped",
            steps: vec![
                pkt(
                    "SYN-ACK with no entry",
                    In,
                    &tcp(DB, APP, 5432, 41000, TCP_SYN | TCP_ACK),
                    DROP_DEFAULT,
                ),
                pkt(
                    "bare ACK with no entry",
                    In,
                    &tcp(DB, APP, 5432, 41001, TCP_ACK),
                    DROP_DEFAULT,
                ),
                pkt(
                    "bare ACK out, no entry",
                    Out,
                    &tcp(APP, DB, 41002, 5432, TCP_ACK),
                    PASS_RULE,
                ),
                pkt(
                    "its 'reply' finds no entry",
                    In,
                    &tcp(DB, APP, 5432, 41002, TCP_ACK),
                    DROP_DEFAULT,
                ),
                pkt(
                    "UDP from port 53 with no query",
                    In,
                    &udp(OUT, APP, 53, 41003),
                    DROP_DEFAULT,
                ),
            ],
        },
        Sequence {
            name: "udp_reply_passes_then_entry_expires",
            steps: vec![
                pkt("DNS query out", Out, &dns, PASS_RULE),
                pkt("DNS reply in", In, &udp(OUT, APP, 53, 40001), PASS_CT),
                pkt(
                    "reply from another port",
                    In,
                    &udp(OUT, APP, 54, 40001),
                    DROP_DEFAULT,
                ),
                Step::Sleep(Duration::from_millis(2300)),
                pkt(
                    "reply after the UDP timeout",
                    In,
                    &udp(OUT, APP, 53, 40001),
                    DROP_DEFAULT,
                ),
            ],
        },
        Sequence {
            name: "tcp_rst_closes_the_hole",
            steps: vec![
                pkt(
                    "SYN out",
                    Out,
                    &tcp(APP, DB, 42000, 3306, TCP_SYN),
                    PASS_RULE,
                ),
                pkt(
                    "SYN-ACK in",
                    In,
                    &tcp(DB, APP, 3306, 42000, TCP_SYN | TCP_ACK),
                    PASS_CT,
                ),
                pkt("RST out", Out, &tcp(APP, DB, 42000, 3306, TCP_RST), PASS_CT),
                Step::Sleep(Duration::from_millis(1300)),
                pkt(
                    "late segment after close timeout",
                    In,
                    &tcp(DB, APP, 3306, 42000, TCP_ACK),
                    DROP_DEFAULT,
                ),
            ],
        },
        Sequence {
            name: "tcp_fin_both_ways_closes_the_hole",
            steps: vec![
                pkt(
                    "SYN out",
                    Out,
                    &tcp(APP, DB, 42001, 3306, TCP_SYN),
                    PASS_RULE,
                ),
                pkt(
                    "SYN-ACK in",
                    In,
                    &tcp(DB, APP, 3306, 42001, TCP_SYN | TCP_ACK),
                    PASS_CT,
                ),
                pkt("FIN out", Out, &tcp(APP, DB, 42001, 3306, 0x11), PASS_CT),
                pkt("FIN in", In, &tcp(DB, APP, 3306, 42001, 0x11), PASS_CT),
                Step::Sleep(Duration::from_millis(1300)),
                pkt(
                    "segment after close timeout",
                    In,
                    &tcp(DB, APP, 3306, 42001, TCP_ACK),
                    DROP_DEFAULT,
                ),
            ],
        },
        Sequence {
            name: "icmp_echo_reply_is_tracked",
            steps: vec![
                pkt(
                    "echo request out",
                    Out,
                    &echo(APP, OUT, 77, false),
                    PASS_ICMP,
                ),
                pkt("echo reply in", In, &echo(OUT, APP, 77, true), PASS_CT),
                pkt(
                    "echo request out (v6)",
                    Out,
                    &echo(DB6, OUT6, 78, false),
                    PASS_ICMP,
                ),
                pkt(
                    "echo reply in (v6)",
                    In,
                    &echo(OUT6, DB6, 78, true),
                    PASS_CT,
                ),
            ],
        },
        Sequence {
            name: "icmp_errors_pass_only_for_tracked_flows",
            steps: vec![
                pkt("NTP query out", Out, &ntp, PASS_RULE),
                pkt(
                    "port unreachable quoting it",
                    In,
                    &icmp_error(OUT, APP, 3, &ntp),
                    PASS_RELATED,
                ),
                pkt(
                    "time exceeded quoting it",
                    In,
                    &icmp_error(OUT, APP, 11, &ntp),
                    PASS_RELATED,
                ),
                pkt(
                    "unreachable quoting an unknown flow",
                    In,
                    &icmp_error(OUT, APP, 3, &udp(APP, OUT, 49999, 123)),
                    DROP_DEFAULT,
                ),
                pkt("HTTPS SYN out (v6)", Out, &https6, PASS_RULE),
                pkt(
                    "packet too big quoting it (PMTU)",
                    In,
                    &icmp_error(OUT6, DB6, 2, &https6),
                    PASS_RELATED,
                ),
                pkt(
                    "packet too big quoting an unknown flow",
                    In,
                    &icmp_error(OUT6, DB6, 2, &tcp(DB6, OUT6, 49998, 443, TCP_SYN)),
                    DROP_DEFAULT,
                ),
                pkt("web SYN in", In, &web_syn, PASS_RULE),
                pkt(
                    "our port unreachable about it goes out",
                    Out,
                    &icmp_error(APP, WEB, 3, &web_syn),
                    PASS_RELATED,
                ),
            ],
        },
        Sequence {
            name: "ipv4_fragments_follow_their_leader",
            steps: vec![
                pkt(
                    "later fragment before its leader",
                    In,
                    &frag4(web_frag.clone(), 0x100, 185, false),
                    DROP_FRAGMENT,
                ),
                pkt(
                    "leading fragment, allowed",
                    In,
                    &frag4(web_frag.clone(), 0x100, 0, true),
                    PASS_RULE,
                ),
                pkt(
                    "its follower",
                    In,
                    &frag4(web_frag.clone(), 0x100, 185, true),
                    PASS_FRAG,
                ),
                pkt(
                    "its last fragment",
                    In,
                    &frag4(web_frag.clone(), 0x100, 370, false),
                    PASS_FRAG,
                ),
                pkt(
                    "follower of another datagram",
                    In,
                    &frag4(web_frag.clone(), 0x101, 185, false),
                    DROP_FRAGMENT,
                ),
                pkt(
                    "leading fragment, denied",
                    In,
                    &frag4(stranger_syn.clone(), 0x102, 0, true),
                    DROP_DEFAULT,
                ),
                pkt(
                    "follower of the denied leader",
                    In,
                    &frag4(stranger_syn.clone(), 0x102, 185, false),
                    DROP_FRAGMENT,
                ),
            ],
        },
        Sequence {
            name: "ipv6_fragments_follow_their_leader",
            steps: vec![
                pkt(
                    "leading fragment to web:443, allowed",
                    In,
                    &frag6(tcp(OUT6, DB6, 40006, 443, TCP_SYN), 9, 0, true),
                    PASS_RULE,
                ),
                pkt(
                    "its follower",
                    In,
                    &frag6(tcp(OUT6, DB6, 40006, 443, TCP_SYN), 9, 181, false),
                    PASS_FRAG,
                ),
                pkt(
                    "follower without a leader",
                    In,
                    &frag6(tcp(OUT6, DB6, 40006, 443, TCP_SYN), 10, 181, false),
                    DROP_FRAGMENT,
                ),
                pkt(
                    "leading fragment to tcp/25, denied",
                    In,
                    &frag6(tcp(OUT6, DB6, 40007, 25, TCP_SYN), 11, 0, true),
                    DROP_DEFAULT,
                ),
                pkt(
                    "its follower",
                    In,
                    &frag6(tcp(OUT6, DB6, 40007, 25, TCP_SYN), 11, 181, false),
                    DROP_FRAGMENT,
                ),
            ],
        },
        Sequence {
            name: "fragmented_reply_of_tracked_flow",
            steps: vec![
                pkt("DNS query out", Out, &udp(APP, OUT, 40008, 53), PASS_RULE),
                pkt(
                    "leading fragment of the reply",
                    In,
                    &frag4(udp(OUT, APP, 53, 40008), 0x200, 0, true),
                    PASS_CT,
                ),
                pkt(
                    "its follower",
                    In,
                    &frag4(udp(OUT, APP, 53, 40008), 0x200, 185, false),
                    PASS_FRAG,
                ),
            ],
        },
    ]
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn stateful_sequences() -> anyhow::Result<()> {
    let path = format!("{}/../examples/roles.toml", env!("CARGO_MANIFEST_DIR"));
    let policy = Policy::load(std::path::Path::new(&path))?;
    let roles: Vec<String> = ["web", "app", "db"].iter().map(|s| s.to_string()).collect();
    let mut c = compile::compile(&policy, &roles, Some("eth0"), 0, 1, Capacity::default())?;
    // Short timeouts so expiry shows within the test.
    c.config.ct_udp_s = 2;
    c.config.ct_udp_est_s = 2;
    c.config.ct_tcp_close_s = 1;
    let mut ebpf = loader::load(Capacity::default(), RUN_RECORD)?;
    maps::write_policy(&mut ebpf, &c)?;

    let mut failures = Vec::new();
    let mut count = 0;
    for seq in sequences() {
        for step in seq.steps {
            let (what, dir, frame, want) = match step {
                Step::Sleep(d) => {
                    std::thread::sleep(d);
                    continue;
                }
                Step::Packet {
                    what,
                    dir,
                    frame,
                    want,
                } => (what, dir, frame, want),
            };
            count += 1;
            let opts = TestRunOptions {
                data_in: Some(&frame),
                ..TestRunOptions::new()
            };
            let ret = match dir {
                Dir::In => loader::xdp(&mut ebpf)?.test_run(opts)?.return_value,
                Dir::Out => loader::tc(&mut ebpf)?.test_run(opts)?.return_value,
            };
            let t = maps::take_trace(&mut ebpf)?;
            // XDP: 2 pass, 1 drop. TC: 0 ok, 2 shot.
            let passed = match dir {
                Dir::In => ret == 2,
                Dir::Out => ret == 0,
            };
            if t.valid != 1 || t.reason != want || passed != reason::passes(want) {
                failures.push(format!(
                    "{}: {what}: want {}, got {} (return {ret})",
                    seq.name,
                    reason::name(want),
                    reason::name(t.reason)
                ));
            }
        }
    }
    assert!(count >= 40, "only {count} steps");
    assert!(
        failures.is_empty(),
        "{} of {count} steps failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    Ok(())
}
