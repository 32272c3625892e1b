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

/// Ignore SIGXFSZ from now on (call first thing in `main`, before any file is written):
/// a write past the process's file-size limit (`ulimit -f`) then fails with an error (EFBIG)
/// instead of killing the process. The logs handle it as they handle a full disk: zeros that
/// do not fit are not written ahead, and a record that does not fit fails its write, which is
/// refused, not acknowledged. Ignoring is inherited by the processes this one spawns.
pub fn ignore_file_size_limit_signal() {
    #[cfg(unix)]
    {
        use nix::sys::signal::{signal, SigHandler, Signal};
        // SAFETY: installs no handler (SIG_IGN), so no code runs in signal context; nothing
        // else in this program sets SIGXFSZ's disposition.
        if let Err(e) = unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) } {
            eprintln!("cannot ignore SIGXFSZ ({e}); a file-size limit will stop this process");
        }
    }
}
