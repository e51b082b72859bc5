//! The service manager: sd_notify messages and socket activation.
//!
//! This is the crate's one module with `unsafe`: a descriptor inherited
//! from systemd arrives as a bare integer, and only `from_raw_fd` turns it
//! into an owned socket.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd (if `NOTIFY_SOCKET` is set) the service is ready.
pub fn ready() {
    send(&[NotifyState::Ready], "READY=1");
}

/// What the exit may take past the drain: closing what is left and
/// writing the queued log lines (at most 2 s).
const EXIT_MARGIN: Duration = Duration::from_secs(5);

/// STOPPING=1, with EXTEND_TIMEOUT_USEC for `drain` and the exit after it,
/// so that a `shutdown.drain_timeout` longer than the unit's
/// `TimeoutStopSec=` is waited for, not cut short by SIGKILL. systemd only
/// ever lengthens its timeout with it (since v236; older ones ignore it).
pub fn stopping(drain: Duration) {
    let usec = u32::try_from((drain + EXIT_MARGIN).as_micros()).unwrap_or(u32::MAX);
    send(
        &[NotifyState::Stopping, NotifyState::ExtendTimeoutUsec(usec)],
        "STOPPING=1",
    );
}

/// RELOADING=1 must carry MONOTONIC_USEC since systemd 253, or systemd
/// counts the reload as failed.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now], "RELOADING=1"),
        Err(e) => tracing::debug!(error = %e, "sd_notify: no monotonic clock"),
    }
}

fn send(states: &[NotifyState], what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, message = what, "sd_notify failed");
    }
}

/// Pings the watchdog at half its period for as long as the returned task
/// runs, when the unit sets `WatchdogSec`; with other event loops, only
/// when each of them answers within that half period.
pub fn spawn_watchdog(
    loops: std::sync::Arc<crate::loops::Spread>,
) -> Option<tokio::task::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    let every = (period / 2).max(Duration::from_millis(100));
    tracing::info!(every = ?every, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !loops.current().all_answer(every).await {
                tracing::error!(
                    "an event loop does not answer: the systemd watchdog is not pinged, so systemd restarts the service"
                );
                continue;
            }
            send(&[NotifyState::Watchdog], "WATCHDOG=1");
        }
    }))
}

/// Listening TCP sockets passed by systemd (`LISTEN_FDS`), with the address
/// each is bound to. Descriptors that are not listening TCP sockets are
/// closed and logged.
pub fn inherited_listeners() -> Vec<(SocketAddr, std::net::TcpListener)> {
    let fds = match sd_notify::listen_fds() {
        Ok(fds) => fds,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring LISTEN_FDS");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for fd in fds {
        // SAFETY: listen_fds() yields descriptors only when LISTEN_PID names
        // this process, so systemd handed them to us; nothing else in this
        // process owns them, and each is taken exactly once, here.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let socket = socket2::Socket::from(owned);
        let ok = socket.r#type().ok() == Some(socket2::Type::STREAM)
            && socket.is_listener().unwrap_or(false);
        match (ok, socket.local_addr().ok().and_then(|a| a.as_socket())) {
            (true, Some(addr)) => out.push((addr, socket.into())),
            _ => tracing::warn!(
                fd,
                "inherited descriptor is not a listening tcp socket; closing it"
            ),
        }
    }
    out
}
