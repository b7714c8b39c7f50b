//! `segbpf man DIR` (hidden): write the manual pages, `segbpf.8` and one
//! per subcommand (`segbpf-attach.8`, `segbpf-set-add.8`, ...), into DIR
//! (clap_mangen), each with EXAMPLES, FILES and ENVIRONMENT sections, and
//! `roles.toml.5`, the policy file's page, generated from docs/policy.md.
//! The package build runs it on the release binary and installs the
//! pages, gzip'd, under `/usr/share/man/man8/` and `man5/`. Section 8:
//! segbpf is an administrator's command.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::CommandFactory as _;

use crate::cmd::Cli;

/// Arguments of `segbpf man`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write the pages into (created if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// Manual section of every page.
pub const SECTION: &str = "8";

/// One manual page: file name (`segbpf-attach.8`) and roff text.
#[derive(Debug)]
pub struct Page {
    /// File name.
    pub name: String,
    /// The page.
    pub text: Vec<u8>,
}

/// docs/policy.md, the source of `roles.toml(5)`.
const POLICY_MD: &str = include_str!("../../../docs/policy.md");

/// Escapes text for roff: backslashes, hyphens (so they are not
/// hyphenation points), and a leading `.` or `'` (not a request).
fn roff_escape(t: &str) -> String {
    let t = t.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// Inline markdown to roff: `code` in bold, [text](link) as its text.
fn inline(t: &str) -> String {
    let mut out = String::new();
    let mut rest = t;
    while let Some(i) = rest.find('[') {
        match (rest[i..].find("]("), rest[i..].find(')')) {
            (Some(a), Some(b)) if a < b => {
                out.push_str(&rest[..i]);
                out.push_str(&rest[i + 1..i + a]);
                rest = &rest[i + b + 1..];
            }
            _ => {
                out.push_str(&rest[..=i]);
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    // **strong** in bold too (its markers are not code's).
    let out = out
        .split("**")
        .enumerate()
        .map(|(i, part)| match i {
            0 => part.to_string(),
            i if i % 2 == 1 => format!("\u{1}{part}"),
            _ => format!("\u{2}{part}"),
        })
        .collect::<String>();
    let mut bold = false;
    let mut text = String::new();
    for (i, part) in roff_escape(&out).split('`').enumerate() {
        if i > 0 {
            bold = !bold;
            text.push_str(if bold { "\\fB" } else { "\\fR" });
        }
        text.push_str(part);
    }
    text.replace('\u{1}', "\\fB").replace('\u{2}', "\\fR") + if bold { "\\fR" } else { "" }
}

/// `roles.toml(5)` from docs/policy.md: `##` headings become sections,
/// `###` subsections, code blocks and tables stay as written, list items
/// are indented paragraphs.
pub fn roles_toml_page(md: &str) -> String {
    let mut out = format!(
        ".TH roles.toml 5 \"\" \"segbpf {}\" \"segbpf manual\"\n.SH NAME\nroles.toml \\- segbpf policy file\n.SH DESCRIPTION\n",
        env!("CARGO_PKG_VERSION")
    );
    let mut code = false;
    for line in md.lines() {
        if line.starts_with("```") {
            out.push_str(if code { ".fi\n.RE\n" } else { ".RS 2\n.nf\n" });
            code = !code;
            continue;
        }
        if code || line.starts_with('|') {
            if line.starts_with("|---") || line.starts_with("| ---") {
                continue;
            }
            let text = if code {
                roff_escape(line)
            } else {
                inline(line)
            };
            if code {
                out.push_str(&text);
                out.push('\n');
            } else {
                let _ = write!(out, ".nf\n{text}\n.fi\n");
            }
            continue;
        }
        if let Some(h) = line.strip_prefix("### ") {
            let _ = writeln!(out, ".SS {}", inline(h));
        } else if let Some(h) = line.strip_prefix("## ") {
            let _ = writeln!(out, ".SH {}", inline(&h.replace('`', "")).to_uppercase());
        } else if line.starts_with("# ") {
            // The title: the page's NAME says it.
        } else if let Some(item) = line.strip_prefix("* ").or_else(|| line.strip_prefix("- ")) {
            let _ = write!(out, ".IP \\(bu 2\n{}\n", inline(item));
        } else if line.trim().is_empty() {
            out.push_str(".PP\n");
        } else {
            out.push_str(&inline(line.trim_start()));
            out.push('\n');
        }
    }
    let extra = extra_sections("roles.toml");
    // Its own SEE ALSO, not the commands' (which name this page).
    let extra = extra.split(".SH SEE ALSO").next().unwrap_or_default();
    out.push_str(extra);
    out.push_str(".SH SEE ALSO\nsegbpf(8), segbpf\\-check(8), segbpf\\-attach(8)\n");
    out
}

/// Examples of a command (by its page name), for EXAMPLES.
fn examples(name: &str) -> &'static [&'static str] {
    match name {
        "segbpf" => &[
            "segbpf check /etc/segbpf/roles.toml",
            "segbpf attach eth0 --policy /etc/segbpf/roles.toml",
            "segbpf status",
            "segbpf explain -p roles.toml --src 10.10.1.20 --dst 10.10.1.30 --proto tcp --dport 5432",
        ],
        "segbpf-check" => &[
            "segbpf check /etc/segbpf/roles.toml",
            "segbpf check roles.toml --role web --deny-warnings",
            "segbpf check roles.toml -o json",
        ],
        "segbpf-attach" => &[
            "segbpf attach eth0 --policy /etc/segbpf/roles.toml",
            "segbpf attach eth0 --policy roles.toml --role web --audit",
            "segbpf attach eth0 --etcd https://etcd1:2379",
        ],
        "segbpf-reload" => &[
            "segbpf reload eth0",
            "segbpf reload eth0 --policy new.toml --confirm 60",
        ],
        "segbpf-set" => &[
            "segbpf set add eth0 admin_net 10.10.0.77",
            "segbpf set del eth0 admin_net 10.10.0.77",
            "segbpf set list eth0 -o json",
        ],
        "segbpf-set-add" => &[
            "segbpf set add eth0 admin_net 10.10.0.77",
            "segbpf set add eth0 admin_net 10.10.2.0/24 --confirm 60",
        ],
        "segbpf-set-del" => &[
            "segbpf set del eth0 admin_net 10.10.0.77",
            "segbpf set del eth0 admin_net 10.10.2.0/24 -o json",
        ],
        "segbpf-set-list" => &[
            "segbpf set list eth0",
            "segbpf set list eth0 admin_net -o json",
        ],
        "segbpf-confirm" => &[
            "segbpf confirm eth0",
            "segbpf reload eth0 --policy new.toml --confirm 60 && segbpf confirm eth0",
        ],
        "segbpf-rollback" => &["segbpf rollback eth0", "segbpf rollback eth0 --to 3"],
        "segbpf-history" => &["segbpf history eth0", "segbpf history eth0 -o json"],
        "segbpf-diff" => &["segbpf diff eth0 3 4", "segbpf diff eth0 new.toml"],
        "segbpf-detach" => &["segbpf detach eth0"],
        "segbpf-monitor" => &[
            "segbpf monitor eth0",
            "segbpf monitor eth0 -o json --peer 203.0.113.0/24 --port 22",
        ],
        "segbpf-flows" => &[
            "segbpf flows eth0",
            "segbpf flows eth0 --follow -o json --rule web-in",
            "segbpf flows eth0 --port 443 --verdict allow",
        ],
        "segbpf-suggest" => &[
            "segbpf suggest eth0 > suggested.toml",
            "segbpf suggest eth0 --since 2h",
        ],
        "segbpf-status" => &[
            "segbpf status",
            "segbpf status eth0 -o json",
            "segbpf status --all-netns",
        ],
        "segbpf-fleet" | "segbpf-fleet-push" => &[
            "segbpf fleet push roles.toml --etcd https://etcd1:2379 --dry-run",
            "segbpf fleet push roles.toml --canary 2 --wait 60",
        ],
        "segbpf-fleet-status" => &["segbpf fleet status --etcd https://etcd1:2379"],
        "segbpf-fleet-history" => &["segbpf fleet history"],
        "segbpf-fleet-diff" => &["segbpf fleet diff", "segbpf fleet diff 4 6"],
        "segbpf-fleet-rollback" => &[
            "segbpf fleet rollback",
            "segbpf fleet rollback --to 4 --confirm 60",
        ],
        "segbpf-explain" => &[
            "segbpf explain -p roles.toml --src 10.10.1.20 --dst 10.10.1.30 --proto tcp --dport 5432",
            "segbpf explain roles.toml --src 10.10.0.5 --dst 10.10.1.30 --proto icmp --icmp-type 8 -o json",
        ],
        "segbpf-export" | "segbpf-export-nft" => &[
            "segbpf export nft -p /etc/segbpf/roles.toml --role web > web.nft",
            "segbpf export nft -p roles.toml --role db -o json",
        ],
        "segbpf-trace" => &[
            "segbpf trace eth0 --src 10.10.1.20 --dst 10.10.1.30 --proto tcp --dport 5432",
            "segbpf trace eth0 --src 10.10.1.20 --dst 10.10.1.30 --proto tcp --dport 5432 --tcp-flags SA -o json",
        ],
        "segbpf-import" => &[
            "segbpf import nft --host web=web.nft --host db=db.nft --verify > roles.toml",
            "segbpf import iptables --host web=web.rules --hosts web=10.10.1.10-10.10.1.19",
        ],
        "segbpf-import-nft" => &[
            "segbpf import nft --host web=web.nft --host db=db.nft --verify > roles.toml",
            "segbpf import nft --host web=/dev/stdin --strict -o json",
        ],
        "segbpf-import-iptables" => &[
            "segbpf import iptables --host web=web.rules --hosts web=10.10.1.10-10.10.1.19",
            "segbpf import iptables --host web=/dev/stdin --verify",
        ],
        "segbpf-completions" => &[
            "segbpf completions bash > /etc/bash_completion.d/segbpf",
            "segbpf completions zsh > /usr/local/share/zsh/site-functions/_segbpf",
        ],
        "roles.toml" => &[
            "segbpf check /etc/segbpf/roles.toml",
            "segbpf explain -p /etc/segbpf/roles.toml --src 10.10.1.20 --dst 10.10.1.30 --proto tcp --dport 5432",
            "segbpf attach eth0 --policy /etc/segbpf/roles.toml",
        ],
        _ => &[],
    }
}

/// FILES: where segbpf keeps what.
const FILES: &[(&str, &str)] = &[
    (
        "/etc/segbpf/roles.toml",
        "the policy file (roles.toml(5)); attach and reload read it",
    ),
    (
        "/sys/fs/bpf/segbpf/net/NETNS/IFACE/",
        "pinned programs, maps and links of an attachment ($SEGBPF_BPFFS)",
    ),
    (
        "/run/segbpf/net/NETNS/IFACE.json",
        "an attachment's state: policy, generation, roles ($SEGBPF_STATE_DIR)",
    ),
    (
        "/run/segbpf/net/NETNS/IFACE.observed/",
        "the observed store of denied traffic, for suggest",
    ),
    (
        "/var/lib/segbpf/history/",
        "the policy history that history, diff and rollback read ($SEGBPF_HISTORY_DIR)",
    ),
];

/// ENVIRONMENT: the variables segbpf reads.
const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "SEGBPF_NETNS",
        "the network namespace to run in (as --netns)",
    ),
    (
        "SEGBPF_BPFFS",
        "the pin root on a bpffs (default /sys/fs/bpf/segbpf)",
    ),
    ("SEGBPF_STATE_DIR", "the state root (default /run/segbpf)"),
    ("SEGBPF_HISTORY_DIR", "where the policy history is kept"),
    (
        "SEGBPF_HISTORY",
        "how many generations the history keeps per attachment (default 10)",
    ),
    (
        "SEGBPF_FOLLOW_LOG_MAX",
        "the size in bytes past which the services follower's log is rotated to .1 (default 1 MiB)",
    ),
    (
        "SEGBPF_OBSERVED_MAX_BYTES",
        "the cap of the observed store (default 64M)",
    ),
    (
        "SEGBPF_ETCD",
        "the etcd endpoints of fleet mode (as --etcd)",
    ),
    (
        "SSH_CONNECTION",
        "the SSH session a change must not cut (the lockout check)",
    ),
    ("RUST_LOG", "log filter on stderr (overrides -v)"),
];

/// EXAMPLES, FILES and ENVIRONMENT of the page `name`, in roff.
fn extra_sections(name: &str) -> String {
    let mut out = String::from(".SH EXAMPLES\n");
    let ex = examples(name);
    if ex.is_empty() {
        let cmd = name.replace('-', " ");
        let _ = write!(out, ".nf\n{} \\-\\-help\n.fi\n", roff_escape(&cmd));
    }
    for e in ex {
        let _ = write!(out, ".PP\n.nf\n{}\n.fi\n", roff_escape(e));
    }
    out.push_str(".SH FILES\n");
    for (f, what) in FILES {
        let _ = write!(
            out,
            ".TP\n\\fI{}\\fR\n{}\n",
            roff_escape(f),
            roff_escape(what)
        );
    }
    out.push_str(".SH ENVIRONMENT\n");
    for (v, what) in ENVIRONMENT {
        let _ = write!(
            out,
            ".TP\n\\fB{}\\fR\n{}\n",
            roff_escape(v),
            roff_escape(what)
        );
    }
    out.push_str(".SH SEE ALSO\nroles.toml(5), segbpf(8)\n");
    out
}

/// Every page: the command's, then one per visible subcommand, nested
/// ones included, and roles.toml(5). Hidden commands (internal ones) get
/// none.
pub fn pages() -> std::io::Result<Vec<Page>> {
    fn walk(cmd: clap::Command, out: &mut Vec<Page>) -> std::io::Result<()> {
        let man = clap_mangen::Man::new(cmd.clone())
            .section(SECTION)
            .source(concat!("segbpf ", env!("CARGO_PKG_VERSION")))
            .manual("segbpf manual");
        let mut text = Vec::new();
        man.render_title(&mut text)?;
        man.render_name_section(&mut text)?;
        man.render_synopsis_section(&mut text)?;
        man.render_description_section(&mut text)?;
        man.render_options_section(&mut text)?;
        if cmd.has_subcommands() {
            man.render_subcommands_section(&mut text)?;
        }
        if cmd.get_after_help().is_some() || cmd.get_after_long_help().is_some() {
            man.render_extra_section(&mut text)?;
        }
        // The page's name (`segbpf-set-add`), not the command's (`add`).
        let page = man.get_filename();
        let page = page.strip_suffix(&format!(".{SECTION}")).unwrap_or(&page);
        text.extend_from_slice(extra_sections(page).as_bytes());
        if cmd.get_version().is_some() {
            man.render_version_section(&mut text)?;
        }
        out.push(Page {
            name: man.get_filename(),
            text,
        });
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub.clone(), out)?;
        }
        Ok(())
    }
    // Building names the subcommands `segbpf-attach`, `segbpf-set-add`.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    walk(cmd, &mut out)?;
    out.push(Page {
        name: "roles.toml.5".into(),
        text: roles_toml_page(POLICY_MD).into_bytes(),
    });
    Ok(out)
}

