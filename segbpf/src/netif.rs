//! Network interfaces: index and addresses of an interface, and entering a
//! named network namespace (`--netns`).

use std::{net::IpAddr, os::fd::AsFd};

use anyhow::{Context as _, bail};

/// The interface index of `iface`, or an error naming it.
pub fn ifindex(iface: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(iface).with_context(|| format!("no interface named {iface}"))
}

/// The IPv4 and IPv6 addresses configured on `iface`.
pub fn addresses(iface: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
        if ifa.interface_name != iface {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push(IpAddr::V6(v6.ip()));
        }
    }
    Ok(out)
}

/// Moves the calling thread into the network namespace `/run/netns/NAME`
/// (as created by `ip netns add`). Call before starting any other thread.
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    if name.contains('/') || name.is_empty() || name == "." || name == ".." {
        bail!("invalid network namespace name {name:?}");
    }
    let path = format!("/run/netns/{name}");
    let f =
        std::fs::File::open(&path).with_context(|| format!("network namespace {name} ({path})"))?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {name}"))?;
    Ok(())
}
