//! Network interfaces, as the kernel of the calling thread's network
//! namespace reports them: index, addresses (all, or permanent only) and
//! device type.

use std::net::IpAddr;

/// Errors asking the kernel about an interface.
#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    /// No interface of that name in this network namespace.
    #[error("no interface named {iface} in this network namespace")]
    NoSuchInterface {
        /// The name.
        iface: String,
    },
    /// A name that cannot be an interface name.
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    /// A device type segbpf has no parser for.
    #[error(
        "{iface} is a device of link type {type_name} (ARPHRD {arphrd}), whose frames segbpf cannot parse; \
         supported: Ethernet-framed devices (ethernet, veth, bridge, bond, tap, vxlan, loopback) \
         and devices without a link-layer header (tun, wireguard, ipip, ip6tnl, sit, gre, ppp)"
    )]
    Unsupported {
        /// The interface.
        iface: String,
        /// The type's name.
        type_name: String,
        /// The `ARPHRD_*` value.
        arphrd: u16,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was asked.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The kernel's rtnetlink reply could not be read.
    #[error("rtnetlink: {0}")]
    Netlink(&'static str),
}

fn io(what: impl Into<String>) -> impl FnOnce(nix::Error) -> NetifError {
    let what = what.into();
    move |e| NetifError::Io {
        what,
        source: e.into(),
    }
}

/// The interface index of `iface`, or an error naming it.
pub fn ifindex(iface: &str) -> Result<u32, NetifError> {
    nix::net::if_::if_nametoindex(iface).map_err(|_| NetifError::NoSuchInterface {
        iface: iface.to_string(),
    })
}

/// The IPv4 and IPv6 addresses configured on `iface`.
pub fn addresses(iface: &str) -> Result<Vec<IpAddr>, NetifError> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io("getifaddrs"))? {
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

/// Whether `addr` is local to this host (in the caller's network
/// namespace): a loopback address or one configured on any interface.
pub fn is_local_address(addr: IpAddr) -> Result<bool, NetifError> {
    if addr.is_loopback() {
        return Ok(true);
    }
    for ifa in nix::ifaddrs::getifaddrs().map_err(io("getifaddrs"))? {
        let Some(a) = ifa.address else { continue };
        let found = a
            .as_sockaddr_in()
            .map(|v4| IpAddr::V4(v4.ip()))
            .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())));
        if found == Some(addr) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The addresses of `iface` an administrator configured: flagged
