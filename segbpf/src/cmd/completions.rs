//! `segbpf completions SHELL`: print the shell completion script for
//! `segbpf` (clap_complete) on stdout. The package installs them where
//! each shell looks: bash
//! `/usr/share/bash-completion/completions/segbpf`, zsh
//! `/usr/share/zsh/vendor-completions/_segbpf`, fish
//! `/usr/share/fish/vendor_completions.d/segbpf.fish`.

use std::io::Write as _;

use anyhow::Context as _;
use clap::CommandFactory as _;
pub use clap_complete::Shell;

use crate::cmd::Cli;

/// Arguments of `segbpf completions`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The completion script of `segbpf` for `shell`.
pub fn script(shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "segbpf", &mut out);
    out
}

/// Runs `segbpf completions`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&script(args.shell))
        .and_then(|()| stdout.flush())
        .context("writing the completion script")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_packaged_shell_completes_subcommands_and_options() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(script(shell)).expect("UTF-8 script");
            for word in ["attach", "reload", "policy", "completions"] {
                assert!(text.contains(word), "{shell}: no {word}");
            }
            // Internal commands are not offered.
            assert!(
                !text.contains("confirmation guard"),
                "{shell}: guard offered"
            );
        }
    }
}
