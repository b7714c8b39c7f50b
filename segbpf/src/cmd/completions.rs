//! `segbpf completions SHELL`: print the shell completion script for
//! `segbpf` (clap_complete) on stdout. The package installs them where
//! each shell looks: bash
//! `/usr/share/bash-completion/completions/segbpf`, zsh
//! `/usr/share/zsh/vendor-completions/_segbpf`, fish
//! `/usr/share/fish/vendor_completions.d/segbpf.fish`. The bash, zsh and
//! fish scripts complete interface, role and set names by asking the
//! hidden `segbpf complete-names` (the interfaces of the namespace the
//! line names with `--netns`, else the current one; the
//! roles of the policy file on the line or /etc/segbpf/roles.toml, the
//! sets in force on the interface on the line), and fall back to clap's
//! completion of subcommands and options.

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

/// The completion script of `segbpf` for `shell`, with the dynamic
/// names ([`names`]).
pub fn script(shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "segbpf", &mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let text = match shell {
        // zsh autoloads the file as `_segbpf`: the names function goes
        // before the dispatch, which then calls it.
        Shell::Zsh => text.replace(
            "if [ \"$funcstack[1]\" = \"_segbpf\" ]; then\n    _segbpf \"$@\"\nelse\n    compdef _segbpf segbpf\nfi",
            &format!(
                "{}\nif [ \"$funcstack[1]\" = \"_segbpf\" ]; then\n    _segbpf_names \"$@\"\nelse\n    compdef _segbpf_names segbpf\nfi",
                dynamic(shell)
            ),
        ),
        s => text + dynamic(s),
    };
    text.into_bytes()
}
/// Arguments of the hidden `segbpf complete-names`: what the shell
/// scripts ask for the word being completed.
#[derive(Debug, clap::Args)]
pub struct NamesArgs {
    /// Index of the word being completed in WORDS (0 is `segbpf`).
    #[arg(long)]
    pub index: usize,
    /// The command line's words, as the shell split them.
    #[arg(last = true)]
    pub words: Vec<String>,
}

/// What the word at `index` of `words` names, if segbpf knows the
/// candidates: `Iface` (an interface), `Set(IFACE)` (a set in force on
/// it), `Role(POLICY)` (a role of the policy file).
#[derive(Debug, PartialEq, Eq)]
pub enum Want {
    /// An interface name.
    Iface,
    /// A set of the interface's policy in force.
    Set(String),
    /// A role of the policy file (None: the default file).
    Role(Option<String>),
}

/// Works out what the word at `index` is, from the command's arguments:
/// subcommands are followed, options that take a value skip it, and the
/// positional's argument id tells (`iface`, `set`).
pub fn wanted(words: &[String], index: usize) -> Option<Want> {
    let cur = words.get(index).map_or("", String::as_str);
    let prev = index.checked_sub(1).and_then(|i| words.get(i))?;
    let before = &words[1.min(words.len())..index.min(words.len())];
    let value_of = |long: &str, short: &str| {
        before
            .windows(2)
            .find(|w| w[0] == long || w[0] == short)
            .map(|w| w[1].clone())
    };
    if prev == "--role" {
        let policy = value_of("--policy", "-p").or_else(|| {
            before
                .iter()
                .find(|w| {
                    std::path::Path::new(w)
                        .extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
                })
                .cloned()
        });
        return Some(Want::Role(policy));
    }
    if cur.starts_with('-') {
        return None;
    }
    let mut cmd = Cli::command();
    cmd.build();
    let mut positionals: Vec<String> = Vec::new();
    let mut skip = false;
    for w in before {
        if skip {
            skip = false;
            continue;
        }
        if let Some(sub) = cmd.find_subcommand(w).cloned()
            && positionals.is_empty()
        {
            cmd = sub;
            continue;
        }
        if let Some(opt) = w.strip_prefix("--") {
            let takes = !opt.contains('=')
                && cmd
                    .get_arguments()
                    .find(|a| a.get_long() == Some(opt))
                    .is_some_and(|a| a.get_action().takes_values());
            skip = takes;
            continue;
        }
        if let Some(short) = w.strip_prefix('-') {
            let takes = short.len() == 1
                && cmd
                    .get_arguments()
                    .find(|a| a.get_short().map(|c| c.to_string()).as_deref() == Some(short))
                    .is_some_and(|a| a.get_action().takes_values());
            skip = takes;
            continue;
        }
        positionals.push(w.clone());
    }
    let arg = cmd.get_positionals().nth(positionals.len())?;
    match arg.get_id().as_str() {
        "iface" => Some(Want::Iface),
        "set" => positionals.first().map(|i| Want::Set(i.clone())),
        _ => None,
    }
}

/// The candidates for `want` (none when they cannot be read: the shell
/// then completes as clap's script does).
fn candidates(want: &Want, ns: &crate::host::netns::Netns) -> Vec<String> {
    match want {
        Want::Iface => {
            // The namespace this thread is in (/sys/class/net would show
            // the one sysfs was mounted in, whatever --netns says).
            let mut names = std::fs::read_to_string("/proc/thread-self/net/dev")
                .map(|t| proc_net_dev_names(&t))
                .unwrap_or_default();
            names.sort();
            names
        }
        Want::Set(iface) => {
            let att = crate::attachment::pins::Attachment::new(iface, ns);
            crate::attachment::state::State::current(&att)
                .ok()
                .and_then(|s| crate::attachment::swap::sets_in_force(&s).ok())
                .map(|sets| sets.into_keys().collect())
                .unwrap_or_default()
        }
        Want::Role(policy) => {
            let path = policy
                .clone()
                .unwrap_or_else(|| "/etc/segbpf/roles.toml".to_string());
            crate::policy::Policy::load(std::path::Path::new(&path))
                .map(|p| p.roles.iter().map(|r| r.name.clone()).collect())
                .unwrap_or_default()
        }
    }
}

