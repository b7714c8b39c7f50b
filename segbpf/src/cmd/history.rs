//! `segbpf history IFACE`: the generations of an attachment's policy that
//! the history keeps, oldest first, with the one in force marked
//! ([`crate::attachment::history`]).

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    attachment::history,
    attachment::pins::Attachment,
    attachment::state::State,
    cmd::{NetnsOut, Output, print_json, print_line},
    host::clock,
    host::netns::Netns,
};

/// Arguments of `segbpf history`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "`segbpf diff IFACE A B` shows what changed between two generations, `segbpf rollback IFACE --to N` restores one.\n\nExamples:\n  segbpf history eth0\n  segbpf history eth0 -o json"
)]
pub struct Args {
    /// Interface whose policy history to list.
    pub iface: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Serialize)]
struct HistoryOut {
    iface: String,
    #[serde(flatten)]
    netns: NetnsOut,
    /// The generation in force (none when nothing is attached).
    #[serde(skip_serializing_if = "Option::is_none")]
    in_force: Option<u64>,
    /// Where the history is kept.
    dir: String,
    generations: Vec<GenerationOut>,
}

#[derive(Serialize)]
struct GenerationOut {
    generation: u64,
    /// The policy file the generation came from.
    source: String,
    /// When it was recorded (RFC 3339, UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    recorded: Option<String>,
    /// The generation whose policy a rollback restored as this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    restored: Option<u64>,
    /// Live set edits in force with it.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    set_overrides: std::collections::BTreeMap<String, Vec<String>>,
    in_force: bool,
}

/// Runs `segbpf history`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, ns);
    let in_force = State::current(&att).ok().map(|s| s.generation);
    let entries = history::list(&att);
    let out = HistoryOut {
        iface: att.iface.clone(),
        netns: NetnsOut::of(&att),
        in_force,
        dir: history::dir_of(&att).display().to_string(),
        generations: entries
            .iter()
            .map(|e| GenerationOut {
                generation: e.generation,
                source: e.source.clone(),
                recorded: e.recorded_at().map(clock::rfc3339),
                restored: e.restored,
                set_overrides: e.set_overrides.clone(),
                in_force: in_force == Some(e.generation),
            })
            .collect(),
    };
    if args.output == Output::Json {
        return print_json(&out);
    }
    if out.generations.is_empty() {
        anyhow::bail!(
            "no policy history for {} (kept in {})",
            att.describe(),
            out.dir
        );
    }
    for g in &out.generations {
        let mut line = format!(
            "{} {:>6}  {}  {}",
            if g.in_force { "*" } else { " " },
            g.generation,
            g.recorded.as_deref().unwrap_or("-"),
            g.source
        );
        if let Some(r) = g.restored {
            let _ = write!(line, "  (rollback to generation {r})");
        }
        if !g.set_overrides.is_empty() {
            let sets: Vec<&str> = g.set_overrides.keys().map(String::as_str).collect();
            let _ = write!(line, "  (live edits of {})", sets.join(", "));
        }
        print_line(line)?;
    }
    Ok(())
}
