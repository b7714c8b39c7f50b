//! The verdict: combines the parse result, connection and fragment state,
//! the two policy lookups and the defaults. Order: always-allowed L2
//! control traffic (ARP, IPv6 ND/MLD, and link-local control frames unless
//! `defaults.link_local = false`); later fragments (pass only after their first fragment
//! passed); tracked connections; policy rules (lowest matching rule id);
//! the ICMP default (echo requests, echo replies only when nothing is
//! tracked, and errors about tracked flows); the
//! direction's default. A packet that passes and opens a flow makes a
//! connection entry (in audit mode, so does one the policy would drop,
//! marked as audited); a first fragment that passes makes a fragment entry.
//! The verdict only decides: the program entry (`main.rs`) reports a
//! drop as a rate-limited event (`events`) and adds it to its denied
//! aggregate (`denied`) after `decide` returns.

use segbpf_common::{
    ACTION_ALLOW, Config, CtKey, CtKey4, DIR_INGRESS, IPPROTO_ICMP, IPPROTO_ICMPV6, NO_RULE, reason,
};

use crate::{
    ct,
    ctkey::FlowKey,
    frag, lookup,
    parse::{
        self, Bounds, FRAG_FIRST, FRAG_LATER, L2_LINK_LOCAL, L3_ARP, L3_IPV4, L3_IPV6, Parsed,
    },
};

/// The outcome for one packet.
pub(crate) struct Decision {
    /// Reason code (passes when below `reason::FIRST_DROP`).
    pub reason: u8,
    /// Allowing rule id or `NO_RULE`.
    pub rule_id: u32,
    /// Peer class or `u32::MAX`.
    pub class_id: u32,
    /// Transport protocol (0 when unknown).
    pub proto: u8,
    /// Destination port (0 when none).
    pub dport: u16,
    /// Audit mode: a drop that is let through (reported as an audit event).
    pub audit: bool,
}

impl Decision {
    /// Whether the packet goes on: it passes, or audit mode lets a drop through.
    #[inline(always)]
    pub(crate) fn lets_through(&self) -> bool {
        reason::passes(self.reason) || self.audit
    }
}

impl Decision {
    #[inline(always)]
    fn early(reason: u8) -> Self {
        Decision {
            reason,
            rule_id: NO_RULE,
            class_id: u32::MAX,
            proto: 0,
            dport: 0,
            audit: false,
        }
    }
}

/// Decides the fate of the packet `parsed` (the parser's result for the
/// packet in `pkt`: what it learned, or the drop reason) travelling in
/// direction `dir`, under the configuration `cfg`, at `now`; `writes`:
/// whether this instance may change connection and fragment state (live
/// and record instances; trace instances judge only). In audit mode a
/// drop is turned into a pass marked `audit` (its reason is still the drop
/// reason, so counters show what enforcement would do). Decides and
/// returns only: the caller reports a drop (`events`, `denied`) and counts
/// the decision (`stats`). `related`: see `judge`. `K`: the key form of
/// the program's family (`ctkey`), whose tables track its flows.
#[allow(clippy::too_many_arguments, reason = "inlined")]
#[inline(always)]
pub(crate) fn decide<K: FlowKey>(
    pkt: &Bounds,
    cfg: &Config,
    parsed: &Result<&Parsed, u8>,
    dir: u8,
    now: u64,
    writes: bool,
    len: u32,
    related: bool,
) -> Decision {
    let mut d = match parsed {
        Ok(p) => judge::<K>(pkt, cfg, dir, p, now, writes, len, related),
        Err(r) => Decision::early(*r),
    };
    if !reason::passes(d.reason) {
        d.audit = cfg.audit != 0;
    }
    d
}

/// The decision when the configuration cannot be read: fail closed.
#[inline(always)]
pub(crate) fn unconfigured() -> Decision {
    Decision::early(reason::DROP_DEFAULT)
}

/// Whether the packet `p` is an ICMP error that the related-flow check
/// (`judge_policy`) may judge under `cfg`: the packet programs hand these
/// (rare) packets to the error program (`main.rs`), the only one that
/// carries that check, so the verifier walks the quoted-packet parse and
/// its connection lookup once, not on every path of every program.
#[inline(always)]
pub(crate) fn hands_off_error(cfg: &Config, p: &Parsed) -> bool {
    cfg.established != 0 && cfg.icmp != 0 && is_error_to_relate(p)
}

/// The packet half of `hands_off_error`: an ICMP error that is not a
/// later fragment (the error program's check of what it was handed; it
/// judges under the configuration in force when it runs, which a reload
/// may have changed since the packet program read it).
#[inline(always)]
pub(crate) fn is_error_to_relate(p: &Parsed) -> bool {
    p.frag != FRAG_LATER && parse::is_icmp_error(p.l3, p.proto, p.icmp_type)
}

