//! `ringkv` without a command: the interactive shell.
//!
//! In a terminal it is a rustyline editor: line editing, a persistent history file
//! ([`history_path`]), tab completion of commands and node ids ([`crate::completion`]), and a
//! prompt that names the coordinator (`127.0.0.1:7400>`, or `127.0.0.1:7400 (disconnected)>`).
//! A watcher task prints a notice as soon as the coordinator goes away and again when it
//! answers once more. Ctrl-c abandons the line being typed, or the command that is running.
//!
//! When standard input is not a terminal, the shell reads one line at a time from it, with no
//! prompt, banner or editing, so that tests and pipelines can drive it; it exits at end of
//! input with the status of the last line.
//!
//! Either way every line goes to one [`Interpreter`], so the shell understands exactly what
//! scripts do, and an error is printed without leaving the shell.

use std::io::{self, BufRead, IsTerminal};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ringkv_common::protocol::{Request, Response};
use ringkv_common::NodeState;
use rustyline::completion::{Completer, FilenameCompleter, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Config, Context, Editor, ExternalPrinter, Helper};

use crate::cli::GlobalArgs;
use crate::commands::exit;
use crate::completion;
use crate::interpreter::{Flow, Interpreter};
use crate::progress::ProgressMode;
use crate::session::{session_runtime, Session};

/// The environment variable naming the history file; empty turns the history file off.
pub const HISTORY_ENV: &str = "RINGKV_HISTORY";

/// The history file in the home directory when [`HISTORY_ENV`] is not set.
pub const HISTORY_FILE: &str = ".ringkv_history";

/// Lines kept in the history file.
const HISTORY_SIZE: usize = 1000;

/// How long fetched node ids are reused for completion: long enough that tabbing through a
/// line asks once, short enough that a node added a moment ago completes.
const NODE_ID_CACHE: Duration = Duration::from_secs(2);

/// How long completion waits for `status`; a slow answer must not freeze the keyboard.
const COMPLETION_TIMEOUT: Duration = Duration::from_millis(500);

/// Run the shell until `exit` or end of input; returns the process's exit code.
pub fn main(global: &GlobalArgs) -> u8 {
    let Some(runtime) =
        session_runtime(tokio::runtime::Builder::new_multi_thread().worker_threads(1))
    else {
        return exit::FAILED;
    };
    let session = Session::new(&global.coordinator, global.timeout);
    if io::stdin().is_terminal() {
        interactive(&runtime, session, global.json)
    } else {
        let interpreter = Interpreter::new(session, global.json, ProgressMode::detect());
        piped(&runtime, interpreter)
    }
}

/// Read lines from a non-terminal stdin; the exit code is the last line's.
fn piped(runtime: &tokio::runtime::Runtime, mut interpreter: Interpreter) -> u8 {
    let mut status = exit::OK;
    for line in io::stdin().lock().lines() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                eprintln!("error: input: cannot read stdin: {e}");
                status = exit::USAGE;
                break;
            }
        };
        match runtime.block_on(interpreter.run_line(&line, None)) {
            Ok(Flow::Continue) => status = exit::OK,
            Ok(Flow::Exit) => {
                status = exit::OK;
                break;
            }
            Err(err) => {
                interpreter.report_error(&err);
                status = err.exit_code();
            }
        }
    }
    interpreter.abort_background();
    status
}

/// The history file: `$RINGKV_HISTORY`, or `~/.ringkv_history`; `None` to keep no history.
pub fn history_path() -> Option<PathBuf> {
    match std::env::var_os(HISTORY_ENV) {
        Some(path) if path.is_empty() => None,
        Some(path) => Some(PathBuf::from(path)),
        None => std::env::var_os("HOME")
            .filter(|home| !home.is_empty())
            .map(|home| PathBuf::from(home).join(HISTORY_FILE)),
    }
}

