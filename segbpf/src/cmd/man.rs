//! `segbpf man DIR` (hidden): write the manual pages, `segbpf.8` and one
//! per subcommand (`segbpf-attach.8`, `segbpf-set-add.8`, ...), into DIR
//! (clap_mangen). The package build runs it on the release binary and
//! installs the pages, gzip'd, under `/usr/share/man/man8/`. Section 8:
//! segbpf is an administrator's command.

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

/// Every page: the command's, then one per visible subcommand, nested
/// ones included. Hidden commands (internal ones) get none.
pub fn pages() -> std::io::Result<Vec<Page>> {
    fn walk(cmd: clap::Command, out: &mut Vec<Page>) -> std::io::Result<()> {
        let man = clap_mangen::Man::new(cmd.clone())
            .section(SECTION)
            .source(concat!("segbpf ", env!("CARGO_PKG_VERSION")))
            .manual("segbpf manual");
        let mut text = Vec::new();
        man.render(&mut text)?;
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
}