/// Runs `segbpf man`.
pub fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let pages = pages().context("rendering the manual pages")?;
    for page in &pages {
        let path = args.dir.join(&page.name);
        std::fs::write(&path, &page.text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{} pages in {}", pages.len(), args.dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_per_visible_command_in_section_8() {
        let pages = pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|p| p.name.as_str()).collect();
        for want in [
            "segbpf.8",
            "segbpf-attach.8",
            "segbpf-reload.8",
            "segbpf-detach.8",
            "segbpf-set-add.8",
            "segbpf-completions.8",
        ] {
            assert!(names.contains(&want), "no {want} in {names:?}");
        }
        for hidden in ["segbpf-guard.8", "segbpf-man.8", "segbpf-help.8"] {
            assert!(!names.contains(&hidden), "{hidden} in {names:?}");
        }
        let attach = pages.iter().find(|p| p.name == "segbpf-attach.8").unwrap();
        let text = String::from_utf8_lossy(&attach.text);
        assert!(text.contains(".TH segbpf-attach 8 "), "{text}");
        assert!(text.contains("policy"), "{text}");
    }

    #[test]
    fn every_page_has_examples_files_and_environment() {
        for page in pages().unwrap() {
            if page.name.ends_with(".5") {
                continue;
            }
            let text = String::from_utf8_lossy(&page.text);
            for section in [".SH EXAMPLES", ".SH FILES", ".SH ENVIRONMENT"] {
                assert!(text.contains(section), "{}: no {section}", page.name);
            }
            assert!(text.contains("SEGBPF_STATE_DIR"), "{}", page.name);
            // Real examples of the command on the page, not a --help
            // placeholder: each a segbpf command line that parses.
            let name = page.name.trim_end_matches(".8");
            assert!(!examples(name).is_empty(), "{}: no example", page.name);
            let section = text
                .split(".SH EXAMPLES\n")
                .nth(1)
                .and_then(|t| t.split(".SH FILES").next())
                .unwrap_or_default();
            let lines: Vec<&str> = section.lines().filter(|l| !l.starts_with('.')).collect();
            assert!(!lines.is_empty(), "{}: empty EXAMPLES", page.name);
            for l in &lines {
                assert!(l.starts_with("segbpf "), "{}: example {l}", page.name);
                assert!(!l.contains("\\-\\-help"), "{}: placeholder {l}", page.name);
            }
            // The page's own command is among them.
            let words = name.replace('-', " ");
            assert!(
                lines.iter().any(|l| l.replace("\\-", "-").contains(&words)),
                "{}: no example of `{words}`: {lines:?}",
                page.name
            );
        }
    }

    #[test]
    fn every_example_is_a_command_line_that_parses() {
        use clap::Parser as _;
        let names: Vec<String> = pages()
            .unwrap()
            .into_iter()
            .map(|p| {
                p.name
                    .trim_end_matches(".8")
                    .trim_end_matches(".5")
                    .to_string()
            })
            .collect();
        for name in names {
            for e in examples(&name) {
                assert!(e.starts_with("segbpf "), "{name}: {e}");
                for part in e.split("&&") {
                    let words: Vec<&str> = part
                        .split_whitespace()
                        .take_while(|w| *w != ">" && *w != "|")
                        .collect();
                    if let Err(err) = Cli::try_parse_from(&words) {
                        panic!("{name}: `{e}` does not parse: {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn roles_toml_5_is_generated_from_docs_policy_md() {
        let pages = pages().unwrap();
        let page = pages
            .iter()
            .find(|p| p.name == "roles.toml.5")
            .expect("roles.toml.5");
        let text = String::from_utf8_lossy(&page.text);
        assert!(text.starts_with(".TH roles.toml 5 "), "{text}");
        // Every section and subsection of docs/policy.md is in it.
        for line in POLICY_MD.lines() {
            if let Some(h) = line.strip_prefix("## ") {
                let want = format!(".SH {}", inline(&h.replace('`', "")).to_uppercase());
                assert!(text.contains(&want), "no {want}");
            } else if let Some(h) = line.strip_prefix("### ") {
                assert!(text.contains(&format!(".SS {}", inline(h))), "no {h}");
            }
        }
        assert!(text.contains("ingress = \\(dqdrop\\(dq") || text.contains("ingress = \"drop\""));
        for section in [".SH EXAMPLES", ".SH FILES", ".SH ENVIRONMENT"] {
            assert!(text.contains(section), "roles.toml.5: no {section}");
        }
        assert!(
            text.contains("segbpf check /etc/segbpf/roles.toml"),
            "{text}"
        );
        // No line starts a request by accident.
        for l in text.lines() {
            assert!(!l.starts_with('\''), "{l}");
        }
    }
}