fn interactive(runtime: &tokio::runtime::Runtime, session: Session, json: bool) -> u8 {
    let config = Config::builder()
        .max_history_size(HISTORY_SIZE)
        .and_then(|c| c.history_ignore_dups(true))
        .map(|c| {
            c.history_ignore_space(true)
                .completion_type(rustyline::CompletionType::List)
                .auto_add_history(false)
                .build()
        });
    let mut editor = match config.and_then(Editor::<ShellHelper, DefaultHistory>::with_config) {
        Ok(editor) => editor,
        Err(e) => {
            eprintln!("error: internal: cannot start the line editor: {e}");
            return exit::FAILED;
        }
    };
    editor.set_helper(Some(ShellHelper::new(
        session.clone(),
        runtime.handle().clone(),
    )));
    let history = history_path();
    if let Some(path) = &history {
        // A missing file is the first run; anything else is worth a word but not fatal.
        if let Err(e) = editor.load_history(path) {
            if !is_not_found(&e) {
                eprintln!(
                    "notice: cannot read the history file {}: {e}",
                    path.display()
                );
            }
        }
    }

    let mut interpreter = Interpreter::new(session.clone(), json, ProgressMode::detect());
    println!(
        "RingKV shell for the coordinator at {}. `help` lists the commands; ctrl-d leaves.",
        session.addr()
    );
    // Connect now, so a coordinator that is not there is reported before the first command.
    let _guard = runtime.enter();
    match runtime.block_on(session.client()) {
        Ok(_) => {}
        Err(err) => interpreter.report_error(&crate::interpreter::StepError::Call(err)),
    }
    let watcher = match editor.create_external_printer() {
        Ok(mut printer) => Some(session.watch(move |notice| {
            let _ = printer.print(format!("notice: {notice}\n"));
        })),
        Err(_) => None,
    };

    let mut status = exit::OK;
    loop {
        let prompt = if session.is_connected() {
            format!("{}> ", session.addr())
        } else {
            format!("{} (disconnected)> ", session.addr())
        };
        interpreter.flush_notices();
        let line = match editor.readline(&prompt) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("error: input: {e}");
                status = exit::FAILED;
                break;
            }
        };
        if !line.trim().is_empty() {
            let _ = editor.add_history_entry(line.as_str());
            if let Some(path) = &history {
                // Appending after each line keeps the history of a shell that gets killed.
                let _ = editor.append_history(path);
            }
        }
        let result = runtime.block_on(async {
            tokio::select! {
                result = interpreter.run_line(&line, None) => Some(result),
                _ = tokio::signal::ctrl_c() => None,
            }
        });
        match result {
            Some(Ok(Flow::Continue)) => status = exit::OK,
            Some(Ok(Flow::Exit)) => break,
            Some(Err(err)) => {
                interpreter.report_error(&err);
                status = err.exit_code();
            }
            None => {
                eprintln!("interrupted; a write in flight may or may not have been applied");
                status = exit::FAILED;
            }
        }
    }
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    interpreter.abort_background();
    status
}

fn is_not_found(err: &ReadlineError) -> bool {
    matches!(err, ReadlineError::Io(e) if e.kind() == io::ErrorKind::NotFound)
}

/// The rustyline helper: completion only (no hints, highlighting or multi-line validation).
struct ShellHelper {
    session: Session,
    runtime: tokio::runtime::Handle,
    files: FilenameCompleter,
    /// Node ids from the last `status`, and when they were fetched.
    node_ids: Mutex<Option<(Instant, Vec<String>)>>,
}

impl ShellHelper {
    fn new(session: Session, runtime: tokio::runtime::Handle) -> Self {
        ShellHelper {
            session,
            runtime,
            files: FilenameCompleter::new(),
            node_ids: Mutex::new(None),
        }
    }

    /// The ids of the nodes that have not been removed, from a cache or a quick `status`.
    fn node_ids(&self) -> Vec<String> {
        let mut cache = self
            .node_ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((at, ids)) = cache.as_ref() {
            if at.elapsed() < NODE_ID_CACHE {
                return ids.clone();
            }
        }
        // Completion never connects: it uses the connection the shell already has.
        let Some(client) = self.session.check_connection() else {
            return Vec::new();
        };
        let answer = self
            .runtime
            .block_on(client.call_timeout(Request::Status, COMPLETION_TIMEOUT));
        let ids: Vec<String> = match answer {
            Ok(Response::Status(status)) => status
                .nodes
                .iter()
                .filter(|n| n.state != NodeState::Removed)
                .map(|n| n.id.to_string())
                .collect(),
            _ => return Vec::new(),
        };
        *cache = Some((Instant::now(), ids.clone()));
        ids
    }
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before_cursor = line.get(..pos).unwrap_or(line);
        // The start of the word under the cursor (after a whitespace character of any width).
        let start = before_cursor
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map_or(0, |(at, c)| at + c.len_utf8());
        let partial = &before_cursor[start..];
        let before: Vec<&str> = before_cursor[..start].split_whitespace().collect();
        if completion::slot(&before) == completion::Slot::File {
            return self.files.complete(line, pos, ctx);
        }
        let words = completion::candidates(&before, partial, || self.node_ids());
        let pairs = words
            .into_iter()
            .map(|word| Pair {
                display: word.clone(),
                replacement: format!("{word} "),
            })
            .collect();
        Ok((start, pairs))
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}

impl Highlighter for ShellHelper {}

impl Validator for ShellHelper {}

impl Helper for ShellHelper {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_path_follows_the_environment() {
        // Only reads the environment; the variables are left as they were found.
        let path = history_path();
        match std::env::var_os(HISTORY_ENV) {
            Some(value) if value.is_empty() => assert_eq!(path, None),
            Some(value) => assert_eq!(path, Some(PathBuf::from(value))),
            None => {
                if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
                    assert_eq!(path, Some(PathBuf::from(home).join(HISTORY_FILE)));
                }
            }
        }
    }
}
