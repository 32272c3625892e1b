//! Drivers for `ringkv` processes that keep running while a test talks to them: the shell
//! on pipes ([`PipedShell`]) and on a pseudo-terminal ([`TerminalShell`]).
//!
//! Output is collected by reader threads into shared buffers, and tests wait on what the
//! buffers contain with [`wait_for`] deadlines, never fixed sleeps.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringkv_tests::{bin_dir, wait_for, Cluster};

/// How long a test waits for the shell to answer one line.
pub const ANSWER: Duration = Duration::from_secs(15);

/// A growing buffer filled by a reader thread.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Read `source` into a new buffer on a thread of its own, until EOF or an error.
    pub fn start(mut source: impl Read + Send + 'static) -> Captured {
        let captured = Captured::default();
        let sink = captured.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                match source.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.0.lock().unwrap().extend_from_slice(&chunk[..n]),
                }
            }
        });
        captured
    }

    /// Everything read so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Wait until the text contains `needle`; returns the text.
    pub fn wait_for(&self, needle: &str) -> String {
        wait_for(&format!("output containing {needle:?}"), ANSWER, || {
            let text = self.text();
            text.contains(needle).then_some(text)
        })
        .unwrap_or_else(|e| panic!("{e}; output so far:\n{}", self.text()))
    }
}

/// Wait for `child` to exit, killing it after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    wait_for("ringkv to exit", timeout + Duration::from_secs(1), || {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        child.try_wait().ok().flatten()
    })
    .expect("ringkv exits")
}

/// `ringkv --coordinator ADDR` with its stdin, stdout and stderr on pipes.
pub struct PipedShell {
    child: Child,
    stdin: Option<ChildStdin>,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl PipedShell {
    /// Start the shell against `addr`, with no history file.
    pub fn start(addr: &str) -> PipedShell {
        let mut child = Command::new(bin_dir().join("ringkv"))
            .arg("--coordinator")
            .arg(addr)
            .env("RINGKV_HISTORY", "")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringkv");
        let stdout = Captured::start(child.stdout.take().expect("stdout"));
        let stderr = Captured::start(child.stderr.take().expect("stderr"));
        PipedShell {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
        }
    }

    /// Type one line.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write to the shell");
        stdin.flush().expect("flush");
    }

    /// Close stdin and wait for the shell to exit.
    pub fn finish(&mut self) -> ExitStatus {
        drop(self.stdin.take());
        wait_exit(&mut self.child, ANSWER)
    }
}

impl Drop for PipedShell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ringkv --coordinator ADDR` on a pseudo-terminal, as a person at a keyboard runs it.
pub struct TerminalShell {
    child: Child,
    master: std::fs::File,
    pub screen: Captured,
}

impl TerminalShell {
    /// Start the shell on a new 120x40 pseudo-terminal with `history` as its history file.
    pub fn start(addr: &str, history: &Path) -> TerminalShell {
        let size = nix::pty::Winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
        let slave: OwnedFd = pty.slave;
        let io = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup pty"));
        let child = Command::new(bin_dir().join("ringkv"))
            .arg("--coordinator")
            .arg(addr)
            .env("RINGKV_HISTORY", history)
            .env("TERM", "xterm")
            .stdin(io(&slave))
            .stdout(io(&slave))
            .stderr(io(&slave))
            .spawn()
            .expect("spawn ringkv on a pty");
        // Only the child holds the slave now, so reads on the master end when it exits.
        drop(slave);
        let master = std::fs::File::from(pty.master);
        let screen = Captured::start(master.try_clone().expect("dup master"));
        TerminalShell {
            child,
            master,
            screen,
        }
    }

    /// Send keystrokes (`\r` is enter, `\t` is tab).
    pub fn keys(&mut self, keys: &str) {
        self.master
            .write_all(keys.as_bytes())
            .expect("write to the pty");
        self.master.flush().expect("flush");
    }

    /// The screen so far, without terminal escape sequences, carriage returns or bells.
    pub fn plain(&self) -> String {
        strip_escapes(&self.screen.text())
    }

    /// Wait until the plain screen text contains `needle`; returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        wait_for(&format!("the screen to show {needle:?}"), ANSWER, || {
            let text = self.plain();
            text.contains(needle).then_some(text)
        })
        .unwrap_or_else(|e| panic!("{e}; screen so far:\n{}", self.plain()))
    }

    /// Wait until the plain screen text shows `needle` `count` times; returns it.
    pub fn wait_count(&self, needle: &str, count: usize) -> String {
        let what = format!("the screen to show {needle:?} {count} times");
        wait_for(&what, ANSWER, || {
            let text = self.plain();
            (text.matches(needle).count() >= count).then_some(text)
        })
        .unwrap_or_else(|e| panic!("{e}; screen so far:\n{}", self.plain()))
    }

    /// Wait for the shell to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_exit(&mut self.child, ANSWER)
    }
}

impl Drop for TerminalShell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Remove ANSI escape sequences (CSI `ESC [ ... letter` and two-byte `ESC x`), `\r` and BEL.
pub fn strip_escapes(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.next() == Some('[') {
                    for next in chars.by_ref() {
                        if next.is_ascii_alphabetic() || next == '~' {
                            break;
                        }
                    }
                }
            }
            '\r' | '\x07' => {}
            _ => out.push(c),
        }
    }
    out
}

/// Write `script` into the cluster's directory as `name` and return its path.
pub fn write_script(cluster: &Cluster, name: &str, script: &str) -> PathBuf {
    let path = cluster.dir.path().join(name);
    std::fs::write(&path, script).expect("write the script");
    path
}

/// Run `ringkv --coordinator ADDR run PATH`.
pub fn run_script(cluster: &Cluster, path: &Path) -> Output {
    cluster.ringkv(&["run", path.to_str().expect("a UTF-8 path")])
}

/// The stdout and stderr of `out`, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
