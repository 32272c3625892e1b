//! Turning SIGTERM and ctrl-c into a graceful-shutdown token, and keeping SIGHUP and SIGXFSZ
//! from stopping a server.

use tokio_util::sync::CancellationToken;

/// Cancel `token` on the first SIGTERM or SIGINT.
pub async fn cancel_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received; shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    token.cancel();
}

/// From now on, log each SIGHUP and otherwise ignore it (call inside a runtime).
///
/// A storage node outlives its coordinator by design, but the kernel sends SIGHUP (and then
/// SIGCONT) to every process of a group that is orphaned with a member stopped: a spawned
/// node, which has a process group of its own, would die of it if it was paused when its
/// coordinator died. A node started from a terminal keeps running when the terminal closes,
/// as a server should; it stops on SIGTERM or SIGINT.
pub fn ignore_hangups() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hangups) => {
                tokio::spawn(async move {
                    while hangups.recv().await.is_some() {
                        tracing::info!("SIGHUP received and ignored (SIGTERM stops this process)");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; it will stop this process")
            }
        }
    }
}

/// From now on, a write past the process's file-size limit (`ulimit -f`) fails with an error
/// (EFBIG) instead of killing the process with SIGXFSZ (call inside a runtime). The logs then
/// handle it as they handle a full disk: a log that writes zeros ahead falls back to plain
/// appends, and a record that does not fit fails its write, which is refused, not lost.
pub fn survive_file_size_limit() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let xfsz = SignalKind::from_raw(nix::sys::signal::Signal::SIGXFSZ as i32);
        match signal(xfsz) {
            Ok(mut signals) => {
                tokio::spawn(async move {
                    while signals.recv().await.is_some() {
                        tracing::warn!("SIGXFSZ received: a write went past the file-size limit");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot catch SIGXFSZ; a file-size limit will stop this process")
            }
        }
    }
}
