//! Reading one host's ruleset with the real tools: load it into a scratch
//! namespace, list it as JSON, keep its tables, sets and chains with each
//! rule's source line.

use std::{fmt::Write as _, path::Path};

use serde_json::Value;

use super::{
    ImportError, Origin,
    scratch::ScratchNs,
    source::{self, Lines},
};
use crate::policy::{AddrRange, PortRange};

/// The family of an nftables table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// `ip`: IPv4 only.
    Ip,
    /// `ip6`: IPv6 only.
    Ip6,
    /// `inet`: both.
    Inet,
    /// `arp`, `bridge`, `netdev`: not filtered by segbpf's IP rules.
    Other,
}

impl Family {
    fn parse(s: &str) -> Family {
        match s {
            "ip" => Family::Ip,
            "ip6" => Family::Ip6,
            "inet" => Family::Inet,
            _ => Family::Other,
        }
    }
}

/// A named set of a table.
#[derive(Clone, Debug)]
pub struct NamedSet {
    /// Table family.
    pub family: Family,
    /// Table name.
    pub table: String,
    /// Set name.
    pub name: String,
    /// Address elements (an `ipv4_addr`/`ipv6_addr` set).
    pub addrs: Option<Vec<AddrRange>>,
    /// Port elements (an `inet_service` set).
    pub ports: Option<Vec<PortRange>>,
}

/// One rule as the tool lists it.
#[derive(Clone, Debug)]
pub struct RawRule {
    /// Where it is written.
    pub origin: Origin,
    /// The expressions (`nft -j` schema).
    pub expr: Vec<Value>,
    /// Its comment, if any.
    pub comment: Option<String>,
}

/// A chain and its rules, in order.
#[derive(Clone, Debug)]
pub struct Chain {
    /// Table family.
    pub family: Family,
    /// The family as written (for messages).
    pub family_name: String,
    /// Table name.
    pub table: String,
    /// Chain name.
    pub name: String,
    /// Base chain: its hook (`input`, `output`, `forward`, ...).
    pub hook: Option<String>,
    /// Base chain: its type (`filter`, `nat`, `route`).
    pub kind: Option<String>,
    /// Base chain: its policy (`accept`, `drop`).
    pub policy: Option<String>,
    /// Rules in order.
    pub rules: Vec<RawRule>,
}

/// One host's ruleset.
#[derive(Clone, Debug, Default)]
pub struct Ruleset {
    /// The file as given.
    pub file: String,
    /// Named sets.
    pub sets: Vec<NamedSet>,
    /// Chains.
    pub chains: Vec<Chain>,
    /// Objects segbpf has no equivalent of (ct helpers, flowtables, ...),
    /// with what they are.
    pub objects: Vec<String>,
    /// Whether the file is an iptables-save file (what its rules look like
    /// in messages).
    pub iptables: bool,
    /// The ruleset as JSON (as the tools listed it).
    pub json: Value,
    /// The file's content as it was read (once) and given to the tools.
    pub text: String,
}

impl Ruleset {
    /// The chain `name` of table (`family`, `table`).
    pub fn chain(&self, family: Family, table: &str, name: &str) -> Option<&Chain> {
        self.chains
            .iter()
            .find(|c| c.family == family && c.table == table && c.name == name)
    }

    /// The named set `name` of table (`family`, `table`).
    pub fn set(&self, family: Family, table: &str, name: &str) -> Option<&NamedSet> {
        self.sets
            .iter()
            .find(|s| s.family == family && s.table == table && s.name == name)
    }
}

