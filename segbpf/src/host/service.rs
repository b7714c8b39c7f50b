//! Telling the service manager what `attach` is doing (systemd
//! `Type=notify`): `READY=1` only once the policy is in force,
//! `RELOADING=1` then `READY=1` around a reload, `STOPPING=1` on the way
//! out, each with a `STATUS=` line for `systemctl status`. Outside systemd
//! (`NOTIFY_SOCKET` unset) these do nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// The policy is in force.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts (the monotonic time lets systemd match it to `ExecReload`).
pub fn reloading(why: &str) {
    let status = format!("reloading: {why}");
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status(&status)]),
        Err(_) => send(&[NotifyState::Reloading, NotifyState::Status(&status)]),
    }
}

/// The process is leaving (enforcement stays in the kernel).
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("leaving; enforcement stays in the kernel"),
    ]);
}
