//! The host's roles are decided at attach and kept: an address that
//! appears later — here one autoconfigured from a router advertisement
//! sent by anyone on the link, whose prefix lies inside another role's
//! `hosts` — adds no role's rules at a reload. `reload --redetect-roles`
//! works them out again from permanent addresses only; a change of roles is
//! logged and shown in `status`.
#![allow(
    unused_crate_dependencies,
    reason = "each test file is a crate that sees every dependency of the tests package"
)]

use std::time::{Duration, Instant};

use segbpf::host::packet::PacketSpec;
use segbpf_tests::{Lab, net, tun::fill_transport_checksum};

const POLICY: &str = r#"version = 1
[defaults]
ingress = "drop"
[roles.db]
hosts = ["198.18.72.30", "fd00:72::30"]
[[roles.db.ingress]]
from = "any"
tcp = [5432]
[roles.app]
hosts = "fd00:72:1::/64"
[[roles.app.ingress]]
from = "any"
tcp = [8080]
"#;

/// A router advertisement from `src_mac` announcing `prefix`/64 for
/// autoconfiguration (on-link, autonomous), to all nodes.
fn router_advertisement(src_mac: [u8; 6], prefix: std::net::Ipv6Addr) -> Vec<u8> {
    let mut payload = vec![0u8; 8]; // reachable time, retransmit timer
    payload.extend_from_slice(&[3, 4, 64, 0xc0]); // prefix information, /64, L+A
    payload.extend_from_slice(&3600u32.to_be_bytes()); // valid lifetime
    payload.extend_from_slice(&3600u32.to_be_bytes()); // preferred lifetime
    payload.extend_from_slice(&[0; 4]);
    payload.extend_from_slice(&prefix.octets());
    let spec = PacketSpec {
        icmp_type: 134,
        sport: 0x4000, // current hop limit 64, no flags
        ttl: 255,
        payload,
        ..PacketSpec::new(
            "fe80::72:1".parse().expect("address"),
            "ff02::1".parse().expect("address"),
            58,
        )
    };
    let b = spec.build();
    let mut f = b.bytes;
    f[..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&src_mac);
    let l4 = b.l4 - b.l3;
    fill_transport_checksum(&mut f[b.l3..], l4, 58).expect("checksum");
    f
}

/// The roles in force on `host`, from `status --output json`.
fn roles(lab: &Lab, host: &str) -> anyhow::Result<Vec<String>> {
    let v = lab.status_json(host)?;
    Ok(v["attachments"][0]["state"]["roles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect())
}

#[test]
#[ignore = "needs root and a kernel with BPF: run `cargo xtask test`"]
fn router_advertisement_into_another_roles_hosts_changes_no_role() -> anyhow::Result<()> {
    let mut lab = Lab::new("ra")?;
    lab.add_host("db", &["198.18.72.30/24", "fd00:72::30/64"])?;
    lab.add_host("rogue", &["198.18.72.66/24"])?;
    let dir = std::env::temp_dir().join(format!("segbpf-ra-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Cleanup(dir.clone());
    let file = dir.join("roles.toml");
    std::fs::write(&file, POLICY)?;
    let policy = file.to_string_lossy().to_string();
    lab.attach("db", &policy, &[])?;
    assert_eq!(roles(&lab, "db")?, ["db"]);

    // Anyone on the link: an RA whose prefix lies inside app's hosts.
    let db_ns = lab.host("db").ns.name.clone();
    let rogue_ns = lab.host("rogue").ns.name.clone();
    let sender = net::RawSender::open(&rogue_ns, "eth0")?;
    let ra = router_advertisement(net::mac(&rogue_ns, "eth0")?, "fd00:72:1::".parse()?);
    let deadline = Instant::now() + Duration::from_secs(10);
    let slaac = loop {
        sender.send(&ra)?;
        std::thread::sleep(Duration::from_millis(300));
        let out = lab
            .host("db")
            .ns
            .ip(&["-6", "addr", "show", "dev", "eth0"])?;
        if let Some(line) = out.lines().find(|l| l.contains("fd00:72:1:")) {
            break line.trim().to_string();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "db autoconfigured no address: {out}"
        );
    };
    println!("autoconfigured: {slaac} (in {db_ns})");
    assert!(
        !slaac.contains("permanent"),
        "a SLAAC address is not permanent: {slaac}"
    );

    // A reload keeps the roles decided at attach.
    lab.segbpf_ok("db", &["reload", "eth0"])?;
    assert_eq!(roles(&lab, "db")?, ["db"], "reload keeps the roles");
    // Redetecting looks at permanent addresses only.
    lab.segbpf_ok("db", &["reload", "eth0", "--redetect-roles"])?;
    assert_eq!(roles(&lab, "db")?, ["db"], "a SLAAC address gives no role");
    let text = lab.segbpf_ok("db", &["status", "eth0"])?;
    assert!(!text.contains("ROLES CHANGED"), "{text}");

    // An address the administrator adds does count, and the change shows.
    lab.host("db")
        .ns
        .ip(&["addr", "add", "fd00:72:1::99/64", "dev", "eth0", "nodad"])?;
    lab.segbpf_ok("db", &["reload", "eth0"])?;
    assert_eq!(
        roles(&lab, "db")?,
        ["db"],
        "a plain reload still keeps them"
    );
    let out = lab.segbpf("db", &["reload", "eth0", "--redetect-roles"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut now = roles(&lab, "db")?;
    now.sort();
    assert_eq!(now, ["app", "db"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("roles of eth0 change from db to"),
        "the change is logged: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = lab.segbpf_ok("db", &["status", "eth0"])?;
    assert!(
        text.contains("ROLES CHANGED") && text.contains("(were: db)"),
        "{text}"
    );
    Ok(())
}

/// Removes a directory when dropped (also when the test fails).
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
