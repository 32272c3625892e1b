//! Running `ringkv chaos` as a process in a temporary directory and reading its JSON report.
//!
//! A [`ChaosRun`] owns the directory the run keeps its cluster in; dropping it kills every
//! process whose command line mentions that directory (chaos itself, its coordinator, the
//! nodes), so a failing or hanging test leaks nothing. A failed assertion keeps the directory
//! (coordinator log, history, report) and names it.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ringkv_tests::{bin_dir, processes_mentioning};
use serde_json::Value;

/// What a finished chaos run left.
/// Chaos runs of this binary take turns: each starts a 5-node cluster and a dozen clients,
/// and two at once on a 2-core machine would change what each measures (the broken build's
/// race is caught less often when the machine is twice as busy).
pub fn one_run_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A failed run poisons the lock; the next one still takes its turn.
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct ChaosRun {
    /// `None` once kept by [`ChaosRun::fail`].
    dir: Option<tempfile::TempDir>,
    /// The directory's path, for finding the run's processes even once it is kept.
    path: std::path::PathBuf,
    /// The exit code, `None` if killed by a signal.
    pub code: Option<i32>,
    /// The `--json` report.
    pub report: Value,
    /// Progress lines and errors.
    pub stderr: String,
}

impl ChaosRun {
    /// Run `ringkv --json chaos --data-dir DIR ARGS...`, killing it after `limit`.
    pub fn run(args: &[&str], limit: Duration) -> ChaosRun {
        let dir = tempfile::Builder::new()
            .prefix("ringkv-chaos-test-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("run");
        let mut child = Command::new(bin_dir().join("ringkv"))
            .args(["--json", "chaos", "--data-dir"])
            .arg(&data)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringkv chaos");
        let stdout = drain(&mut child, true);
        let stderr = drain(&mut child, false);
        let mut run = ChaosRun {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            code: None,
            report: Value::Null,
            stderr: String::new(),
        };
        let deadline = Instant::now() + limit;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    run.stderr = stderr.join().unwrap_or_default();
                    run.fail(&format!("ringkv chaos did not finish within {limit:?}"));
                }
            }
        };
        run.code = status.code();
        run.stderr = stderr.join().unwrap_or_default();
        let out = stdout.join().unwrap_or_default();
        run.report = match serde_json::from_str(&out) {
            Ok(v) => v,
            Err(e) => run.fail(&format!("no JSON report ({e}); stdout: {out}")),
        };
        run
    }

    /// Keep the directory, then panic with `msg`, the report and the run's stderr.
    pub fn fail(&mut self, msg: &str) -> ! {
        let kept = self.dir.take().map(|d| d.keep());
        panic!(
            "{msg}\nreport: {}\nstderr:\n{}\nkept: {kept:?}",
            serde_json::to_string_pretty(&self.report).unwrap_or_default(),
            self.stderr
        );
    }

    /// Assert `cond`, or [`ChaosRun::fail`] with `msg`.
    pub fn check(&mut self, cond: bool, msg: &str) {
        if !cond {
            self.fail(msg);
        }
    }
}

impl Drop for ChaosRun {
    fn drop(&mut self) {
        for pid in processes_mentioning(&self.path) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Read all of the child's stdout (or stderr) on a thread, so its pipe never fills.
fn drain(child: &mut Child, stdout: bool) -> std::thread::JoinHandle<String> {
    let mut pipe: Box<dyn Read + Send> = if stdout {
        Box::new(child.stdout.take().expect("stdout piped"))
    } else {
        Box::new(child.stderr.take().expect("stderr piped"))
    };
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    })
}
