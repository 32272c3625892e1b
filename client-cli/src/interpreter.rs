//! Carries out shell and script lines against the cluster: the one place both front ends share.
//!
//! An [`Interpreter`] owns a [`Session`] (the connection, remade when it breaks), the
//! variables set with `let`, and the lines running in the background (`bg`). For each line it
//! expands references ([`crate::script`] stage 2), parses the result into a [`Step`] and runs
//! it: cluster commands through [`progress::execute`], the directives (`expect`, `wait`, ...)
//! here. Results go to its `out` writer and errors, notices and progress to `err`; a failed
//! line comes back as a [`StepError`] for the caller to report: the shell prints it and
//! carries on, a script stops.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use ringkv_common::client::CallError;
use ringkv_common::protocol::CheckReport;
use ringkv_common::{NodeId, NodeState, Version};

use crate::cli::Command;
use crate::commands::{error_exit_code, exit, Outcome};
use crate::help;
use crate::output::{check_summary, human_secs, render, ErrorReport};
use crate::progress::{self, Progress, ProgressMode, POLL_INTERVAL};
use crate::script::{
    self, parse_step, parse_substitution, scan, split_prefix, split_words, Piece, Prefixed,
    ScriptError, Step, DEFAULT_WAIT_TIMEOUT,
};
use crate::session::Session;

/// How deeply `run SCRIPT` may nest, so a script that runs itself fails instead of looping.
const MAX_SCRIPT_DEPTH: usize = 8;

/// How often `wait state` polls `status`: a state change is cheap to see and worth seeing soon.
const STATE_POLL_INTERVAL: Duration = Duration::from_millis(100);

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What to do after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// `exit`: stop reading lines.
    Exit,
}

/// Why a line failed.
#[derive(thiserror::Error, Debug)]
pub enum StepError {
    /// The line is not valid: bad syntax, an unknown command, bad arguments.
    #[error("{0}")]
    Script(#[from] ScriptError),
    /// The coordinator refused the command, or could not be reached.
    #[error("{}: {}", ErrorReport::from(.0).class, ErrorReport::from(.0).message)]
    Call(CallError),
    /// `check` answered, and not every key is healthy.
    #[error("{}", check_summary(.0))]
    Unhealthy(CheckReport),
    /// An expectation was not met, a wait timed out, or a substitution found nothing.
    #[error("{0}")]
    Failed(String),
    /// A script file could not be read.
    #[error("{0}")]
    Io(String),
    /// A round of `repeat` failed.
    #[error("round {round} of {count}: {source}")]
    Round {
        round: u64,
        count: u64,
        #[source]
        source: Box<StepError>,
    },
    /// A line of a script failed.
    #[error("line {line}: {source}")]
    AtLine {
        line: usize,
        #[source]
        source: Box<StepError>,
    },
}

impl StepError {
    /// The exit code of a script that stops with this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            StepError::Script(_) | StepError::Io(_) => exit::USAGE,
            StepError::Call(err) => error_exit_code(err),
            StepError::Unhealthy(_) | StepError::Failed(_) => exit::FAILED,
            StepError::AtLine { source, .. } | StepError::Round { source, .. } => {
                source.exit_code()
            }
        }
    }

    /// Whether the output already told the user (an unhealthy `check` printed its report).
    pub fn already_shown(&self) -> bool {
        match self {
            StepError::Unhealthy(_) => true,
            StepError::AtLine { source, .. } | StepError::Round { source, .. } => {
                source.already_shown()
            }
            _ => false,
        }
    }
}

/// A line started with `bg`.
struct Background {
    /// The script line it came from, if any.
    line: Option<usize>,
    text: String,
    handle: tokio::task::JoinHandle<Result<(), StepError>>,
}

/// Runs lines; see the module docs.
pub struct Interpreter {
    session: Session,
    json: bool,
    progress: ProgressMode,
    vars: BTreeMap<String, String>,
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
    background: Vec<Background>,
    /// The script line being run, for `bg` to remember.
    current_line: Option<usize>,
    depth: usize,
}

