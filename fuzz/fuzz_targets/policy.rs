//! Fuzz target: roles.toml text -> parse/validate -> compile for every role
//! -> evaluate a few packets. Must never panic; a parse error must carry a
//! position inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segbpf::{
    policy::compile::{self, Capacity},
    policy::{Direction, Policy, eval},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match Policy::from_str(text, "fuzz.toml") {
        Ok(p) => p,
        Err(e) => {
            if let Some((line, col)) = e.line_col() {
                assert!(line >= 1 && col >= 1);
                assert!(line as usize <= text.lines().count().max(1) + 1, "{e}");
            }
            return;
        }
    };
    let small = Capacity {
        peer_v4: 100_000,
        peer_v6: 100_000,
        ports: 100_000,
        ..Capacity::default()
    };
    for role in &policy.roles {
        let roles = vec![role.name.clone()];
        let _ = compile::compile(&policy, &roles, Some("eth0"), 0, 1, small);
        for (src, proto, dport) in [("10.0.0.1", 6, 22u16), ("fd00::1", 17, 53), ("192.0.2.1", 1, 0)] {
            let src: std::net::IpAddr = src.parse().unwrap();
            let pkt = eval::Packet {
                src,
                dst: src,
                proto,
                dport,
                icmp_type: 8,
                hop_limit: 64,
            };
            let _ = eval::evaluate(&policy, &roles, Some("eth0"), Direction::Ingress, &pkt);
        }
    }
});