/// The interface names of a `/proc/net/dev` table.
fn proc_net_dev_names(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The `--netns NAME` (or `--netns=NAME`) of the command line being
/// completed, the word being completed left out.
pub fn netns_of(words: &[String], index: usize) -> Option<String> {
    let mut found = None;
    let mut it = words
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(i, _)| *i != index)
        .map(|(_, w)| w);
    while let Some(w) = it.next() {
        if w == "--netns" {
            found = it.next().cloned();
        } else if let Some(v) = w.strip_prefix("--netns=") {
            found = Some(v.to_string());
        }
    }
    found.filter(|n| !n.is_empty())
}

/// Runs `segbpf complete-names`: the candidates, one a line, from the
/// network namespace the completed command would run in (its `--netns`,
/// else the one `segbpf --netns`/`SEGBPF_NETNS` entered, else this one).
pub fn names(args: NamesArgs) -> anyhow::Result<()> {
    let Some(want) = wanted(&args.words, args.index) else {
        return Ok(());
    };
    if let Some(name) = netns_of(&args.words, args.index)
        && crate::host::netns::enter(&name).is_err()
    {
        // No such namespace: nothing to offer (never this namespace's).
        return Ok(());
    }
    let ns = crate::host::netns::Netns::current()?;
    for c in candidates(&want, &ns) {
        crate::cmd::print_line(c)?;
    }
    Ok(())
}

/// The shell code that asks `segbpf complete-names` first and falls back
/// to clap's completion.
fn dynamic(shell: Shell) -> &'static str {
    match shell {
        Shell::Bash => {
            r#"
# Interface, role and set names from segbpf itself (complete-names).
_segbpf_names() {
    local names
    names=$(segbpf complete-names --index "$COMP_CWORD" -- "${COMP_WORDS[@]}" 2>/dev/null)
    if [[ -n "$names" ]]; then
        COMPREPLY=( $(compgen -W "$names" -- "${COMP_WORDS[COMP_CWORD]}") )
        return 0
    fi
    _segbpf "$@"
}
complete -F _segbpf_names -o bashdefault -o default segbpf
"#
        }
        Shell::Fish => {
            r#"
# Interface, role and set names from segbpf itself (complete-names).
function __segbpf_names
    set -l words (commandline -opc) (commandline -ct)
    segbpf complete-names --index (math (count $words) - 1) -- $words 2>/dev/null
end
complete -c segbpf -f -n 'test -n "$(__segbpf_names)"' -a '(__segbpf_names)'
"#
        }
        Shell::Zsh => {
            r#"
# Interface, role and set names from segbpf itself (complete-names).
_segbpf_names() {
    local -a names
    names=(${(f)"$(segbpf complete-names --index $((CURRENT - 1)) -- ${words[@]} 2>/dev/null)"})
    if (( ${#names} )); then
        compadd -a names
    else
        _segbpf "$@"
    fi
}
"#
        }
        _ => "",
    }
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
            // Names come from segbpf itself.
            assert!(
                text.contains("segbpf complete-names --index") && text.contains("_segbpf_names")
                    || shell == Shell::Fish && text.contains("__segbpf_names"),
                "{shell}: no dynamic names"
            );
        }
        let zsh = String::from_utf8(script(Shell::Zsh)).unwrap();
        assert!(
            zsh.contains("compdef _segbpf_names segbpf"),
            "zsh wrapper not wired"
        );
    }

    fn words(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn the_word_being_completed_is_known_from_the_command_line() {
        let w = |line: &str| {
            let ws = words(line);
            wanted(&ws, ws.len() - 1)
        };
        assert_eq!(w("segbpf status "), Some(Want::Iface));
        assert_eq!(w("segbpf --netns blue reload e"), Some(Want::Iface));
        assert_eq!(
            w("segbpf attach eth0 --policy roles.toml --role "),
            Some(Want::Role(Some("roles.toml".into())))
        );
        assert_eq!(
            w("segbpf check x.toml --role w"),
            Some(Want::Role(Some("x.toml".into())))
        );
        assert_eq!(w("segbpf explain --role "), Some(Want::Role(None)));
        assert_eq!(w("segbpf set add eth0 "), Some(Want::Set("eth0".into())));
        assert_eq!(
            w("segbpf set list eth1 adm"),
            Some(Want::Set("eth1".into()))
        );
        assert_eq!(w("segbpf set add "), Some(Want::Iface));
        // An option's value is not a positional; options are clap's.
        assert_eq!(w("segbpf flows -o json "), Some(Want::Iface));
        assert_eq!(w("segbpf status --"), None);
        assert_eq!(w("segbpf set add eth0 admins "), None);
        assert_eq!(w("segbpf check "), None);
        assert_eq!(w("segbpf "), None);
    }

    #[test]
    fn the_netns_of_the_completed_line_is_found() {
        let n = |line: &str| {
            let ws = words(line);
            netns_of(&ws, ws.len() - 1)
        };
        assert_eq!(n("segbpf --netns blue status "), Some("blue".into()));
        assert_eq!(n("segbpf status --netns=red "), Some("red".into()));
        assert_eq!(n("segbpf set add eth0 --netns blue "), Some("blue".into()));
        assert_eq!(n("segbpf status "), None);
        // The word being completed is not a value yet.
        assert_eq!(n("segbpf --netns bl"), None);
    }

    #[test]
    fn proc_net_dev_lists_the_interfaces() {
        let t = "Inter-|   Receive\n face |bytes\n    lo: 1 2 3\n  eth0: 4 5 6\n";
        assert_eq!(proc_net_dev_names(t), vec!["lo", "eth0"]);
    }
}