impl Interpreter {
    /// An interpreter printing to stdout and stderr; `json` renders results as JSON lines.
    pub fn new(session: Session, json: bool, progress: ProgressMode) -> Self {
        Interpreter {
            session,
            json,
            progress,
            vars: BTreeMap::new(),
            out: Box::new(std::io::stdout()),
            err: Box::new(std::io::stderr()),
            background: Vec::new(),
            current_line: None,
            depth: 0,
        }
    }

    /// The session, shared with the shell's completer and watcher.
    pub fn session(&self) -> &Session {
        &self.session
    }

    fn say(&mut self, text: &str) {
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }

    fn warn(&mut self, text: &str) {
        let _ = writeln!(self.err, "{text}");
        let _ = self.err.flush();
    }

    /// Print the session's queued notices (connection lost, reconnected).
    pub fn flush_notices(&mut self) {
        for notice in self.session.take_notices() {
            self.warn(&format!("notice: {notice}"));
        }
    }

    /// Run one line. With `echo`, the line's number in a script: the line is printed first,
    /// as `[N] LINE`, followed by its expansion if that differs.
    pub fn run_line<'a>(
        &'a mut self,
        line: &'a str,
        echo: Option<usize>,
    ) -> BoxFuture<'a, Result<Flow, StepError>> {
        Box::pin(async move {
            if echo.is_some() {
                self.current_line = echo;
            }
            match split_prefix(line)? {
                Prefixed::Repeat { count, body } => {
                    let Some(number) = echo else {
                        return self.repeat(count, body).await;
                    };
                    // A script's log gets one line for all the rounds, not one per round.
                    self.say(&format!("[{number}] {}", line.trim()));
                    let started = Instant::now();
                    let out = std::mem::replace(&mut self.out, Box::new(std::io::sink()));
                    let result = self.repeat(count, body).await;
                    self.out = out;
                    if result.is_ok() {
                        self.say(&format!("{count} rounds done (after {})", elapsed(started)));
                    }
                    result
                }
                Prefixed::Background { body } => {
                    if let Some(number) = echo {
                        self.say(&format!("[{number}] {}", line.trim()));
                    }
                    self.start_background(body)?;
                    Ok(Flow::Continue)
                }
                Prefixed::Plain(text) => {
                    let expanded = self.expand(text).await?;
                    let step = parse_step(&split_words(&expanded)?)?;
                    if let (Some(number), false) = (echo, step == Step::Nothing) {
                        let shown = text.trim();
                        let mut echoed = format!("[{number}] {shown}");
                        if expanded.trim() != shown {
                            echoed.push_str(&format!("  ({})", expanded.trim()));
                        }
                        self.say(&echoed);
                    }
                    self.run_step(step).await
                }
            }
        })
    }

    /// Run `body` `count` times with `$i` counting from 1.
    async fn repeat(&mut self, count: u64, body: &str) -> Result<Flow, StepError> {
        for round in 1..=count {
            self.vars.insert("i".into(), round.to_string());
            match self.run_line(body, None).await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Exit) => return Ok(Flow::Exit),
                Err(err) => {
                    return Err(StepError::Round {
                        round,
                        count,
                        source: Box::new(err),
                    })
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// Resolve the references in `text` and put it back together.
    fn expand<'a>(&'a mut self, text: &'a str) -> BoxFuture<'a, Result<String, StepError>> {
        Box::pin(async move {
            let pieces = scan(text)?;
            let mut values = Vec::new();
            for piece in &pieces {
                match piece {
                    Piece::Text(_) => {}
                    Piece::Var { name, .. } => {
                        let value = self.vars.get(name).cloned().ok_or_else(|| {
                            ScriptError::Syntax(format!(
                                "${name} is not set (set it with: let {name} = VALUE)"
                            ))
                        })?;
                        values.push(value);
                    }
                    Piece::Subst { inner, .. } => {
                        let inner = self.expand(inner).await?;
                        let words = split_words(&inner)?;
                        values.push(self.substitute(&words).await?);
                    }
                }
            }
            Ok(script::assemble(&pieces, &values)?)
        })
    }

    /// Evaluate `$(replica KEY N)`.
    async fn substitute(&mut self, words: &[String]) -> Result<String, StepError> {
        let (key, n) = parse_substitution(words)?;
        let outcome = self
            .call(&Command::Locate { key: key.clone() })
            .await
            .map_err(StepError::Call)?;
        let Outcome::Located { location, .. } = outcome else {
            return Err(StepError::Failed(
                "locate answered with something else".into(),
            ));
        };
        if location.version == Version::ZERO {
            return Err(StepError::Failed(format!(
                "$(replica {key} {n}): key {key:?} was never written"
            )));
        }
        let replica = location.replicas.get(n - 1).ok_or_else(|| {
            StepError::Failed(format!(
                "$(replica {key} {n}): key {key:?} has {} replicas",
                location.replicas.len()
            ))
        })?;
        Ok(replica.node.to_string())
    }

    /// Run a cluster command on the session's connection, printing connection notices.
    async fn call(&mut self, command: &Command) -> Result<Outcome, CallError> {
        let client = self.session.client().await;
        self.flush_notices();
        let client = client?;
        let result = progress::execute(
            &client,
            command,
            self.session.timeout(),
            None,
            self.progress,
        )
        .await;
        // A connection lost during the call is noticed now rather than at the next command.
        self.session.check_connection();
        self.flush_notices();
        result
    }

    fn print_outcome(&mut self, outcome: &Outcome) {
        let bytes = render(outcome, self.json);
        let _ = self.out.write_all(&bytes);
        if bytes.last() != Some(&b'\n') {
            // A binary value is written as-is; end the line so the prompt starts on its own.
            let _ = self.out.write_all(b"\n");
        }
        let _ = self.out.flush();
    }

    /// Print `err` as the one-shot commands do: a line on stderr, and JSON on stdout with `--json`.
    pub fn report_error(&mut self, err: &StepError) {
        if err.already_shown() {
            return;
        }
        let report = match err {
            StepError::Call(call) => ErrorReport::from(call),
            other => ErrorReport::new(
                match other {
                    StepError::Script(_) => "usage",
                    StepError::Io(_) => "input",
                    _ => "failed",
                },
                other.to_string(),
            ),
        };
        if self.json {
            let _ = self.out.write_all(&report.json());
            let _ = self.out.flush();
        }
        self.warn(report.stderr_line().trim_end());
    }

    fn run_step(&mut self, step: Step) -> BoxFuture<'_, Result<Flow, StepError>> {
        Box::pin(async move {
            match step {
                Step::Nothing => {}
                Step::Cluster { command, may_fail } => {
                    if let Command::Run { script } = &*command {
                        self.run_file(script).await?;
                        return Ok(Flow::Continue);
                    }
                    match self.call(&command).await {
                        Ok(outcome) => {
                            self.print_outcome(&outcome);
                            if let Outcome::Checked(report) = outcome {
                                if !report.is_healthy() && !may_fail {
                                    return Err(StepError::Unhealthy(report));
                                }
                            }
                        }
                        Err(err) if may_fail => {
                            let report = ErrorReport::from(&err);
                            self.warn(&format!(
                                "error: {}: {} (carrying on: try)",
                                report.class, report.message
                            ));
                        }
                        Err(err) => return Err(StepError::Call(err)),
                    }
                }
                Step::Show(text) => self.say(text.trim_end()),
                Step::Sleep(duration) => tokio::time::sleep(duration).await,
                Step::ExpectGet { key, value } => self.expect_value(key, Some(value)).await?,
                Step::ExpectMissing { key } => self.expect_value(key, None).await?,
                Step::WaitHealthy { timeout } => self.wait_healthy(timeout).await?,
                Step::WaitState {
                    node,
                    state,
                    timeout,
                } => self.wait_state(node, state, timeout).await?,
                Step::WaitBackground { timeout } => self.wait_background(timeout).await?,
                Step::Let { name, value } => {
                    self.vars.insert(name, value);
                }
                Step::Echo(text) => self.say(&text),
                Step::Help(topic) => {
                    let text = help::help(&topic)?;
                    self.say(text.trim_end());
                }
                Step::Exit => return Ok(Flow::Exit),
            }
            Ok(Flow::Continue)
        })
    }

    /// `expect get KEY VALUE` (`want` is `Some`) or `expect missing KEY` (`None`).
    async fn expect_value(&mut self, key: String, want: Option<String>) -> Result<(), StepError> {
        let expected = match &want {
            Some(value) => format!("expected get {key} = {value:?}"),
            None => format!("expected {key} to be missing"),
        };
        let got = match self.call(&Command::Get { key: key.clone() }).await {
            Ok(Outcome::Value { value, .. }) => value,
            Ok(_) => return Err(StepError::Failed(format!("{expected}, got another answer"))),
            Err(err) => {
                let report = ErrorReport::from(&err);
                return Err(StepError::Failed(format!(
                    "{expected}, got error: {}: {}",
                    report.class, report.message
                )));
            }
        };
        match (&want, &got) {
            (Some(want), Some(got)) if got.as_ref() == want.as_bytes() => {
                self.say(&format!("ok: {key} = {want:?}"));
                Ok(())
            }
            (None, None) => {
                self.say(&format!("ok: {key} is missing"));
                Ok(())
            }
            (_, Some(got)) => Err(StepError::Failed(format!(
                "{expected}, got {:?}",
                String::from_utf8_lossy(got)
            ))),
            (Some(_), None) => Err(StepError::Failed(format!("{expected}, got (nil)"))),
        }
    }

    /// Poll `check` until every key is healthy, showing the background jobs meanwhile.
    async fn wait_healthy(&mut self, timeout: Duration) -> Result<(), StepError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut progress = Progress::new(self.progress, "wait healthy");
        loop {
            let last = match self.call(&Command::Check).await {
                Ok(Outcome::Checked(report)) if report.is_healthy() => {
                    progress.finish();
                    self.say(&format!(
                        "{} (after {})",
                        check_summary(&report),
                        elapsed(started)
                    ));
                    return Ok(());
                }
                Ok(Outcome::Checked(report)) => check_summary(&report),
                Ok(_) => "check answered with something else".to_string(),
                Err(err) => {
                    let report = ErrorReport::from(&err);
                    format!("error: {}: {}", report.class, report.message)
                }
            };
            if let Ok(Outcome::Status(status)) = self.call(&Command::Status).await {
                progress.update(&status.jobs, Some(&last));
            }
            if Instant::now() >= deadline {
                return Err(StepError::Failed(format!(
                    "expected healthy within {}, got {last}",
                    human_duration(timeout)
                )));
            }
            sleep_until_or(deadline, POLL_INTERVAL).await;
        }
    }

    /// Poll `status` until `node` is in `state`.
    async fn wait_state(
        &mut self,
        node: NodeId,
        state: NodeState,
        timeout: Duration,
    ) -> Result<(), StepError> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let last = match self.call(&Command::Status).await {
                Ok(Outcome::Status(status)) => {
                    let Some(info) = status.nodes.iter().find(|n| n.id == node) else {
                        return Err(StepError::Failed(format!(
                            "expected node {node} to be {state}, but the cluster has no node {node}"
                        )));
                    };
                    if info.state == state {
                        self.say(&format!(
                            "node {node} is {state} (after {})",
                            elapsed(started)
                        ));
                        return Ok(());
                    }
                    info.state.to_string()
                }
                Ok(_) => "status answered with something else".to_string(),
                Err(err) => {
                    let report = ErrorReport::from(&err);
                    format!("error: {}: {}", report.class, report.message)
                }
            };
            if Instant::now() >= deadline {
                return Err(StepError::Failed(format!(
                    "expected node {node} to be {state} within {}, got {last}",
                    human_duration(timeout)
                )));
            }
            sleep_until_or(deadline, STATE_POLL_INTERVAL).await;
        }
    }

    /// Start `body` in the background with a copy of the variables and no output.
    fn start_background(&mut self, body: &str) -> Result<(), StepError> {
        // Catch a typo now, not when the background line gets to it.
        script::validate(body).map_err(|(_, err)| err)?;
        let mut background = Interpreter {
            session: self.session.clone(),
            json: false,
            progress: ProgressMode::Off,
            vars: self.vars.clone(),
            out: Box::new(std::io::sink()),
            err: Box::new(std::io::sink()),
            background: Vec::new(),
            current_line: None,
            depth: self.depth,
        };
        let text = body.to_string();
        let owned = text.clone();
        let handle = tokio::spawn(async move {
            let flow = background.run_line(&owned, None).await;
            // A background line's own `bg` lines belong to it: wait for them too.
            background.wait_background(DEFAULT_WAIT_TIMEOUT).await?;
            flow.map(|_| ())
        });
        self.background.push(Background {
            line: self.current_line,
            text,
            handle,
        });
        Ok(())
    }

    /// Wait for every background line; the first failure (in start order) is the error.
    pub async fn wait_background(&mut self, timeout: Duration) -> Result<(), StepError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let started = Instant::now();
        let lines = std::mem::take(&mut self.background);
        let count = lines.len();
        let mut failure = None;
        for mut line in lines {
            let name = match line.line {
                Some(number) => format!("background line {number} ({})", line.text),
                None => format!("background line `{}`", line.text),
            };
            if failure.is_some() {
                line.handle.abort();
                continue;
            }
            match tokio::time::timeout_at(deadline, &mut line.handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(err))) => failure = Some(format!("{name} failed: {err}")),
                Ok(Err(join)) => failure = Some(format!("{name} stopped: {join}")),
                Err(_) => {
                    line.handle.abort();
                    failure = Some(format!(
                        "{name} still running after {}",
                        human_duration(timeout)
                    ));
                }
            }
        }
        if let Some(message) = failure {
            return Err(StepError::Failed(message));
        }
        if count > 0 {
            self.say(&format!(
                "{count} background line{} done (after {})",
                if count == 1 { "" } else { "s" },
                elapsed(started)
            ));
        }
        Ok(())
    }

    /// Stop the background lines without waiting (the shell is leaving).
    pub fn abort_background(&mut self) {
        for line in self.background.drain(..) {
            line.handle.abort();
        }
    }

    /// Run the script in `path`, echoing each line; stops at the first failed line.
    ///
    /// The whole script is checked first, so a bad line fails before anything is sent.
    /// Background lines still running at the end are waited for.
    ///
    /// # Errors
    /// [`StepError::AtLine`] around the failure, or [`StepError::Io`] for an unreadable file.
    pub async fn run_file(&mut self, path: &Path) -> Result<(), StepError> {
        if self.depth >= MAX_SCRIPT_DEPTH {
            return Err(StepError::Failed(format!(
                "scripts nested more than {MAX_SCRIPT_DEPTH} deep"
            )));
        }
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| StepError::Io(format!("cannot read {}: {e}", path.display())))?;
        script::validate(&text).map_err(|(line, err)| StepError::AtLine {
            line,
            source: Box::new(StepError::Script(err)),
        })?;
        let outer_line = self.current_line;
        let outer_background = std::mem::take(&mut self.background);
        self.depth += 1;
        let mut result = Ok(());
        for (index, line) in text.lines().enumerate() {
            match self.run_line(line, Some(index + 1)).await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Exit) => break,
                Err(err) => {
                    result = Err(StepError::AtLine {
                        line: index + 1,
                        source: Box::new(err),
                    });
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self.wait_background(DEFAULT_WAIT_TIMEOUT).await;
        } else {
            self.abort_background();
        }
        self.depth -= 1;
        self.current_line = outer_line;
        self.background = outer_background;
        result
    }
}

