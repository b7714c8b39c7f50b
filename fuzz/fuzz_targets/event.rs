//! Fuzz target: the userspace decoder of kernel event records. Any bytes
//! must decode or be rejected, never panic; decoded events must format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segbpf::observe::telemetry::{LogFormat, decode};

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = decode(data, "eth0") {
        let _ = ev.line(LogFormat::Json);
        let _ = ev.line(LogFormat::Text);
    }
});