/// Reads one host's ruleset with the real tools: `text` is the file's
/// content, read once by the caller ([`super::read_input`]); the tools get
/// these bytes on their stdin, never the file again (a pipe or
/// `/dev/stdin` can be read only once). `path` names the file in messages
/// and is where relative includes are looked for.
pub fn read(flavor: super::Flavor, path: &Path, text: &str) -> Result<Ruleset, ImportError> {
    let file = path.display().to_string();
    let ns = ScratchNs::new("r")?;
    let (json, lines, iptables) = match flavor {
        super::Flavor::Nft => {
            let is_json = text.trim_start().starts_with('{');
            for name in interface_names(path, text) {
                // `iif NAME` needs the interface to exist; a dummy does.
                let _ = ns.ip(&["link", "add", &name, "type", "dummy"]);
            }
            let dir = include_dir(path);
            let mut args = vec!["-I", dir.as_str()];
            if is_json {
                args.push("-j");
            }
            args.extend(["-f", "-"]);
            let out = ns.exec_input("nft", &args, text.as_bytes())?;
            if !out.status.success() {
                let mut message = stdin_named(&file, &String::from_utf8_lossy(&out.stderr));
                if !is_json {
                    message.push_str(&family_hint(&file, text, &message));
                }
                return Err(ImportError::Refused {
                    file,
                    tool: "nft".to_string(),
                    message,
                });
            }
            let lines = if is_json {
                Lines::new()
            } else {
                source::nft_lines(path, text)
            };
            (ns.nft_json()?, lines, false)
        }
        super::Flavor::Iptables => {
            let v6 = is_ip6tables(text);
            let tool = if v6 {
                "ip6tables-nft-restore"
            } else {
                "iptables-nft-restore"
            };
            let out = ns.exec_input(tool, &[], text.as_bytes())?;
            if !out.status.success() {
                return Err(ImportError::Refused {
                    file: file.clone(),
                    tool: tool.to_string(),
                    message: with_line(&file, &String::from_utf8_lossy(&out.stderr)),
                });
            }
            (translated(&ns)?, source::iptables_lines(path, text), true)
        }
    };
    drop(ns);
    let mut rs = parse_json(&file, &json, &lines)?;
    rs.iptables = iptables;
    if !filters(&rs) {
        return Err(ImportError::NoFilter {
            hint: no_filter_hint(text),
            file,
        });
    }
    rs.json = json;
    rs.text = text.to_string();
    Ok(rs)
}

/// Whether a ruleset has anything that filters this host's traffic: a base
/// chain of type filter on the input or output hook of an IP family.
/// Without one (only comments, only `*nat`, only metainfo) the import
/// would be "no rules, accept everything", so it is refused.
pub fn filters(rs: &Ruleset) -> bool {
    rs.chains.iter().any(|c| {
        c.family != Family::Other
            && c.kind.as_deref() == Some("filter")
            && matches!(c.hook.as_deref(), Some("input" | "output"))
    })
}

/// Where the rules of an input without a filter chain may be: the warning
/// `iptables-nft-save` prints when legacy tables hold the rules.
fn no_filter_hint(text: &str) -> String {
    if text.contains("iptables-legacy tables present") || text.contains("iptables-legacy-save") {
        "; the file says iptables-legacy tables are present: save them with `iptables-legacy-save` (and `ip6tables-legacy-save`) and import that".to_string()
    } else {
        String::new()
    }
}

/// The JSON of an iptables-nft ruleset loaded in `ns`, its xtables
/// matches in native expressions. In JSON they show as opaque `xt`
/// objects, but nft lists them translated: the listing is loaded into a
/// second namespace and its JSON taken. When the listing does not load as
/// a whole (an extension nft cannot translate, such as `-m recent`, lists
/// as `xt match recent`), each rule is translated on its own, so that one
/// rule's failure touches only that rule: it keeps its `xt` expression,
/// which the mapping reports as unsupported.
fn translated(ns: &ScratchNs) -> Result<Value, ImportError> {
    let listed = ns.exec("nft", &["list", "ruleset"])?;
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let ns2 = ScratchNs::new("t")?;
    if ns2.nft_load_str(&listed).is_ok() {
        return ns2.nft_json();
    }
    let mut json = ns.nft_json()?;
    let handles = ns.exec("nft", &["-a", "list", "ruleset"])?;
    let texts = rule_texts(&String::from_utf8_lossy(&handles.stdout));
    let Some(items) = json["nftables"].as_array_mut() else {
        return Ok(json);
    };
    // The tables, chains and sets, without rules: what a rule may refer to.
    let skeleton: Vec<Value> = items
        .iter()
        .filter(|i| i.get("rule").is_none() && i.get("metainfo").is_none())
        .cloned()
        .collect();
    let skeleton = serde_json::json!({ "nftables": skeleton }).to_string();
    let out = ns2.exec_input("nft", &["-j", "-f", "-"], skeleton.as_bytes())?;
    if !out.status.success() {
        return Ok(json);
    }
    for item in items.iter_mut() {
        let Some(rule) = item.get_mut("rule") else {
            continue;
        };
        let has_xt = rule["expr"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x.get("xt").is_some()));
        if !has_xt {
            continue;
        }
        let key = (
            rule["family"].as_str().unwrap_or("").to_string(),
            rule["table"].as_str().unwrap_or("").to_string(),
            rule["chain"].as_str().unwrap_or("").to_string(),
            rule["handle"].as_u64().unwrap_or(0),
        );
        let Some(text) = texts.get(&key) else {
            continue;
        };
        let cmd = format!("add rule {} {} {} {text}", key.0, key.1, key.2);
        let Ok(out) = ns2.exec("nft", &["-e", "-j", &cmd]) else {
            continue;
        };
        if !out.status.success() {
            continue;
        }
        let Ok(echo) = serde_json::from_slice::<Value>(&out.stdout) else {
            continue;
        };
        let expr = &echo["nftables"][0]["add"]["rule"]["expr"];
        if expr.is_array() {
            rule["expr"] = expr.clone();
        }
    }
    Ok(json)
}

