//! systemd integration: readiness, status, reload and stop notifications
//! and the watchdog (all no-ops when `NOTIFY_SOCKET` is unset), and socket
//! activation (`LISTEN_FDS`).

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// READY=1 with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new status line (what `systemctl status` shows).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// RELOADING=1 with the monotonic timestamp `Type=notify-reload` expects.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading hosts.d"),
        ]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// STOPPING=1: no new connections, in-flight requests draining.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight requests"),
    ]);
}

/// Pings the watchdog at half the interval systemd asks for, from the async
/// runtime itself: if the runtime stalls, the pings stop and systemd
/// restarts the daemon.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let period = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(?interval, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}

/// The listening socket systemd passed, if the daemon was socket-activated.
pub fn activated_listener() -> std::io::Result<Option<std::net::TcpListener>> {
    let mut fds = sd_notify::listen_fds()?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    if fds.len() > 0 {
        tracing::warn!("more than one socket passed by systemd; using the first");
    }
    let listener = activation::adopt(fd);
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

#[allow(unsafe_code)]
mod activation {
    use std::os::fd::{FromRawFd, RawFd};

    /// Takes ownership of a socket passed by systemd.
    pub fn adopt(fd: RawFd) -> std::net::TcpListener {
        // SAFETY: `fd` comes from sd_notify::listen_fds(), which returns the
        // descriptors systemd passed to this process (LISTEN_PID matched,
        // starting at SD_LISTEN_FDS_START); nothing else in the process owns
        // or closes them, and each is adopted exactly once, here.
        unsafe { std::net::TcpListener::from_raw_fd(fd) }
    }
}
