//! `segbpf suggest`: print a roles.toml that allows exactly the connection
//! attempts an interface's policy denied (or, in audit mode, would have
//! denied) ([`crate::observe::suggest`]).

use serde::Serialize;

use crate::{
    attachment::pins::Attachment,
    cmd::{Output, print_json, print_line},
    host::netns::Netns,
    observe::suggest,
};

/// Arguments of `segbpf suggest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose denied traffic to allow.
    pub iface: String,
    /// How far back to look (`90s`, `30m`, `12h`, `1d`; the store keeps 24 hours).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub since: std::time::Duration,
    /// Output format: the policy text, or JSON with the text and a summary.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s}: expected a number and a unit (s, m, h, d)"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s}: unknown unit {unit} (use s, m, h or d)")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Serialize)]
struct Out<'a> {
    iface: &'a str,
    role: &'a str,
    attempts: u64,
    rules: usize,
    peers: usize,
    policy: &'a str,
}

/// Runs `segbpf suggest`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, ns);
    let s = suggest::suggest(&att, args.since)?;
    match args.output {
        Output::Json => print_json(&Out {
            iface: &args.iface,
            role: &s.role,
            attempts: s.attempts,
            rules: s.rules,
            peers: s.peers,
            policy: &s.text,
        })?,
        Output::Text => {
            tracing::info!(
                "{} rule(s) for role {} covering {} denied attempt aggregate(s) from {} peer(s); check with `segbpf check --policy FILE`",
                s.rules,
                s.role,
                s.attempts,
                s.peers
            );
            print_line(s.text.trim_end())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("90s").map(|d| d.as_secs()), Ok(90));
        assert_eq!(parse_duration("2h").map(|d| d.as_secs()), Ok(7200));
        assert_eq!(parse_duration("1d").map(|d| d.as_secs()), Ok(86_400));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5w").is_err());
    }
}