/// Sleep for `step`, but not past `deadline`.
async fn sleep_until_or(deadline: Instant, step: Duration) {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(step.min(left)).await;
}

/// `1.2s` since `started`.
fn elapsed(started: Instant) -> String {
    human_duration(started.elapsed())
}

/// `250ms`, `1.2s`, `4m05s`.
fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 1.0 {
        format!("{}ms", duration.as_millis())
    } else if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        human_secs(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_duration(Duration::from_millis(1250)), "1.2s");
        assert_eq!(human_duration(Duration::from_secs(245)), "4m05s");
    }

    #[test]
    fn exit_codes() {
        let unmet = StepError::Failed("expected x".into());
        assert_eq!(unmet.exit_code(), exit::FAILED);
        let usage = StepError::Script(ScriptError::Usage("bad".into()));
        assert_eq!(usage.exit_code(), exit::USAGE);
        let lost = StepError::Call(CallError::ConnectionLost("a:1".into()));
        assert_eq!(lost.exit_code(), exit::CONNECTION);
        let nested = StepError::AtLine {
            line: 7,
            source: Box::new(lost),
        };
        assert_eq!(nested.exit_code(), exit::CONNECTION);
        assert!(
            nested.to_string().starts_with("line 7: connection_lost: "),
            "{nested}"
        );
        let unhealthy = StepError::AtLine {
            line: 2,
            source: Box::new(StepError::Unhealthy(CheckReport {
                keys: 2,
                healthy: 1,
                lost: 1,
                ..CheckReport::default()
            })),
        };
        assert!(unhealthy.already_shown());
        assert_eq!(
            unhealthy.to_string(),
            "line 2: UNHEALTHY: 1/2 keys healthy, 0 under-replicated, 1 lost, 0 stale"
        );
    }

    /// A script that fails on a line checked statically never connects anywhere.
    #[tokio::test]
    async fn a_bad_line_fails_before_anything_runs() {
        let dir = std::env::temp_dir().join(format!("ringkv-script-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.ringkv");
        std::fs::write(&path, "put a 1\n\n# comment\nwait state 2 lost\n").unwrap();
        // Nothing listens on port 9 of localhost in a test environment; it is never tried.
        let mut interpreter = Interpreter::new(
            Session::new("127.0.0.1:9", Duration::from_millis(200)),
            false,
            ProgressMode::Off,
        );
        interpreter.out = Box::new(std::io::sink());
        let err = interpreter.run_file(&path).await.unwrap_err();
        assert!(err.to_string().starts_with("line 4: "), "{err}");
        assert_eq!(err.exit_code(), exit::USAGE);
        let err = interpreter
            .run_file(&dir.join("missing.ringkv"))
            .await
            .unwrap_err();
        assert!(matches!(err, StepError::Io(_)), "{err:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Variables, `repeat`, `echo` and `let` need no cluster.
    #[tokio::test]
    async fn local_directives() {
        let mut interpreter = Interpreter::new(
            Session::new("127.0.0.1:9", Duration::from_millis(200)),
            false,
            ProgressMode::Off,
        );
        let (out, buffer) = SharedBuffer::new();
        interpreter.out = Box::new(out);
        interpreter
            .run_line("let who = 'the world'", None)
            .await
            .unwrap();
        interpreter
            .run_line("echo hello \"$who\"", Some(3))
            .await
            .unwrap();
        interpreter
            .run_line("repeat 2 echo round $i", None)
            .await
            .unwrap();
        interpreter
            .run_line("repeat 3 echo hidden $i", Some(5))
            .await
            .unwrap();
        let err = interpreter
            .run_line("repeat 3 echo $(replica k $i)", None)
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("round 1 of 3: "), "{err}");
        assert_eq!(
            interpreter.run_line("exit", None).await.unwrap(),
            Flow::Exit
        );
        let err = interpreter
            .run_line("echo $nobody", None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("$nobody is not set"), "{err}");
        assert_eq!(
            buffer.text(),
            "[3] echo hello \"$who\"  (echo hello \"the world\")\nhello the world\nround 1\nround 2\n\
             [5] repeat 3 echo hidden $i\n3 rounds done (after 0ms)\n"
        );
    }

    /// A `Write` whose bytes a test can read back.
    #[derive(Clone)]
    struct SharedBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl SharedBuffer {
        fn new() -> (Self, Self) {
            let buffer = SharedBuffer(Default::default());
            (buffer.clone(), buffer)
        }

        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
