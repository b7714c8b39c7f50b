//! Finding each rule's line in the files: the tools' JSON has no positions,
//! but it keeps each chain's rules in file order, so the n-th rule of a
//! chain in the JSON is the n-th rule statement of that chain in the files
//! (includes followed). When the counts do not agree the lines are left out
//! (the warning then names the file and the rule as nft lists it).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// A rule statement found in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRule {
    /// The file it is in.
    pub file: String,
    /// 1-based line where it starts.
    pub line: u32,
    /// The statement, trimmed.
    pub text: String,
}

/// Rules by (table name, chain name), in file order.
pub type Lines = BTreeMap<(String, String), Vec<SourceRule>>;

/// The rule statements of an nftables file (`text`, its content as read)
/// and the files it includes.
pub fn nft_lines(path: &Path, text: &str) -> Lines {
    let mut out = Lines::new();
    let mut seen = Vec::new();
    nft_file(path, Some(text), &mut out, &mut seen, 0);
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Ctx {
    Table(String),
    Chain(String, String),
    Other,
}

fn nft_file(path: &Path, text: Option<&str>, out: &mut Lines, seen: &mut Vec<PathBuf>, depth: u32) {
    if depth > 16 || seen.iter().any(|p| p == path) {
        return;
    }
    seen.push(path.to_path_buf());
    let text = if let Some(t) = text {
        t.to_string()
    } else {
        let Ok(t) = std::fs::read_to_string(path) else {
            return;
        };
        t
    };
    let file = path.display().to_string();
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut stack: Vec<Ctx> = Vec::new();
    let mut stmt = String::new();
    let mut stmt_line = 0u32;
    let mut line = 1u32;
    let mut chars = text.chars().peekable();
    let mut in_quote = false;
    // Depth of anonymous braces inside a rule statement.
    let mut anon = 0u32;
    let finish = |stmt: &mut String,
                  stmt_line: u32,
                  stack: &[Ctx],
                  out: &mut Lines,
                  seen: &mut Vec<PathBuf>| {
        let s = stmt.trim().to_string();
        stmt.clear();
        if s.is_empty() {
            return;
        }
        let first = s.split_whitespace().next().unwrap_or("");
        match stack.last() {
            Some(Ctx::Chain(t, c))
                if !matches!(
                    first,
                    "type" | "policy" | "comment" | "devices" | "priority"
                ) =>
            {
                out.entry((t.clone(), c.clone()))
                    .or_default()
                    .push(SourceRule {
                        file: file.clone(),
                        line: stmt_line,
                        text: s,
                    });
            }
            None => {
                let words: Vec<&str> = s.split_whitespace().collect();
                if first == "include" {
                    let name = s["include".len()..].trim().trim_matches('"');
                    let p = if Path::new(name).is_absolute() {
                        PathBuf::from(name)
                    } else {
                        dir.join(name)
                    };
                    nft_file(&p, None, out, seen, depth + 1);
                } else if matches!(first, "add" | "insert") && words.get(1) == Some(&"rule") {
                    // add rule [family] table chain STATEMENTS
                    let rest = &words[2..];
                    let skip = usize::from(is_family(rest.first().copied().unwrap_or("")));
                    if rest.len() >= skip + 3 {
                        out.entry((rest[skip].to_string(), rest[skip + 1].to_string()))
                            .or_default()
                            .push(SourceRule {
                                file: file.clone(),
                                line: stmt_line,
                                text: rest[skip + 2..].join(" "),
                            });
                    }
                }
            }
            _ => {}
        }
    };
    while let Some(c) = chars.next() {
        if in_quote {
            stmt.push(c);
            if c == '"' {
                in_quote = false;
            } else if c == '\n' {
                line += 1;
            }
            continue;
        }
        match c {
            '#' => {
                // Comment to the end of the line.
                while let Some(&n) = chars.peek() {
                    if n == '\n' {
                        break;
                    }
                    chars.next();
                }
            }
            '"' => {
                if stmt.trim().is_empty() {
                    stmt_line = line;
                }
                in_quote = true;
                stmt.push(c);
            }
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
                line += 1;
                stmt.push(' ');
            }
            '\n' | ';' => {
                if c == '\n' {
                    line += 1;
                }
                if anon > 0 {
                    stmt.push(' ');
                } else {
                    finish(&mut stmt, stmt_line, &stack, out, seen);
                }
            }
            '{' => {
                let in_chain = matches!(stack.last(), Some(Ctx::Chain(..)));
                let mut w = stmt.split_whitespace();
                let top_rule = stack.is_empty()
                    && matches!(w.next(), Some("add" | "insert"))
                    && matches!(w.next(), Some("rule" | "element"));
                if in_chain || anon > 0 || top_rule {
                    anon += 1;
                    stmt.push(c);
                    continue;
                }
                let words: Vec<String> = stmt.split_whitespace().map(str::to_string).collect();
                stmt.clear();
                let ctx = match (stack.last(), words.first().map(String::as_str)) {
                    (None, Some("table")) => Ctx::Table(words.last().cloned().unwrap_or_default()),
                    (Some(Ctx::Table(t)), Some("chain")) => {
                        Ctx::Chain(t.clone(), words.last().cloned().unwrap_or_default())
                    }
                    _ => Ctx::Other,
                };
                stack.push(ctx);
            }
            '}' => {
                if anon > 0 {
                    anon -= 1;
                    stmt.push(c);
                    continue;
                }
                finish(&mut stmt, stmt_line, &stack, out, seen);
                stack.pop();
            }
            _ => {
                if stmt.trim().is_empty() && !c.is_whitespace() {
                    stmt_line = line;
                }
                stmt.push(c);
            }
        }
    }
    finish(&mut stmt, stmt_line, &stack, out, seen);
}