/// permanent by the kernel, so not SLAAC or temporary (privacy) IPv6
/// addresses made from a router advertisement, nor addresses with a
/// lifetime as DHCP clients add them. Asked of the kernel over rtnetlink
/// (an `RTM_GETADDR` dump), in the caller's network namespace.
pub fn permanent_addresses(iface: &str) -> Result<Vec<IpAddr>, NetifError> {
    const RTM_NEWADDR: u16 = 20;
    const RTM_GETADDR: u16 = 22;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST_DUMP: u16 = 0x1 | 0x300;
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    const IFA_FLAGS: u16 = 8;
    const IFA_F_TEMPORARY: u32 = 0x01;
    const IFA_F_PERMANENT: u32 = 0x80;
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };
    use std::os::fd::AsRawFd as _;

    let index = ifindex(iface)?;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(io("rtnetlink socket"))?;
    // nlmsghdr (16 bytes) + ifaddrmsg (8 bytes, family AF_UNSPEC).
    let mut req = [0u8; 24];
    req[0..4].copy_from_slice(&24u32.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETADDR.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST_DUMP.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(io("RTM_GETADDR"))?;
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    'dump: loop {
        let n =
            recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(io("reading RTM_GETADDR"))?;
        if n == 0 {
            break;
        }
        let mut at = 0;
        while at + 16 <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16_at(&buf, at + 4);
            if len < 16 || at + len > n {
                return Err(NetifError::Netlink("malformed reply"));
            }
            match kind {
                NLMSG_DONE => break 'dump,
                NLMSG_ERROR => return Err(NetifError::Netlink("RTM_GETADDR failed")),
                RTM_NEWADDR if len >= 24 => {
                    let msg = &buf[at + 16..at + len];
                    let family = msg[0];
                    let mut flags = u32::from(msg[2]);
                    let msg_index = u32_at(msg, 4);
                    let (mut address, mut local) = (None, None);
                    let mut a = 8;
                    while a + 4 <= msg.len() {
                        let alen = u16_at(msg, a) as usize;
                        let atype = u16_at(msg, a + 2) & 0x3fff;
                        if alen < 4 || a + alen > msg.len() {
                            break;
                        }
                        let data = &msg[a + 4..a + alen];
                        let ip = match (i32::from(family), data.len()) {
                            (libc::AF_INET, 4) => {
                                Some(IpAddr::from(<[u8; 4]>::try_from(data).unwrap_or_default()))
                            }
                            (libc::AF_INET6, 16) => {
                                Some(IpAddr::from(<[u8; 16]>::try_from(data).unwrap_or_default()))
                            }
                            _ => None,
                        };
                        match atype {
                            IFA_ADDRESS => address = ip,
                            IFA_LOCAL => local = ip,
                            IFA_FLAGS if data.len() == 4 => flags = u32_at(data, 0),
                            _ => {}
                        }
                        a += (alen + 3) & !3;
                    }
                    if msg_index == index
                        && flags & IFA_F_PERMANENT != 0
                        && flags & IFA_F_TEMPORARY == 0
                        && let Some(ip) = local.or(address)
                    {
                        out.push(ip);
                    }
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
    }
    Ok(out)
}

/// The first item whose connection (client, server address) reaches this
/// host through `iface`: its server address is one of the interface's, or
/// the kernel routes its client out of `iface` ([`route_oif`]). A route
/// that cannot be looked up counts as through `iface` (a check that runs
/// rather than one skipped). The interface is asked only when `items` is
/// not empty.
pub fn first_through<T>(iface: &str, items: Vec<(IpAddr, IpAddr, T)>) -> Option<T> {
    if items.is_empty() {
        return None;
    }
    let addrs = addresses(iface).unwrap_or_default();
    let index = ifindex(iface).ok();
    items.into_iter().find_map(|(client, server, item)| {
        let on_iface = addrs.contains(&server);
        let through = match route_oif(client) {
            Ok(Some(oif)) => index.is_some_and(|i| i == oif),
            Ok(None) => false,
            Err(e) => {
                tracing::debug!("looking up the route to {client}: {e}");
                true
            }
        };
        (on_iface || through).then_some(item)
    })
}

/// The interface index the kernel routes packets to `dst` out of (an
/// `RTM_GETROUTE` lookup over rtnetlink, as `ip route get` does, in the
/// caller's network namespace), or None when it has no route to `dst`.
pub fn route_oif(dst: IpAddr) -> Result<Option<u32>, NetifError> {
    const RTM_NEWROUTE: u16 = 24;
    const RTM_GETROUTE: u16 = 26;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 0x1;
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };
    use std::os::fd::AsRawFd as _;

    let (family, addr): (u8, Vec<u8>) = match dst.to_canonical() {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(io("rtnetlink socket"))?;
    // nlmsghdr (16 bytes) + rtmsg (12 bytes) + RTA_DST.
    let len = 16 + 12 + 4 + addr.len();
    let mut req = vec![0u8; len];
    req[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETROUTE.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[16] = family;
    req[17] = (addr.len() * 8) as u8; // rtm_dst_len
    req[28..30].copy_from_slice(&((4 + addr.len()) as u16).to_ne_bytes());
    req[30..32].copy_from_slice(&RTA_DST.to_ne_bytes());
    req[32..].copy_from_slice(&addr);
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(io("RTM_GETROUTE"))?;
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut buf = vec![0u8; 16 * 1024];
    let n =
        recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(io("reading RTM_GETROUTE"))?;
    if n < 16 {
        return Err(NetifError::Netlink("short reply"));
    }
    let len = (u32_at(&buf, 0) as usize).min(n);
    match u16_at(&buf, 4) {
        // An error reply: no route (ENETUNREACH, EHOSTUNREACH, ...).
        NLMSG_ERROR if len >= 20 => {
            let errno = -(u32_at(&buf, 16) as i32);
            match errno {
                libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL => Ok(None),
                _ => Err(NetifError::Netlink("RTM_GETROUTE failed")),
            }
        }
        RTM_NEWROUTE if len >= 28 => {
            let msg = &buf[16..len];
            let mut a = 12;
            while a + 4 <= msg.len() {
                let alen = u16_at(msg, a) as usize;
                let atype = u16_at(msg, a + 2) & 0x3fff;
                if alen < 4 || a + alen > msg.len() {
                    break;
                }
                if atype == RTA_OIF && alen == 8 {
                    return Ok(Some(u32_at(msg, a + 4)));
                }
                a += (alen + 3) & !3;
            }
            Ok(None)
        }
        _ => Err(NetifError::Netlink("unexpected RTM_GETROUTE reply")),
    }
}

/// How segbpf reads a device's packets, from its ARPHRD type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkLayer {
    /// The device's `ARPHRD_*` type (linux/if_arp.h), as the kernel reports it.
    pub arphrd: u16,
    /// `segbpf_common::LINK_ETHERNET` or `LINK_RAW_IP`.
    pub link: u8,
}

impl LinkLayer {
    /// A name for the device type (`ether`, `none`, `ipip`, ...), as iproute2 prints it.
    pub fn type_name(&self) -> String {
        arphrd_name(self.arphrd)
    }

    /// Whether packets start at the IP header (no link-layer header).
    pub fn is_raw_ip(&self) -> bool {
        self.link == segbpf_common::LINK_RAW_IP
    }
}

/// `ARPHRD_*` values segbpf knows (linux/if_arp.h).
mod arphrd {
    pub(super) const ETHER: u16 = 1;
    pub(super) const INFINIBAND: u16 = 32;
    pub(super) const CAN: u16 = 280;
    pub(super) const PPP: u16 = 512;
    pub(super) const RAWIP: u16 = 519;
    pub(super) const TUNNEL: u16 = 768;
    pub(super) const TUNNEL6: u16 = 769;
    pub(super) const LOOPBACK: u16 = 772;
    pub(super) const SIT: u16 = 776;
    pub(super) const IPGRE: u16 = 778;
    pub(super) const IEEE80211_RADIOTAP: u16 = 803;
    pub(super) const IP6GRE: u16 = 823;
    pub(super) const NETLINK: u16 = 824;
    pub(super) const NONE: u16 = 0xfffe;
    pub(super) const VOID: u16 = 0xffff;
}

fn arphrd_name(t: u16) -> String {
    match t {
        arphrd::ETHER => "ether",
        arphrd::INFINIBAND => "infiniband",
        arphrd::CAN => "can",
        arphrd::PPP => "ppp",
        arphrd::RAWIP => "rawip",
        arphrd::TUNNEL => "ipip",
        arphrd::TUNNEL6 => "tunnel6",
        arphrd::LOOPBACK => "loopback",
        arphrd::SIT => "sit",
        arphrd::IPGRE => "gre",
        arphrd::IEEE80211_RADIOTAP => "ieee802.11/radiotap",
        arphrd::IP6GRE => "ip6gre",
        arphrd::NETLINK => "netlink",
        arphrd::NONE => "none",
        arphrd::VOID => "void",
        _ => return format!("unknown ({t})"),
    }
    .to_string()
}

/// How packets of a device of type `arphrd` start, or `None` when segbpf
/// has no parser for it. Ethernet-framed: Ethernet, veth, bridge, bond,
/// tap, vxlan, macvlan, loopback. No link layer: tun, WireGuard (`none`),
/// ipip, ip6tnl, sit, gre, ip6gre, ppp, raw IP.
pub fn classify(arphrd: u16) -> Option<LinkLayer> {
    let link = match arphrd {
        arphrd::ETHER | arphrd::LOOPBACK => segbpf_common::LINK_ETHERNET,
        arphrd::NONE
        | arphrd::TUNNEL
        | arphrd::TUNNEL6
        | arphrd::SIT
        | arphrd::IPGRE
        | arphrd::IP6GRE
        | arphrd::PPP
        | arphrd::RAWIP => segbpf_common::LINK_RAW_IP,
        _ => return None,
    };
    Some(LinkLayer { arphrd, link })
}

/// The device type (`ARPHRD_*`) of `iface` in the calling thread's network
/// namespace, asked of the kernel (SIOCGIFHWADDR), never guessed from the name.
pub fn device_type(iface: &str) -> Result<u16, NetifError> {
    use std::os::fd::AsRawFd as _;
    let name = iface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(NetifError::InvalidName(iface.to_string()));
    }
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io("socket for SIOCGIFHWADDR"))?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr of the
    // ifreq we own; the socket is open for the whole call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if rc != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ENODEV) {
            return Err(NetifError::NoSuchInterface {
                iface: iface.to_string(),
            });
        }
        return Err(NetifError::Io {
            what: format!("reading the device type of {iface}"),
            source,
        });
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds ifr_hwaddr.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// How segbpf must read `iface`'s packets; an error naming the device and
/// its type when segbpf has no parser for that type.
pub fn link_layer(iface: &str) -> Result<LinkLayer, NetifError> {
    let t = device_type(iface)?;
    classify(t).ok_or_else(|| NetifError::Unsupported {
        iface: iface.to_string(),
        type_name: arphrd_name(t),
        arphrd: t,
    })
}