/// The rules of an `nft -a list ruleset` listing by (family, table,
/// chain, handle): each rule is listed on one line ending in `# handle N`.
fn rule_texts(listing: &str) -> std::collections::BTreeMap<(String, String, String, u64), String> {
    let mut out = std::collections::BTreeMap::new();
    let (mut family, mut table, mut chain) = (String::new(), String::new(), None::<String>);
    for line in listing.lines() {
        let l = line.trim();
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.first() == Some(&"table") && w.len() >= 3 {
            family = w[1].to_string();
            table = w[2].to_string();
            chain = None;
        } else if w.first() == Some(&"chain") && w.len() >= 2 {
            chain = Some(w[1].to_string());
        } else if l == "}" {
            chain = None;
        } else if let (Some(c), Some((rule, handle))) = (&chain, l.rsplit_once(" # handle "))
            && let Ok(h) = handle.trim().parse::<u64>()
        {
            out.insert(
                (family.clone(), table.clone(), c.clone(), h),
                rule.trim().to_string(),
            );
        }
    }
    out
}

/// The directory relative includes of `path` are looked for in.
pub fn include_dir(path: &Path) -> String {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .display()
        .to_string()
}

/// A tool's messages about its stdin, naming the user's file instead.
pub fn stdin_named(file: &str, msg: &str) -> String {
    msg.trim_end()
        .lines()
        .map(|l| match l.strip_prefix("/dev/stdin:") {
            Some(rest) => format!("{file}:{rest}"),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether an iptables-save file is IPv6 (`ip6tables-save` header, or IPv6
/// addresses or ICMPv6 in its rules).
pub fn is_ip6tables(text: &str) -> bool {
    if text.contains("ip6tables-save") {
        return true;
    }
    if text.contains("iptables-save") {
        return false;
    }
    text.lines().any(|l| {
        l.starts_with("-A")
            && (l.contains("icmpv6")
                || l.contains("ipv6-icmp")
                || l.split_whitespace().any(|w| {
                    w.contains(':')
                        && w.split('/')
                            .next()
                            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
                }))
    })
}

/// Puts the file name in front of an iptables-restore message that gives
/// a line (`Error occurred at line: 4`, `line 4 failed`).
fn with_line(file: &str, msg: &str) -> String {
    let msg = msg.trim_end();
    let line = msg.lines().find_map(|l| {
        let idx = l.find("line")?;
        let rest = l[idx + 4..].trim_start_matches([':', ' ']);
        let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
        n.parse::<u32>().ok()
    });
    match line {
        Some(n) => format!("{file}:{n}: {msg}"),
        None => format!("{file}: {msg}"),
    }
}

/// A note for nft's syntax error on `table FAMILY NAME {` with a family nft
/// does not know (it reads the family as the table's name and stumbles on
/// the next word).
fn family_hint(file: &str, text: &str, message: &str) -> String {
    let mut out = String::new();
    for (i, l) in text.lines().enumerate() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let named = w.len() >= 3 && w[2] != "{" && !w[2].starts_with('{');
        if w.first() == Some(&"table")
            && named
            && !matches!(w[1], "ip" | "ip6" | "inet" | "arp" | "bridge" | "netdev")
            && message.contains(&format!("{file}:{}:", i + 1))
        {
            let _ = write!(
                out,
                "\n{file}:{}: unknown table family `{}`: nftables knows ip, ip6, inet, arp, bridge and netdev",
                i + 1,
                w[1]
            );
        }
    }
    out
}

/// Interface names after `iif`/`oif` in a file (`text`, as read) and its
/// includes.
fn interface_names(path: &Path, top: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut todo = vec![path.to_path_buf()];
    let mut done = Vec::new();
    while let Some(p) = todo.pop() {
        if done.contains(&p) || done.len() > 64 {
            continue;
        }
        let text = if done.is_empty() {
            top.to_string()
        } else {
            let Ok(t) = std::fs::read_to_string(&p) else {
                continue;
            };
            t
        };
        let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
        done.push(p);
        let words: Vec<&str> = text
            .split(|c: char| c.is_whitespace() || c == ';' || c == ',' || c == '{' || c == '}')
            .filter(|w| !w.is_empty())
            .collect();
        for (i, w) in words.iter().enumerate() {
            if matches!(*w, "iif" | "oif") {
                let mut j = i + 1;
                if words.get(j).is_some_and(|x| matches!(*x, "!=" | "==")) {
                    j += 1;
                }
                if let Some(n) = words.get(j) {
                    let n = n.trim_matches('"');
                    if !n.is_empty()
                        && n.len() <= 15
                        && n != "lo"
                        && n.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                        && !names.iter().any(|x| x == n)
                    {
                        names.push(n.to_string());
                    }
                }
            }
            if *w == "include"
                && let Some(n) = words.get(i + 1)
            {
                todo.push(dir.join(n.trim_matches('"')));
            }
        }
    }
    names
}

/// The ruleset in `nft -j` JSON.
pub fn parse_json(file: &str, json: &Value, lines: &Lines) -> Result<Ruleset, ImportError> {
    let bad = |m: &str| ImportError::Json {
        file: file.to_string(),
        message: m.to_string(),
    };
    let items = json["nftables"]
        .as_array()
        .ok_or_else(|| bad("not an nftables JSON ruleset (no \"nftables\" array)"))?;
    let mut rs = Ruleset {
        file: file.to_string(),
        ..Ruleset::default()
    };
    let mut rules_seen: std::collections::BTreeMap<(String, String, String), usize> =
        std::collections::BTreeMap::new();
    for item in items {
        let Some((kind, v)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let fam_name = v["family"].as_str().unwrap_or("ip").to_string();
        let family = Family::parse(&fam_name);
        let table = v["table"].as_str().unwrap_or("").to_string();
        match kind.as_str() {
            "set" => {
                let ty = v["type"].as_str().unwrap_or("");
                let elems = v["elem"].as_array().cloned().unwrap_or_default();
                let (addrs, ports) = match ty {
                    "ipv4_addr" | "ipv6_addr" => (
                        Some(elems.iter().filter_map(addr_elem).flatten().collect()),
                        None,
                    ),
                    "inet_service" => (None, Some(elems.iter().filter_map(port_elem).collect())),
                    _ => (None, None),
                };
                rs.sets.push(NamedSet {
                    family,
                    table,
                    name: v["name"].as_str().unwrap_or("").to_string(),
                    addrs,
                    ports,
                });
            }
            "chain" => rs.chains.push(Chain {
                family,
                family_name: fam_name,
                table,
                name: v["name"].as_str().unwrap_or("").to_string(),
                hook: v["hook"].as_str().map(str::to_string),
                kind: v["type"].as_str().map(str::to_string),
                policy: v["policy"].as_str().map(str::to_string),
                rules: Vec::new(),
            }),
            "rule" => {
                let chain = v["chain"].as_str().unwrap_or("").to_string();
                let n = rules_seen
                    .entry((fam_name.clone(), table.clone(), chain.clone()))
                    .or_insert(0);
                let idx = *n;
                *n += 1;
                let src = lines
                    .get(&(table.clone(), chain.clone()))
                    .filter(|l| {
                        // Only when the counts agree (checked below).
                        idx < l.len()
                    })
                    .map(|l| l[idx].clone());
                let origin = match src {
                    Some(s) => Origin {
                        file: s.file,
                        line: Some(s.line),
                        text: s.text,
                    },
                    None => Origin {
                        file: file.to_string(),
                        line: None,
                        text: format!(
                            "table {fam_name} {table} chain {chain} rule {} (handle {})",
                            idx + 1,
                            v["handle"]
                        ),
                    },
                };
                let rule = RawRule {
                    origin,
                    expr: v["expr"].as_array().cloned().unwrap_or_default(),
                    comment: v["comment"].as_str().map(str::to_string),
                };
                match rs
                    .chains
                    .iter_mut()
                    .find(|c| c.family == family && c.table == table && c.name == chain)
                {
                    Some(c) => c.rules.push(rule),
                    None => return Err(bad(&format!("rule of unknown chain {chain}"))),
                }
            }
            "ct helper" | "flowtable" | "ct expectation" | "synproxy" | "secmark" => {
                rs.objects.push(format!(
                    "{kind} {} in table {fam_name} {table}",
                    v["name"].as_str().unwrap_or("")
                ));
            }
            _ => {}
        }
    }
    // Lines only where every rule of the chain was found in the files.
    for c in &mut rs.chains {
        let found = lines
            .get(&(c.table.clone(), c.name.clone()))
            .map_or(0, Vec::len);
        if found != c.rules.len() && found != 0 {
            for (i, r) in c.rules.iter_mut().enumerate() {
                r.origin = Origin {
                    file: file.to_string(),
                    line: None,
                    text: format!(
                        "table {} {} chain {} rule {}",
                        c.family_name,
                        c.table,
                        c.name,
                        i + 1
                    ),
                };
            }
        }
    }
    Ok(rs)
}

/// An address element: `"1.2.3.4"`, `{"prefix": ...}`, `{"range": [a, b]}`,
/// `{"elem": {"val": ...}}`. None when it is not an address.
pub fn addr_elem(v: &Value) -> Option<Vec<AddrRange>> {
    if let Some(s) = v.as_str() {
        return crate::policy::addr::parse_item(s).ok().map(|r| vec![r]);
    }
    if let Some(e) = v.get("elem") {
        return addr_elem(&e["val"]);
    }
    if let Some(p) = v.get("prefix") {
        let s = format!("{}/{}", p["addr"].as_str()?, p["len"].as_u64()?);
        let net: ipnet::IpNet = s.parse().ok()?;
        return Some(vec![AddrRange::from_net(net.trunc())]);
    }
    if let Some(r) = v.get("range") {
        let a: std::net::IpAddr = r[0].as_str()?.parse().ok()?;
        let b: std::net::IpAddr = r[1].as_str()?.parse().ok()?;
        return AddrRange::new(a, b).ok().map(|r| vec![r]);
    }
    if let Some(s) = v.get("set").and_then(Value::as_array) {
        let mut out = Vec::new();
        for x in s {
            out.extend(addr_elem(x)?);
        }
        return Some(out);
    }
    None
}

/// A port element: `80`, `{"range": [a, b]}`, `{"elem": {"val": ...}}`.
pub fn port_elem(v: &Value) -> Option<PortRange> {
    if let Some(n) = v.as_u64() {
        return Some(PortRange::single(u16::try_from(n).ok()?));
    }
    if let Some(e) = v.get("elem") {
        return port_elem(&e["val"]);
    }
    if let Some(r) = v.get("range") {
        let a = u16::try_from(r[0].as_u64()?).ok()?;
        let b = u16::try_from(r[1].as_u64()?).ok()?;
        return PortRange::new(a, b);
    }
    None
}

/// The families the ruleset filters (false = IPv4, true = IPv6).
pub fn families(rs: &Ruleset) -> Vec<bool> {
    let mut out = Vec::new();
    for c in &rs.chains {
        match c.family {
            Family::Ip => out.push(false),
            Family::Ip6 => out.push(true),
            Family::Inet => out.extend([false, true]),
            Family::Other => {}
        }
    }
    if out.is_empty() {
        out.extend([false, true]);
    }
    out
}
