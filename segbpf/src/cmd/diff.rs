//! `segbpf diff IFACE [A] [B]`: what changed between two policies of an
//! attachment, each a generation kept in the history or a file; the
//! default for a side left out is the policy in force
//! ([`crate::attachment::timeline`]). Exit status 0 whether or not they differ (as
//! `segbpf history` and `status`, it reports); `--exit-code` gives 1 when
//! they differ, as `git diff --exit-code`.

use serde::Serialize;

use crate::{
    attachment::pins::Attachment,
    attachment::state::State,
    attachment::timeline::{self, Line, Side, Text},
    cmd::{NetnsOut, Output, print_json, print_line},
    host::netns::Netns,
};

/// Arguments of `segbpf diff`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "A side is a generation number (see `segbpf history IFACE`) or a policy file. With one side, it is compared with the policy in force; with none, the policy file the attachment was loaded from is (what a reload would apply).\n\nExamples:\n  segbpf diff eth0                      # the file on disk against what is in force\n  segbpf diff eth0 roles.new.toml       # a candidate against what is in force\n  segbpf diff eth0 3 5                  # generation 3 against generation 5"
)]
pub struct Args {
    /// Interface whose policies to compare.
    pub iface: String,
    /// The first side: a generation or a file (default: the policy file
    /// the attachment was loaded from, compared with the policy in force).
    #[arg(value_name = "FROM")]
    pub from: Option<String>,
    /// The second side (default: the policy in force).
    #[arg(value_name = "TO")]
    pub to: Option<String>,
    /// Exit 1 when the two differ.
    #[arg(long)]
    pub exit_code: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Serialize)]
struct DiffOut {
    iface: String,
    #[serde(flatten)]
    netns: NetnsOut,
    from: Text,
    to: Text,
    /// Whether the texts or the live set edits differ.
    differ: bool,
    /// Only the lines that changed, in order.
    lines: Vec<Line>,
}

/// Runs `segbpf diff`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, ns);
    let (from, to) = match (&args.from, &args.to) {
        (Some(a), Some(b)) => (Side::parse(a), Side::parse(b)),
        // One side: compare it with what is in force; an older generation
        // reads naturally as the "from" side, a file as the "to" side.
        (Some(a), None) => match Side::parse(a) {
            Side::File(f) => (Side::InForce, Side::File(f)),
            g => (g, Side::InForce),
        },
        (None, _) => {
            let state = State::current(&att)?;
            (Side::InForce, Side::File(state.policy.into()))
        }
    };
    let from = timeline::read_side(&att, &from)?;
    let to = timeline::read_side(&att, &to)?;
    let all = timeline::diff_lines(&from.text, &to.text);
    let differ =
        all.iter().any(|l| !matches!(l, Line::Same(_))) || from.set_overrides != to.set_overrides;
    let out = DiffOut {
        iface: att.iface.clone(),
        netns: NetnsOut::of(&att),
        differ,
        lines: all
            .iter()
            .filter(|l| !matches!(l, Line::Same(_)))
            .cloned()
            .collect(),
        from,
        to,
    };
    match args.output {
        Output::Json => print_json(&out)?,
        Output::Text => {
            print_line(format_args!("--- {}", out.from.label))?;
            print_line(format_args!("+++ {}", out.to.label))?;
            print_hunks(&all)?;
            if out.from.set_overrides != out.to.set_overrides {
                print_line(format_args!(
                    "live set edits: {:?} -> {:?}",
                    out.from.set_overrides, out.to.set_overrides
                ))?;
            }
        }
    }
    if args.exit_code && out.differ {
        // Under -o json the diff is the one document: the exit status
        // alone says that they differ (no error document after it).
        return Err(super::JsonReported {
            message: "the policies differ".to_string(),
            usage: false,
        }
        .into());
    }
    Ok(())
}

/// Changed lines with up to 3 lines of context, `@@ line N` before each
/// group (the line in the first text).
pub(crate) fn print_hunks(lines: &[Line]) -> std::io::Result<()> {
    const CONTEXT: usize = 3;
    let changed: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| !matches!(l, Line::Same(_)))
        .map(|(i, _)| i)
        .collect();
    let near = |i: usize| changed.iter().any(|&c| c.abs_diff(i) <= CONTEXT);
    let mut old_line = 0usize;
    let mut last_printed: Option<usize> = None;
    for (i, l) in lines.iter().enumerate() {
        if !matches!(l, Line::Add(_)) {
            old_line += 1;
        }
        if !near(i) {
            continue;
        }
        if last_printed.is_none_or(|p| p + 1 != i) {
            print_line(format_args!("@@ line {old_line}"))?;
        }
        last_printed = Some(i);
        match l {
            Line::Same(t) => print_line(format_args!(" {t}"))?,
            Line::Add(t) => print_line(format_args!("+{t}"))?,
            Line::Del(t) => print_line(format_args!("-{t}"))?,
        }
    }
    Ok(())
}
