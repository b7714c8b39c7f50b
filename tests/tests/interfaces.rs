//! Per-interface rules: one policy attached to two interfaces of a host
//! enforces each interface's view. Each attachment is compiled for its own
//! interface, so a rule with `interfaces = ["eth1"]` exists only in eth1's
//! maps. Checked through the real program with BPF_PROG_TEST_RUN.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use segbpf::{
    host::packet::PacketSpec,
    policy::{Direction, Policy, eval},
};
use segbpf_common::{IPPROTO_TCP, NO_RULE, RUN_DRY, reason};
use segbpf_tests::harness::Instance;

const POLICY: &str = r#"
version = 1
[sets]
tunnel = ["10.0.0.1"]
[defaults]
ingress = "drop"
egress = "drop"
[roles.wp]
hosts = "any"
[[roles.wp.ingress]]          # public interface: http from anyone
from = "any"
tcp = [80]
interfaces = ["eth0"]
[[roles.wp.ingress]]          # private interface: ssh from the tunnel host only
from = "tunnel"
tcp = [22]
interfaces = ["eth1"]
"#;

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn each_interface_enforces_its_own_view() -> anyhow::Result<()> {
    let policy = Policy::from_str(POLICY, "interfaces.toml")?;
    let roles = vec!["wp".to_string()];
    let cases = [
        ("10.0.0.1", 22, "eth0", false),
        ("10.0.0.1", 22, "eth1", true),
        ("192.0.2.9", 80, "eth0", true),
        ("192.0.2.9", 80, "eth1", false),
        ("192.0.2.9", 22, "eth1", false),
    ];
    for iface in ["eth0", "eth1"] {
        let mut instance = Instance::with_policy(&policy, &roles, iface, RUN_DRY)?;
        for (src, port, on, allowed) in cases.iter().filter(|c| c.2 == iface) {
            let spec = PacketSpec::tcp(src.parse()?, "10.0.0.50".parse()?, 40000, *port);
            let t = instance.ingress(spec.build().bytes)?;
            assert_eq!(
                reason::passes(t.reason),
                *allowed,
                "{src} -> tcp/{port} on {on}"
            );
            let want = eval::evaluate(
                &policy,
                &roles,
                Some(iface),
                Direction::Ingress,
                &eval::Packet {
                    src: spec.src,
                    dst: spec.dst,
                    proto: IPPROTO_TCP,
                    dport: *port,
                    icmp_type: 0,
                    hop_limit: 64,
                },
            );
            assert_eq!(
                (t.reason, t.rule_id),
                (want.reason, want.rule.unwrap_or(NO_RULE))
            );
        }
    }
    Ok(())
}
