//! Showing background work while a command waits on it: `node remove`, `wait healthy`.
//!
//! The coordinator reports its background jobs (re-replication, migration, repair) in
//! `status`. [`Progress`] sums them and shows keys and bytes done and an ETA, as an indicatif
//! bar when the user watches a terminal ([`ProgressMode::Bar`]) or as a plain line at most
//! once a second otherwise ([`ProgressMode::Lines`]), so logs stay readable. Either way it
//! draws on stderr: stdout carries only results (one JSON document with `--json`).
//!
//! [`execute`] runs a [`Command`] like [`commands::execute`], except that `node remove`, one
//! request that is answered only when the decommission finishes, is watched by polling
//! `status` on the same (pipelined) connection while it is in flight.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ringkv_common::client::{CallError, Client};
use ringkv_common::protocol::{JobProgress, Request, Response};

use crate::cli::{Command, NodeCommand};
use crate::commands::{self, Outcome};
use crate::output::{human_bytes, human_secs};

/// How long `node remove` may take at least. It is answered only once every key of the node
/// has been copied away, which takes as long as the data takes; progress is shown instead.
pub const DECOMMISSION_TIMEOUT: Duration = Duration::from_secs(600);

/// How often the jobs are polled: often enough for a live bar, rarely enough to cost nothing.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How often a plain progress line may be printed, so a log gets a line a second at most.
const LINE_INTERVAL: Duration = Duration::from_secs(1);

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// An animated bar on stderr, cleared when the wait ends.
    Bar,
    /// A plain line on stderr when the numbers change, at most once a second.
    Lines,
    /// Nothing (background script lines).
    Off,
}

impl ProgressMode {
    /// [`ProgressMode::Bar`] when both stdout and stderr are terminals, else
    /// [`ProgressMode::Lines`].
    pub fn detect() -> Self {
        if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines
        }
    }
}

/// The sum of the running jobs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct JobTotals {
    pub jobs: usize,
    pub keys_done: u64,
    pub keys_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The longest ETA any job gave, when every job gave one.
    pub eta_secs: Option<f64>,
}

impl JobTotals {
    /// Add up `jobs`.
    pub fn of(jobs: &[JobProgress]) -> Self {
        let mut totals = JobTotals {
            jobs: jobs.len(),
            eta_secs: Some(0.0),
            ..JobTotals::default()
        };
        for job in jobs {
            totals.keys_done += job.keys_done;
            totals.keys_total += job.keys_total;
            totals.bytes_done += job.bytes_done;
            totals.bytes_total += job.bytes_total;
            totals.eta_secs = match (totals.eta_secs, job.eta_secs) {
                (Some(a), Some(b)) if b.is_finite() && b >= 0.0 => Some(a.max(b)),
                _ => None,
            };
        }
        if jobs.is_empty() {
            totals.eta_secs = None;
        }
        totals
    }

    /// `120/1000 keys, 1.0 MiB/10.0 MiB (12%), eta 3s`, or `no background jobs`.
    pub fn describe(&self) -> String {
        if self.jobs == 0 {
            return "no background jobs".to_string();
        }
        let percent = if self.keys_total == 0 {
            100.0
        } else {
            self.keys_done as f64 * 100.0 / self.keys_total as f64
        };
        format!(
            "{}/{} keys, {}/{} ({percent:.0}%), eta {}",
            self.keys_done,
            self.keys_total,
            human_bytes(self.bytes_done),
            human_bytes(self.bytes_total),
            self.eta()
        )
    }

    fn eta(&self) -> String {
        self.eta_secs
            .map_or_else(|| "unknown".to_string(), human_secs)
    }
}

/// Shows one wait's progress until [`Progress::finish`] (or drop).
pub struct Progress {
    mode: ProgressMode,
    what: String,
    bar: Option<ProgressBar>,
    /// When the last plain line was printed, and what it said.
    last_line: Option<(Instant, String)>,
}

impl Progress {
    /// Start showing the progress of `what`, e.g. `node remove 3`.
    pub fn new(mode: ProgressMode, what: impl Into<String>) -> Self {
        Progress {
            mode,
            what: what.into(),
            bar: None,
            last_line: None,
        }
    }

    /// Show the current `jobs`, with `note` (such as the latest `check`) after them.
    pub fn update(&mut self, jobs: &[JobProgress], note: Option<&str>) {
        let totals = JobTotals::of(jobs);
        match self.mode {
            ProgressMode::Off => {}
            ProgressMode::Lines => {
                let mut line = format!("{}: {}", self.what, totals.describe());
                if let Some(note) = note {
                    line.push_str("; ");
                    line.push_str(note);
                }
                let due = match &self.last_line {
                    None => true,
                    Some((at, last)) => *last != line && at.elapsed() >= LINE_INTERVAL,
                };
                if due {
                    let _ = writeln!(std::io::stderr(), "{line}");
                    self.last_line = Some((Instant::now(), line));
                }
            }
            ProgressMode::Bar => self.draw_bar(&totals, note),
        }
    }

