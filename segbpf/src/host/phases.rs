//! Where the time of one control-plane operation goes: named phases,
//! logged at debug level (`segbpf -v reload ...`) as one line, so the
//! cost of an edit can be split into parse, compile, map writes and state
//! files without a profiler. BENCHMARKS.md quotes these lines.

use std::time::{Duration, Instant};

/// A stopwatch over named phases.
#[derive(Debug)]
pub struct Phases {
    what: &'static str,
    start: Instant,
    last: Instant,
    marks: Vec<(&'static str, Duration)>,
}

impl Phases {
    /// Starts timing `what`.
    pub fn start(what: &'static str) -> Self {
        let now = Instant::now();
        Phases {
            what,
            start: now,
            last: now,
            marks: Vec::new(),
        }
    }

    /// Ends the phase `name` (the time since the previous mark).
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.marks.push((name, now - self.last));
        self.last = now;
    }

    /// The phases so far, as `name=1.23ms ...`, and the total.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        for (name, d) in &self.marks {
            let _ = write!(s, "{name}={:.2}ms ", d.as_secs_f64() * 1e3);
        }
        let _ = write!(s, "total={:.2}ms", self.start.elapsed().as_secs_f64() * 1e3);
        s
    }

    /// Logs the summary at debug level.
    pub fn log(&self) {
        tracing::debug!("{} phases: {}", self.what, self.summary());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_every_phase_in_order() {
        let mut p = Phases::start("x");
        p.mark("a");
        p.mark("b");
        let s = p.summary();
        let a = s.find("a=").unwrap();
        let b = s.find("b=").unwrap();
        assert!(a < b && s.contains("total="), "{s}");
    }
}