fn is_family(w: &str) -> bool {
    matches!(w, "ip" | "ip6" | "inet" | "arp" | "bridge" | "netdev")
}

/// The rules of an `iptables-save` file (`text`, its content as read):
/// `-A CHAIN ...` lines per table.
pub fn iptables_lines(path: &Path, text: &str) -> Lines {
    let mut out = Lines::new();
    let file = path.display().to_string();
    let mut table = String::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if let Some(t) = l.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(rest) = l.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or("").to_string();
            out.entry((table.clone(), chain))
                .or_default()
                .push(SourceRule {
                    file: file.clone(),
                    line: u32::try_from(i + 1).unwrap_or(u32::MAX),
                    text: l.to_string(),
                });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_rules_by_chain_with_lines_includes_and_add_rule() {
        let dir = std::env::temp_dir().join(format!("segbpf-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("inc.nft"),
            "table inet filter {\n  chain input {\n    tcp dport 80 accept\n  }\n}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("main.nft"),
            "define x = { 1, 2 }\ntable inet filter {\n  set s { type ipv4_addr; elements = { 1.2.3.4 } }\n  chain input {\n    type filter hook input priority 0; policy drop;\n    ct state established,related accept # replies\n    udp dport {\n      53, 123\n    } accept; tcp dport 22 accept\n  }\n}\ninclude \"inc.nft\"\nadd rule inet filter input icmp type echo-request accept\nadd rule inet filter input udp dport { 1, 2 } accept\n",
        )
        .unwrap();
        let main = dir.join("main.nft");
        let l = nft_lines(&main, &std::fs::read_to_string(&main).unwrap());
        let input = &l[&("filter".to_string(), "input".to_string())];
        let got: Vec<(u32, &str)> = input.iter().map(|r| (r.line, r.text.as_str())).collect();
        assert_eq!(got[0], (6, "ct state established,related accept"));
        assert_eq!(got[1].0, 7);
        assert!(got[1].1.starts_with("udp dport {"), "{got:?}");
        assert_eq!(got[2], (9, "tcp dport 22 accept"));
        assert_eq!(got[3], (3, "tcp dport 80 accept"));
        assert!(input[3].file.ends_with("inc.nft"));
        assert_eq!(got[4], (13, "icmp type echo-request accept"));
        assert_eq!(got[5], (14, "udp dport { 1, 2 } accept"));
        assert_eq!(got.len(), 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
