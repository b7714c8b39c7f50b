//! `segbpf import nft|iptables`: per-host rulesets -> one roles.toml on
//! stdout, warnings on stderr; `--verify` runs the differential test (see
//! `crate::policy::import`).

use serde::Serialize;

use crate::{
    cmd::{Output, UsageError, print_json, print_line},
    policy::import::{self, Flavor, HostFile, HostsArg},
};

/// Arguments of `segbpf import`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What the files are.
    #[command(subcommand)]
    pub format: Format,
}

/// Input formats.
#[derive(Debug, clap::Subcommand)]
pub enum Format {
    /// nftables files (as `nft -f` reads them, includes and defines too) or
    /// `nft -j list ruleset` JSON.
    Nft(Common),
    /// `iptables-save` or `ip6tables-save` files.
    Iptables(Common),
}

/// The options both formats take.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// A host's ruleset and the role it gets (repeatable; files of the same
    /// role are merged).
    #[arg(long = "host", value_name = "ROLE=FILE", required = true, value_parser = parse_host)]
    pub hosts: Vec<HostFile>,
    /// Which addresses take a role: a set name from the rulesets, or
    /// comma-separated addresses, CIDRs or ranges (repeatable).
    #[arg(long = "hosts", value_name = "ROLE=SET|ADDRESSES", value_parser = parse_hosts)]
    pub hosts_of: Vec<HostsArg>,
    /// Load each original ruleset into a scratch namespace and compare its
    /// verdicts with the imported policy's: new TCP/UDP connections, ICMP
    /// echo requests, and the replies of connections both accept
    /// (established traffic); exit 1 on a difference no warning reported.
    #[arg(long)]
    pub verify: bool,
    /// Warnings are errors (exit 1, nothing on stdout).
    #[arg(long)]
    pub strict: bool,
    /// Output format: the roles.toml text, or one JSON document with the
    /// policy text, the warnings and the verification (nothing on stderr).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The result of `import --output json`.
#[derive(Serialize)]
struct Imported<'a> {
    policy: &'a str,
    warnings: &'a [import::Warning],
    #[serde(skip_serializing_if = "Option::is_none")]
    verify: Option<&'a [import::verify::HostReport]>,
}

fn parse_host(s: &str) -> Result<HostFile, String> {
    HostFile::parse(s).map_err(|e| e.to_string())
}

fn parse_hosts(s: &str) -> Result<HostsArg, String> {
    HostsArg::parse(s).map_err(|e| e.to_string())
}

/// Runs `segbpf import`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let (flavor, c) = match args.format {
        Format::Nft(c) => (Flavor::Nft, c),
        Format::Iptables(c) => (Flavor::Iptables, c),
    };
    let imported = match import::import(flavor, &c.hosts, &c.hosts_of) {
        Err(import::ImportError::Argument(m)) => return Err(UsageError(m).into()),
        other => other?,
    };
    let text_out = c.output == Output::Text;
    if text_out {
        for w in &imported.warnings {
            eprintln!("{w}");
        }
    }
    let mut failed = Vec::new();
    if c.strict && !imported.warnings.is_empty() {
        failed.push(format!("{} warnings and --strict", imported.warnings.len()));
    }
    let reports = if c.verify {
        Some(import::verify::verify(&imported)?)
    } else {
        None
    };
    for r in reports.iter().flatten() {
        let unreported = r
            .differences
            .iter()
            .filter(|d| d.reported.is_none())
            .count();
        if text_out {
            eprintln!(
                "verify {} ({}): {} new connections probed, {} accepted by the original; {} echo requests; {} replies of accepted connections; {} differences ({unreported} not reported by a warning)",
                r.file,
                r.role,
                r.probes,
                r.original_accepts,
                r.echo_probes,
                r.reply_probes,
                r.differences.len()
            );
            for d in &r.differences {
                eprintln!("  difference: {d}");
            }
        }
        if unreported > 0 {
            failed.push(format!(
                "{}: {unreported} differences no warning reported",
                r.file
            ));
        }
    }
    if !failed.is_empty() {
        if !text_out {
            // The details, for the machine, on stderr: stdout stays empty on failure.
            eprintln!(
                "{}",
                serde_json::to_string(&Imported {
                    policy: &imported.text,
                    warnings: &imported.warnings,
                    verify: reports.as_deref(),
                })?
            );
        }
        anyhow::bail!("import failed: {}", failed.join("; "));
    }
    if text_out {
        print_line(imported.text.trim_end())?;
    } else {
        print_json(&Imported {
            policy: &imported.text,
            warnings: &imported.warnings,
            verify: reports.as_deref(),
        })?;
    }
    Ok(())
}
