//! Private scratch network namespaces for reading and testing rulesets:
//! created with `ip netns add`, used through `ip netns exec`, deleted when
//! the guard is dropped (also on errors and panics).

use std::{
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use super::ImportError;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace that exists while this value lives.
#[derive(Debug)]
pub struct ScratchNs {
    name: String,
}

impl ScratchNs {
    /// Creates a fresh namespace (`segbpf-imp-PID-N`) with loopback up.
    pub fn new(tag: &str) -> Result<Self, ImportError> {
        let name = format!(
            "segbpf-imp{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(
            Command::new("ip").args(["netns", "add", &name]),
            "ip netns add",
        )?;
        let ns = ScratchNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (under /run/netns).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Result<String, ImportError> {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args);
        run_ok(&mut c, &format!("ip {}", args.join(" ")))
    }

    /// A command that runs inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` inside, stdin empty.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, ImportError> {
        let mut c = self.command(program);
        c.args(args).stdin(Stdio::null());
        c.output()
            .map_err(|e| ImportError::Scratch(format!("running {program}: {e}")))
    }

    /// Runs `program args` inside with `input` on its stdin (the bytes read
    /// once from the user's file: a pipe cannot be read twice).
    pub fn exec_input(
        &self,
        program: &str,
        args: &[&str],
        input: &[u8],
    ) -> Result<Output, ImportError> {
        use std::io::Write as _;
        let mut c = self.command(program);
        c.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .map_err(|e| ImportError::Scratch(format!("running {program}: {e}")))?;
        let writer = child.stdin.take().map(|mut stdin| {
            let input = input.to_vec();
            // A thread: the tool may print more than a pipe holds before it
            // has read all its input.
            std::thread::spawn(move || stdin.write_all(&input))
        });
        let out = child
            .wait_with_output()
            .map_err(|e| ImportError::Scratch(format!("running {program}: {e}")))?;
        if let Some(w) = writer {
            // A tool that stops reading early (an error) breaks the pipe:
            // its exit status and messages say why.
            let _ = w.join();
        }
        Ok(out)
    }

    /// Loads an nftables ruleset text from a string (`nft -f -`).
    pub fn nft_load_str(&self, text: &str) -> Result<(), ImportError> {
        use std::io::Write as _;
        let mut c = self.command("nft");
        c.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .map_err(|e| ImportError::Scratch(format!("running nft: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(text.as_bytes())
                .map_err(|e| ImportError::Scratch(format!("writing to nft: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| ImportError::Scratch(format!("running nft: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ImportError::Scratch(format!(
                "nft -f refused:\n{}\n{text}",
                String::from_utf8_lossy(&out.stderr).trim_end()
            )))
        }
    }

    /// `nft -j list ruleset` inside, parsed.
    pub fn nft_json(&self) -> Result<serde_json::Value, ImportError> {
        let out = self.exec("nft", &["-j", "list", "ruleset"])?;
        if !out.status.success() {
            return Err(ImportError::Scratch(format!(
                "nft -j list ruleset: {}",
                String::from_utf8_lossy(&out.stderr).trim_end()
            )));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| ImportError::Scratch(format!("nft -j list ruleset printed bad JSON: {e}")))
    }
}

impl Drop for ScratchNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs a command that must succeed; its stdout.
pub fn run_ok(c: &mut Command, what: &str) -> Result<String, ImportError> {
    let out = c
        .output()
        .map_err(|e| ImportError::Scratch(format!("{what}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ImportError::Scratch(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        )))
    }
}
