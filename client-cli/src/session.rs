//! The connection of a shell or script to the coordinator, kept across commands.
//!
//! A [`Session`] holds at most one [`Client`]. A `Client` never reconnects by itself, so
//! before each command [`Session::client`] checks it: a closed one is dropped with a notice
//! ("connection lost"), and a new connection is made; when it succeeds after a loss, another
//! notice says so. Notices are queued, not printed: the owner prints them where its output
//! goes ([`Session::take_notices`]).
//!
//! Clones share the connection and the notices, so the shell's completer and its watcher
//! (which notices a loss while the user is typing, see [`Session::watch`]) see what the
//! command loop sees. The lock is a `std` mutex held only to read or swap the slot, never
//! across an `.await`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ringkv_common::client::{CallError, Client};

use crate::commands;

/// How often the watcher checks the connection, and probes for the coordinator once it is gone.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// A connection to the coordinator that is remade when it breaks.
#[derive(Clone)]
pub struct Session {
    addr: Arc<str>,
    timeout: Duration,
    slot: Arc<Mutex<Slot>>,
}

#[derive(Default)]
struct Slot {
    client: Option<Client>,
    /// A connection was made at some point.
    ever_connected: bool,
    /// The user was told the connection is gone (or could not be made).
    down_announced: bool,
    notices: Vec<String>,
}

impl Session {
    /// A session with the coordinator at `addr`; nothing is connected until it is needed.
    pub fn new(addr: &str, timeout: Duration) -> Self {
        Session {
            addr: Arc::from(addr),
            timeout,
            slot: Arc::new(Mutex::new(Slot::default())),
        }
    }

    /// The coordinator's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How long each request may wait for its answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        // A panic while holding this lock leaves a slot that is still consistent (every
        // update is a single assignment), so a poisoned lock is safe to keep using.
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The open connection, connecting (again) first if there is none.
    ///
    /// # Errors
    /// The connection attempt's error; the next call tries again.
    pub async fn client(&self) -> Result<Client, CallError> {
        if let Some(client) = self.check_connection() {
            return Ok(client);
        }
        match commands::connect(&self.addr, self.timeout).await {
            Ok(client) => {
                self.install(client.clone());
                Ok(client)
            }
            Err(err) => {
                self.lock().down_announced = true;
                Err(err)
            }
        }
    }

    /// The open connection, if there is one; a closed one is dropped with a notice.
    pub fn check_connection(&self) -> Option<Client> {
        let mut slot = self.lock();
        match &slot.client {
            Some(client) if !client.is_closed() => Some(client.clone()),
            Some(_) => {
                slot.client = None;
                if !slot.down_announced {
                    slot.down_announced = true;
                    let notice = format!(
                        "connection to the coordinator at {} lost; the next command reconnects",
                        self.addr
                    );
                    slot.notices.push(notice);
                }
                None
            }
            None => None,
        }
    }

    /// Make `client` the session's connection, with a notice if the connection had been lost.
    fn install(&self, client: Client) {
        let mut slot = self.lock();
        if slot.down_announced {
            let verb = if slot.ever_connected {
                "reconnected"
            } else {
                "connected"
            };
            let notice = format!("{verb} to the coordinator at {}", self.addr);
            slot.notices.push(notice);
        }
        slot.client = Some(client);
        slot.ever_connected = true;
        slot.down_announced = false;
    }

    /// Whether a connection is open right now (for the shell's prompt).
    pub fn is_connected(&self) -> bool {
        self.check_connection().is_some()
    }

    /// The notices queued since the last call, oldest first.
    pub fn take_notices(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().notices)
    }

    /// Watch the connection until the returned task is aborted: call `notify` with each notice
    /// as soon as it happens: when the connection drops and, by probing every
    /// [`WATCH_INTERVAL`], when the coordinator answers again (the probe's connection is kept).
    pub fn watch(
        &self,
        mut notify: impl FnMut(String) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let session = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(WATCH_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let connected = session.check_connection().is_some();
                // Probe only after a loss the user was told about: a shell that never managed
                // to connect reports that when a command is typed.
                let lost = {
                    let slot = session.lock();
                    slot.down_announced && slot.ever_connected
                };
                if !connected && lost {
                    if let Ok(client) = commands::connect(&session.addr, session.timeout).await {
                        session.install(client);
                    }
                }
                for notice in session.take_notices() {
                    notify(notice);
                }
            }
        })
    }
}

/// Build the async runtime a shell or script session runs on; on failure, say why on stderr.
pub fn session_runtime(builder: &mut tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    match builder.enable_all().build() {
        Ok(runtime) => Some(runtime),
        Err(e) => {
            eprintln!("error: internal: cannot start the async runtime: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ringkv_common::protocol::{Reply, Request, Response, Role, DEFAULT_MAX_FRAME_LEN};
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// A coordinator that answers everything with `Done`.
    struct Nothing;

    impl ringkv_common::server::Handler for Nothing {
        async fn handle(self: Arc<Self>, _req: Request, _role: Role) -> Reply {
            Ok(Response::Done)
        }
    }

    /// Serve on `addr` until the token is cancelled.
    async fn serve(addr: &str) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(ringkv_common::server::serve(
            listener,
            Arc::new(Nothing),
            DEFAULT_MAX_FRAME_LEN,
            stop.clone(),
        ));
        (stop, server)
    }

    #[tokio::test]
    async fn a_lost_connection_is_announced_and_remade() {
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().to_string()
        };
        let (stop, server) = serve(&addr).await;
        let session = Session::new(&addr, Duration::from_secs(2));
        let first = session.client().await.unwrap();
        assert!(session.is_connected());
        assert!(
            session.take_notices().is_empty(),
            "the first connection is silent"
        );

        stop.cancel();
        server.await.unwrap();
        // The client notices the closed socket on its own reader task.
        for _ in 0..200 {
            if first.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(session.check_connection().is_none());
        let notices = session.take_notices();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(notices[0].contains("lost"), "{notices:?}");
        assert!(session.client().await.is_err(), "nobody listens");
        assert!(
            session.take_notices().is_empty(),
            "the loss is announced once"
        );

        let (stop, server) = serve(&addr).await;
        let second = session.client().await.unwrap();
        assert!(!second.is_closed());
        assert_eq!(
            session.take_notices(),
            [format!("reconnected to the coordinator at {addr}")]
        );
        stop.cancel();
        drop((first, second, session));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_and_is_retried() {
        // Bind and drop a listener to get a port nothing listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let session = Session::new(&addr, Duration::from_secs(2));
        assert!(session.client().await.is_err());
        assert!(session.client().await.is_err());
        assert!(!session.is_connected());
        // A failure to connect is the command's error, not a notice.
        assert!(session.take_notices().is_empty());
        assert_eq!(session.addr(), addr);
    }
}