/// What the kernel says about one interface, asked once: `attach` works
/// from this value (the `identify` step) and passes it on as data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The interface index.
    pub ifindex: u32,
    /// How its packets are read.
    pub link: LinkLayer,
    /// Its addresses (all of them, as [`addresses`] reports).
    pub addresses: Vec<IpAddr>,
}

/// The [`Identity`] of `iface`: its index, then its link layer (an error
/// for a device type segbpf cannot parse), then its addresses.
pub fn identify(iface: &str) -> Result<Identity, NetifError> {
    let ifindex = ifindex(iface)?;
    let link = link_layer(iface)?;
    let addresses = addresses(iface)?;
    Ok(Identity {
        ifindex,
        link,
        addresses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_permanent() {
        let addrs = permanent_addresses("lo").expect("lo");
        assert!(addrs.contains(&"127.0.0.1".parse().unwrap()), "{addrs:?}");
    }

    #[test]
    fn device_types_are_classified_or_refused() {
        assert_eq!(
            classify(1).map(|l| l.link),
            Some(segbpf_common::LINK_ETHERNET)
        );
        assert_eq!(
            classify(772).map(|l| l.link),
            Some(segbpf_common::LINK_ETHERNET)
        );
        for t in [0xfffe, 768, 769, 776, 778, 823, 512, 519] {
            assert_eq!(
                classify(t).map(|l| l.link),
                Some(segbpf_common::LINK_RAW_IP),
                "type {t}"
            );
        }
        for t in [32, 280, 803, 824, 0xffff, 0, 2] {
            assert_eq!(classify(t), None, "type {t} must be refused");
        }
        assert_eq!(arphrd_name(0xfffe), "none");
        assert_eq!(arphrd_name(4242), "unknown (4242)");
    }

    #[test]
    fn loopback_is_ethernet_framed() {
        // The test process's own namespace always has `lo`.
        let l = link_layer("lo").expect("lo");
        assert_eq!(l.arphrd, 772);
        assert!(!l.is_raw_ip());
        assert!(link_layer("no-such-if0").is_err());
    }
}