    fn draw_bar(&mut self, totals: &JobTotals, note: Option<&str>) {
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
                .with_style(spinner_style())
                .with_prefix(self.what.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        let mut message = if totals.jobs == 0 {
            "no background jobs".to_string()
        } else {
            format!(
                "{}/{}, eta {}",
                human_bytes(totals.bytes_done),
                human_bytes(totals.bytes_total),
                totals.eta()
            )
        };
        if let Some(note) = note {
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str(note);
        }
        // The message first: setting the position may draw at once.
        bar.set_message(message);
        if totals.keys_total > 0 {
            bar.set_style(bar_style());
            bar.set_length(totals.keys_total);
            bar.set_position(totals.keys_done.min(totals.keys_total));
        } else {
            bar.set_style(spinner_style());
        }
    }

    /// Stop showing progress (clears the bar).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

fn bar_style() -> ProgressStyle {
    // The template is a constant known to be valid; fall back to the default bar regardless.
    // `wide_msg` is cut to the terminal's width, so the line never wraps.
    ProgressStyle::with_template("{spinner} {prefix} [{bar:20}] {pos}/{len} keys, {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix} ({elapsed}): {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// Run `cmd` like [`commands::execute`]; `node remove` shows its progress in `mode` while it
/// waits, and may take up to [`DECOMMISSION_TIMEOUT`] (or `timeout`, if longer).
///
/// # Errors
/// The command's own error; a failed progress poll is ignored (the request itself decides).
pub async fn execute(
    client: &Client,
    cmd: &Command,
    timeout: Duration,
    stdin_value: Option<Bytes>,
    mode: ProgressMode,
) -> Result<Outcome, CallError> {
    let Command::Node(NodeCommand::Remove { id, .. }) = cmd else {
        return commands::execute(client, cmd, timeout, stdin_value).await;
    };
    let request = commands::execute(client, cmd, timeout.max(DECOMMISSION_TIMEOUT), None);
    tokio::pin!(request);
    let mut progress = Progress::new(mode, format!("node remove {id}"));
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = &mut request => {
                progress.finish();
                return result;
            }
            _ = ticker.tick(), if mode != ProgressMode::Off => {
                // The request is already on the wire; its answer waits in its slot meanwhile.
                let poll = client.call_timeout(Request::Status, POLL_INTERVAL * 4).await;
                if let Ok(Response::Status(status)) = poll {
                    progress.update(&status.jobs, None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(kind: &str, keys: (u64, u64), bytes: (u64, u64), eta: Option<f64>) -> JobProgress {
        JobProgress {
            kind: kind.into(),
            keys_done: keys.0,
            keys_total: keys.1,
            bytes_done: bytes.0,
            bytes_total: bytes.1,
            eta_secs: eta,
        }
    }

    #[test]
    fn totals_add_up_and_take_the_longest_eta() {
        let jobs = [
            job("migration", (10, 100), (1024, 10240), Some(3.0)),
            job("repair", (5, 10), (0, 0), Some(7.4)),
        ];
        let totals = JobTotals::of(&jobs);
        assert_eq!(totals.jobs, 2);
        assert_eq!((totals.keys_done, totals.keys_total), (15, 110));
        assert_eq!((totals.bytes_done, totals.bytes_total), (1024, 10240));
        assert_eq!(totals.eta_secs, Some(7.4));
        assert_eq!(
            totals.describe(),
            "15/110 keys, 1.0 KiB/10.0 KiB (14%), eta 7s"
        );
    }

    #[test]
    fn an_unknown_eta_makes_the_total_unknown() {
        let jobs = [
            job("migration", (0, 100), (0, 0), None),
            job("repair", (5, 10), (0, 0), Some(1.0)),
        ];
        assert_eq!(JobTotals::of(&jobs).eta_secs, None);
        let bad = [job("repair", (5, 10), (0, 0), Some(f64::NAN))];
        assert_eq!(JobTotals::of(&bad).eta_secs, None);
        assert!(JobTotals::of(&jobs).describe().ends_with("eta unknown"));
    }

    #[test]
    fn no_jobs() {
        let totals = JobTotals::of(&[]);
        assert_eq!(totals.jobs, 0);
        assert_eq!(totals.eta_secs, None);
        assert_eq!(totals.describe(), "no background jobs");
    }

    #[test]
    fn quiet_progress_draws_nothing() {
        let mut progress = Progress::new(ProgressMode::Off, "x");
        progress.update(&[job("repair", (1, 2), (0, 0), None)], Some("note"));
        assert!(progress.bar.is_none());
        assert!(progress.last_line.is_none());
        progress.finish();
    }
}