/// The verdict of a packet the parser fully validated (`related`: whether
/// the related-flow check of ICMP errors is compiled in, see
/// `hands_off_error`).
#[allow(clippy::too_many_arguments, reason = "inlined")]
#[inline(always)]
fn judge<K: FlowKey>(
    pkt: &Bounds,
    cfg: &Config,
    dir: u8,
    p: &Parsed,
    now: u64,
    writes: bool,
    len: u32,
    related: bool,
) -> Decision {
    let acct = cfg.flow_acct != 0;
    if p.l3 == L3_ARP {
        return Decision::early(reason::PASS_ARP);
    }
    if p.l3 == L2_LINK_LOCAL {
        return Decision::early(if cfg.link_local != 0 {
            reason::PASS_LINK_LOCAL
        } else {
            reason::DROP_LINK_LOCAL
        });
    }
    if is_neighbour_discovery(p) {
        return Decision::early(reason::PASS_ND);
    }
    let mut d = Decision::early(reason::DROP_DEFAULT);
    d.proto = p.proto;
    d.dport = p.dport;

    if p.frag == FRAG_LATER {
        if let Some(e) = frag::leader(cfg, p, now) {
            d.reason = reason::PASS_FRAG;
            d.rule_id = e.rule_id;
        } else {
            d.reason = reason::DROP_FRAGMENT;
        }
        return d;
    }

    let ct_key = if cfg.established != 0 {
        ct::key::<K>(dir, p)
    } else {
        None
    };
    let mut assured = false;
    if let Some(k) = &ct_key
        && let Some(t) = ct::lookup(cfg, k, p, now)
    {
        // SAFETY: `t.entry` points at a live map value (see ct::lookup).
        d.rule_id = unsafe { (*t.entry).rule_id };
        d.reason = ct::check(&t, dir, p);
        assured = t.assured;
        if writes && reason::passes(d.reason) {
            ct::update(&t, k, dir, p, now, len, acct);
        }
    } else {
        judge_policy(pkt, cfg, dir, p, now, &mut d, related);
        // Audit mode tracks the flows it lets through against the policy,
        // marked, so their replies are not reported as well.
        let audited = !reason::passes(d.reason) && cfg.audit != 0;
        // The error program (`related`) judges only ICMP errors, which
        // never open a flow: no insert is compiled into it (its frame
        // leaves no room for the table's write, `cttable`).
        if writes
            && !related
            && (reason::passes(d.reason) || audited)
            && let Some(k) = &ct_key
            && ct::opens_flow(p)
        {
            ct::create(cfg, k, dir, p, d.rule_id, now, len, acct, audited);
        }
    }
    if writes && p.frag == FRAG_FIRST && reason::passes(d.reason) {
        frag::remember(p, d.reason, d.rule_id, now, assured);
    }
    d
}

/// Policy rules, then the ICMP default, then the direction's default.
#[inline(always)]
fn judge_policy(
    pkt: &Bounds,
    cfg: &Config,
    dir: u8,
    p: &Parsed,
    now: u64,
    d: &mut Decision,
    related: bool,
) {
    if let Some(class_id) = lookup::peer_class(cfg.active_slot, dir, p, dir == DIR_INGRESS) {
        d.class_id = class_id;
        if let Some(rule_id) = lookup::port_rule(cfg.active_slot, class_id, p.proto, p.dport) {
            d.rule_id = rule_id;
            d.reason = reason::PASS_RULE;
            return;
        }
    }
    if cfg.icmp != 0 {
        if is_default_echo(p, cfg.established != 0) {
            d.reason = reason::PASS_ICMP;
            return;
        }
        if related
            && cfg.established != 0
            && parse::is_icmp_error(p.l3, p.proto, p.icmp_type)
            && related_flow_lives(pkt, cfg, dir, p, now)
        {
            d.reason = reason::PASS_RELATED;
            return;
        }
    }
    let default = if dir == DIR_INGRESS {
        cfg.ingress_default
    } else {
        cfg.egress_default
    };
    d.reason = if default == ACTION_ALLOW {
        reason::PASS_DEFAULT
    } else {
        reason::DROP_DEFAULT
    };
}

/// Whether the ICMP error `p` quotes a live flow (of its own family: the
/// error program judges both families).
#[inline(always)]
fn related_flow_lives(pkt: &Bounds, cfg: &Config, dir: u8, p: &Parsed, now: u64) -> bool {
    if p.l3 == L3_IPV4 {
        ct::related_key::<CtKey4>(pkt, dir, p)
            .is_some_and(|k| ct::lookup(cfg, &k, p, now).is_some())
    } else {
        ct::related_key::<CtKey>(pkt, dir, p).is_some_and(|k| ct::lookup(cfg, &k, p, now).is_some())
    }
}

/// IPv6 neighbour discovery (RS/RA/NS/NA, hop limit 255) and MLD (hop
/// limit 1): always allowed, or IPv6 stops working.
#[inline(always)]
fn is_neighbour_discovery(p: &Parsed) -> bool {
    if p.l3 != L3_IPV6 || p.proto != IPPROTO_ICMPV6 {
        return false;
    }
    match p.icmp_type {
        133..=136 => p.hop_limit == 255,
        130..=132 | 143 => p.hop_limit == 1,
        _ => false,
    }
}

/// The echo messages of the packet's own family that `defaults.icmp`
/// passes from anyone: requests always; replies only when nothing is
/// tracked (`established = false`). With tracking on, an echo reply
/// passes only as the reply of a tracked request (`ct`), so unsolicited
/// replies (scans, reflection, ICMP tunnels) meet the default.
#[inline(always)]
fn is_default_echo(p: &Parsed, tracking: bool) -> bool {
    (p.l3 == L3_IPV4
        && p.proto == IPPROTO_ICMP
        && (p.icmp_type == 8 || (p.icmp_type == 0 && !tracking)))
        || (p.l3 == L3_IPV6
            && p.proto == IPPROTO_ICMPV6
            && (p.icmp_type == 128 || (p.icmp_type == 129 && !tracking)))
}
