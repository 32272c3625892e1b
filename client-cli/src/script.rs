//! The line grammar shared by the interactive shell and `ringkv run` scripts, as pure functions.
//!
//! A line goes through three stages; only the middle one does I/O (in [`crate::interpreter`]):
//! 1. [`split_prefix`] recognises `repeat N LINE` and `bg LINE`, whose LINE is kept raw because it
//!    is expanded anew each time it runs. [`scan`] then splits a line into literal text and
//!    references, `$NAME` (a variable) and `$(replica KEY N)` (a substitution), and drops a
//!    trailing `# comment`. Nothing inside single quotes is expanded.
//! 2. The interpreter resolves each reference, and [`assemble`] puts the line back together,
//!    quoting each resolved value so that it stays one word.
//! 3. [`parse_step`] splits the result with shell quoting rules (shlex) and turns the words into
//!    a [`Step`]: a cluster command, parsed by the same clap definition as the one-shot commands
//!    ([`crate::cli::parse_words`]), or one of the directives listed in [`LANGUAGE_HELP`].
//!
//! [`validate`] runs stages 1 and 3 over a whole script before anything is sent, so a typo on
//! line 40 is reported before line 1 kills a node. Lines with references can only be checked
//! when they run.

use std::time::Duration;

use clap::error::ErrorKind;
use ringkv_common::{NodeId, NodeState};

use crate::cli::{parse_duration, parse_words, Command};

/// The script language, as `ringkv run --help` and the shell's `help` show it.
pub const LANGUAGE_HELP: &str = "\
Script lines (the shell accepts them too):
  COMMAND ...                 any ringkv command: put k v, get k, node kill 2, check, ...
  # TEXT                      a comment; also after a command: put k v  # note
  sleep DURATION              pause, e.g. sleep 500ms
  expect get KEY VALUE        fail unless KEY holds VALUE
  expect missing KEY          fail unless KEY does not exist (or was deleted)
  wait healthy [TIMEOUT]      poll `check` until every key is healthy (default 30s)
  wait state NODE STATE [TIMEOUT]
                              poll `status` until NODE is up, suspect, down, leaving or removed
  let NAME = VALUE            set a variable; $NAME expands to its value
  $(replica KEY N)            expands to the id of the Nth node (from 1) that `locate KEY` lists
  repeat N LINE               run LINE N times; $i counts 1..N
  bg LINE                     run LINE in the background (its output is hidden)
  wait bg [TIMEOUT]           wait for background lines; fail if one failed (default 30s)
  try COMMAND                 run COMMAND; if it fails, print the error and carry on
  echo TEXT                   print TEXT
  exit                        stop here, successfully

Quote values with spaces: put greeting \"hello world\". Nothing inside 'single quotes' is
expanded; \\$ is a literal dollar sign.

A script stops at the first line that fails (an unmet expect, a wait that timed out, a
command that failed, or a `check` that found unhealthy keys) and exits non-zero, naming it:
  line 7: expected get greeting = \"hello\", got (nil)

Run a script with `ringkv run FILE`, or `run FILE` in the shell; examples/scenarios/ in the
source tree has scenarios to start from.

Example (kill two of the three replicas of a key, then watch the cluster heal):
  put greeting hello
  let first = $(replica greeting 1)
  let second = $(replica greeting 2)
  node kill $first
  node kill $second
  wait state $second down 10s
  wait healthy 30s
  expect get greeting hello";

/// How long `wait ...` waits when the line names no timeout.
///
/// Long enough for failure detection plus re-replicating a test-sized data set, short enough
/// that a stuck scenario fails within a CI run.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Most rounds a `repeat` may ask for; a typo such as `repeat 1000000000` should not hang a run.
pub const MAX_REPEAT: u64 = 1_000_000;

/// Why a line is not valid.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ScriptError {
    /// The line does not follow the grammar (quotes, `$(...)`, directive arguments).
    #[error("{0}")]
    Syntax(String),
    /// clap refused the command; the message is clap's, without its `error: ` prefix.
    #[error("{0}")]
    Usage(String),
}

fn syntax(message: impl Into<String>) -> ScriptError {
    ScriptError::Syntax(message.into())
}

/// A line after stage 1: either a wrapper whose body is kept raw, or a line to expand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefixed<'a> {
    /// `repeat N LINE`.
    Repeat { count: u64, body: &'a str },
    /// `bg LINE`.
    Background { body: &'a str },
    /// Anything else.
    Plain(&'a str),
}

/// Recognise `repeat N LINE` and `bg LINE` before expansion.
///
/// # Errors
/// A `repeat` without a count in 1..=[`MAX_REPEAT`], or either word without a LINE.
pub fn split_prefix(line: &str) -> Result<Prefixed<'_>, ScriptError> {
    let trimmed = line.trim_start();
    let (first, rest) = split_word(trimmed);
    match first {
        "repeat" => {
            let (count, body) = split_word(rest.trim_start());
            let count: u64 = count
                .parse()
                .ok()
                .filter(|n| (1..=MAX_REPEAT).contains(n))
                .ok_or_else(|| {
                    syntax(format!(
                        "repeat needs a count from 1 to {MAX_REPEAT} and a line: repeat N LINE"
                    ))
                })?;
            let body = body.trim();
            if body.is_empty() || body.starts_with('#') {
                return Err(syntax("repeat needs a line to repeat: repeat N LINE"));
            }
            Ok(Prefixed::Repeat { count, body })
        }
        "bg" => {
            let body = rest.trim();
            if body.is_empty() || body.starts_with('#') {
                return Err(syntax("bg needs a line to run in the background: bg LINE"));
            }
            Ok(Prefixed::Background { body })
        }
        _ => Ok(Prefixed::Plain(line)),
    }
}

/// The first whitespace-separated word of `s` and the rest after it.
fn split_word(s: &str) -> (&str, &str) {
    match s.find(char::is_whitespace) {
        Some(end) => s.split_at(end),
        None => (s, ""),
    }
}

/// A piece of a scanned line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text copied as it is (quotes and escapes included; shlex removes them later).
    Text(String),
    /// `$NAME`; `quoted` when it stands inside double quotes.
    Var { name: String, quoted: bool },
    /// `$(WORDS)`; the inner text is itself a line, scanned and expanded before it is called.
    Subst { inner: String, quoted: bool },
}

impl Piece {
    /// Whether this piece must be resolved before the line can run.
    pub fn is_reference(&self) -> bool {
        !matches!(self, Piece::Text(_))
    }
}

/// Split `line` into text and references, dropping a `# comment`.
///
/// A `#` starts a comment where a shell would: at the start of a word, outside quotes.
///
/// # Errors
/// An unterminated `$(`.
pub fn scan(line: &str) -> Result<Vec<Piece>, ScriptError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Quote {
        None,
        Single,
        Double,
    }
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut quote = Quote::None;
    let mut chars = line.char_indices().peekable();
    let mut at_word_start = true;
    while let Some((at, c)) = chars.next() {
        let word_start = at_word_start;
        at_word_start = c.is_whitespace() && quote == Quote::None;
        match (quote, c) {
            (Quote::None, '#') if word_start => break,
            (Quote::None, '\'') => {
                quote = Quote::Single;
                text.push(c);
            }
            (Quote::Single, '\'') => {
                quote = Quote::None;
                text.push(c);
            }
            (Quote::None, '"') => {
                quote = Quote::Double;
                text.push(c);
            }
            (Quote::Double, '"') => {
                quote = Quote::None;
                text.push(c);
            }
            (Quote::None | Quote::Double, '\\') => {
                // Keep the escape for shlex, and never treat the next character as special.
                text.push(c);
                if let Some((_, next)) = chars.next() {
                    text.push(next);
                }
            }
            (Quote::None | Quote::Double, '$') => {
                let quoted = quote == Quote::Double;
                let rest = &line[at + 1..];
                if let Some(after_paren) = rest.strip_prefix('(') {
                    let inner_len = matching_paren(after_paren)
                        .ok_or_else(|| syntax("unterminated $( ... ): expected a closing )"))?;
                    let inner = &after_paren[..inner_len];
                    flush(&mut pieces, &mut text);
                    pieces.push(Piece::Subst {
                        inner: inner.to_string(),
                        quoted,
                    });
                    // Skip `(`, the inner text and `)`.
                    let skip_to = at + 1 + inner_len + 2;
                    while chars.peek().is_some_and(|&(i, _)| i < skip_to) {
                        chars.next();
                    }
                } else {
                    let name_len = variable_name_len(rest);
                    if name_len == 0 {
                        text.push(c);
                    } else {
                        flush(&mut pieces, &mut text);
                        pieces.push(Piece::Var {
                            name: rest[..name_len].to_string(),
                            quoted,
                        });
                        for _ in 0..name_len {
                            chars.next();
                        }
                    }
                }
            }
            _ => text.push(c),
        }
    }
    flush(&mut pieces, &mut text);
    Ok(pieces)
}

fn flush(pieces: &mut Vec<Piece>, text: &mut String) {
    if !text.is_empty() {
        pieces.push(Piece::Text(std::mem::take(text)));
    }
}

/// Length of the text up to (not including) the `)` that closes an already opened `(`.
fn matching_paren(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (at, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some(at),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// Length of the variable name at the start of `s`: a letter or `_`, then letters, digits, `_`.
fn variable_name_len(s: &str) -> usize {
    let mut len = 0;
    for (at, c) in s.char_indices() {
        let ok = c == '_' || c.is_ascii_alphabetic() || (at > 0 && c.is_ascii_digit());
        if !ok {
            break;
        }
        len = at + c.len_utf8();
    }
    len
}

/// Whether `name` is a valid variable name.
pub fn is_variable_name(name: &str) -> bool {
    !name.is_empty() && variable_name_len(name) == name.len()
}

/// Put a scanned line back together, with `values[k]` standing for the k-th reference.
///
/// A value is quoted so that it stays one word: shell-quoted outside quotes, backslash-escaped
/// inside double quotes.
///
/// # Errors
/// Fewer values than references, or a value shlex cannot quote (one with a NUL byte).
pub fn assemble(pieces: &[Piece], values: &[String]) -> Result<String, ScriptError> {
    let mut values = values.iter();
    let mut line = String::new();
    for piece in pieces {
        let quoted = match piece {
            Piece::Text(text) => {
                line.push_str(text);
                continue;
            }
            Piece::Var { quoted, .. } | Piece::Subst { quoted, .. } => *quoted,
        };
        let value = values
            .next()
            .ok_or_else(|| syntax("internal: a reference has no value"))?;
        if quoted {
            for c in value.chars() {
                if matches!(c, '"' | '\\' | '$' | '`') {
                    line.push('\\');
                }
                line.push(c);
            }
        } else {
            let word = shlex::try_quote(value)
                .map_err(|_| syntax("a substituted value contains a NUL byte"))?;
            line.push_str(&word);
        }
    }
    Ok(line)
}

/// Split an expanded line into words with shell quoting rules.
///
/// # Errors
/// An unterminated quote or a trailing backslash.
pub fn split_words(line: &str) -> Result<Vec<String>, ScriptError> {
    shlex::split(line)
        .ok_or_else(|| syntax("unbalanced quotes or a trailing backslash in the line"))
}

/// One thing to do, parsed from the words of an expanded line.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A blank line or a comment.
    Nothing,
    /// A cluster command; with `may_fail` (`try COMMAND`), an error does not stop a script.
    Cluster {
        command: Box<Command>,
        may_fail: bool,
    },
    /// Text clap produced for `COMMAND --help`, to print.
    Show(String),
    /// `sleep DURATION`.
    Sleep(Duration),
    /// `expect get KEY VALUE`.
    ExpectGet { key: String, value: String },
    /// `expect missing KEY`.
    ExpectMissing { key: String },
    /// `wait healthy [TIMEOUT]`.
    WaitHealthy { timeout: Duration },
    /// `wait state NODE STATE [TIMEOUT]`.
    WaitState {
        node: NodeId,
        state: NodeState,
        timeout: Duration,
    },
    /// `wait bg [TIMEOUT]`.
    WaitBackground { timeout: Duration },
    /// `let NAME = VALUE`.
    Let { name: String, value: String },
    /// `echo TEXT`.
    Echo(String),
    /// `help [TOPIC...]`.
    Help(Vec<String>),
    /// `exit` or `quit`.
    Exit,
}

/// Turn the words of an expanded line into a [`Step`].
///
/// # Errors
/// A directive with wrong arguments, or a command clap refuses (with clap's message).
pub fn parse_step(words: &[String]) -> Result<Step, ScriptError> {
    let Some(first) = words.first() else {
        return Ok(Step::Nothing);
    };
    let args = &words[1..];
    let words_of = |n: usize| args.iter().take(n).map(String::as_str).collect::<Vec<_>>();
    match first.as_str() {
        "sleep" => match args {
            [duration] => Ok(Step::Sleep(parse_duration(duration).map_err(syntax)?)),
            _ => Err(syntax("usage: sleep DURATION, e.g. sleep 500ms")),
        },
        "expect" => match words_of(3).as_slice() {
            ["get", ..] => match args {
                [_, key, value] => Ok(Step::ExpectGet {
                    key: key.clone(),
                    value: value.clone(),
                }),
                _ => Err(syntax(
                    "usage: expect get KEY VALUE (quote a VALUE with spaces)",
                )),
            },
            ["missing", ..] => match args {
                [_, key] => Ok(Step::ExpectMissing { key: key.clone() }),
                _ => Err(syntax("usage: expect missing KEY")),
            },
            _ => Err(syntax("usage: expect get KEY VALUE, or expect missing KEY")),
        },
        "wait" => parse_wait(args),
        "let" => match args {
            [name, eq, value @ ..] if eq == "=" && !value.is_empty() => {
                if !is_variable_name(name) {
                    return Err(syntax(format!(
                        "{name:?} is not a variable name (letters, digits and _, not starting \
                         with a digit)"
                    )));
                }
                Ok(Step::Let {
                    name: name.clone(),
                    value: value.join(" "),
                })
            }
            _ => Err(syntax("usage: let NAME = VALUE")),
        },
        "echo" => Ok(Step::Echo(args.join(" "))),
        "help" => Ok(Step::Help(args.to_vec())),
        "exit" | "quit" if args.is_empty() => Ok(Step::Exit),
        "exit" | "quit" => Err(syntax(format!("usage: {first} (it takes no arguments)"))),
        "try" => match parse_command(args)? {
            Step::Cluster { command, .. } => Ok(Step::Cluster {
                command,
                may_fail: true,
            }),
            Step::Nothing => Err(syntax("usage: try COMMAND")),
            other => Ok(other),
        },
        "repeat" | "bg" => Err(syntax(format!(
            "{first} must start its line: {first} ... cannot follow another word"
        ))),
        _ => parse_command(words),
    }
}

fn parse_wait(args: &[String]) -> Result<Step, ScriptError> {
    let timeout = |arg: Option<&String>| match arg {
        Some(text) => parse_duration(text).map_err(syntax),
        None => Ok(DEFAULT_WAIT_TIMEOUT),
    };
    let usage = || {
        syntax(
            "usage: wait healthy [TIMEOUT], wait state NODE STATE [TIMEOUT], or wait bg [TIMEOUT]",
        )
    };
    let (what, rest) = args.split_first().ok_or_else(usage)?;
    match (what.as_str(), rest) {
        ("healthy", [] | [_]) => Ok(Step::WaitHealthy {
            timeout: timeout(rest.first())?,
        }),
        ("bg", [] | [_]) => Ok(Step::WaitBackground {
            timeout: timeout(rest.first())?,
        }),
        ("state", [node, state, more @ ..]) if more.len() <= 1 => {
            let node: NodeId = node
                .parse()
                .map_err(|_| syntax(format!("{node:?} is not a node id (like 3 or n3)")))?;
            let state: NodeState = state.parse().map_err(syntax)?;
            Ok(Step::WaitState {
                node,
                state,
                timeout: timeout(more.first())?,
            })
        }
        _ => Err(usage()),
    }
}

/// Parse a cluster command with the one-shot commands' clap definition.
fn parse_command(words: &[String]) -> Result<Step, ScriptError> {
    if words.is_empty() {
        return Ok(Step::Nothing);
    }
    match parse_words(words) {
        Ok(command) => Ok(Step::Cluster {
            command: Box::new(command),
            may_fail: false,
        }),
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            Ok(Step::Show(err.render().to_string()))
        }
        Err(err) => {
            let rendered = err.render().to_string();
            // In multicall mode clap's generic tail ("Usage: <COMMAND>", "try 'help'") says
            // nothing useful; a command's own usage line stays.
            let message: Vec<&str> = rendered
                .trim_end()
                .lines()
                .filter(|l| *l != "Usage: <COMMAND>" && !l.starts_with("For more information"))
                .collect();
            let message = message.join("\n");
            let message = message.trim_end();
            let message = message.strip_prefix("error: ").unwrap_or(message);
            Err(ScriptError::Usage(message.to_string()))
        }
    }
}

/// Parse a line with no references all the way to a [`Step`]; `Ok(None)` when the line has
/// references and can only be parsed once they are resolved.
///
/// # Errors
/// Whatever [`scan`], [`split_words`] or [`parse_step`] finds wrong with it.
pub fn parse_static(line: &str) -> Result<Option<Step>, ScriptError> {
    let pieces = scan(line)?;
    if pieces.iter().any(Piece::is_reference) {
        return Ok(None);
    }
    let text = assemble(&pieces, &[])?;
    parse_step(&split_words(&text)?).map(Some)
}

/// Check every line of a script that can be checked without running it.
///
/// # Errors
/// The first bad line's number (from 1) and what is wrong with it.
pub fn validate(script: &str) -> Result<(), (usize, ScriptError)> {
    for (index, line) in script.lines().enumerate() {
        validate_line(line).map_err(|e| (index + 1, e))?;
    }
    Ok(())
}

fn validate_line(line: &str) -> Result<(), ScriptError> {
    match split_prefix(line)? {
        Prefixed::Repeat { body, .. } | Prefixed::Background { body } => validate_line(body),
        Prefixed::Plain(line) => parse_static(line).map(|_| ()),
    }
}

/// The words of the substitution `$(replica KEY N)`: the key and the index from 1.
///
/// # Errors
/// Anything else, with the forms that exist.
pub fn parse_substitution(words: &[String]) -> Result<(String, usize), ScriptError> {
    match words {
        [function, key, n] if function == "replica" => {
            let n: usize = n.parse().ok().filter(|&n| n >= 1).ok_or_else(|| {
                syntax(format!("$(replica KEY N): N must be 1 or more, not {n:?}"))
            })?;
            Ok((key.clone(), n))
        }
        _ => Err(syntax(format!(
            "unknown substitution $({}): the one there is is $(replica KEY N)",
            words.join(" ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::NodeCommand;

    fn step(line: &str) -> Result<Step, ScriptError> {
        parse_static(line).map(|s| s.expect("no references"))
    }

    fn text(s: &str) -> Piece {
        Piece::Text(s.into())
    }

    #[test]
    fn comments_and_blank_lines_do_nothing() {
        for line in ["", "   ", "# a comment", "   # indented", "#"] {
            assert_eq!(step(line), Ok(Step::Nothing), "{line:?}");
        }
    }

    #[test]
    fn trailing_comments_are_dropped_but_not_inside_words_or_quotes() {
        assert_eq!(
            step("put k v  # note").unwrap(),
            Step::Cluster {
                command: Box::new(Command::Put {
                    key: "k".into(),
                    value: "v".into()
                }),
                may_fail: false
            }
        );
        assert_eq!(
            step("put k a#b").unwrap(),
            Step::Cluster {
                command: Box::new(Command::Put {
                    key: "k".into(),
                    value: "a#b".into()
                }),
                may_fail: false
            }
        );
        assert_eq!(
            step("put k '# not a comment'").unwrap(),
            Step::Cluster {
                command: Box::new(Command::Put {
                    key: "k".into(),
                    value: "# not a comment".into()
                }),
                may_fail: false
            }
        );
    }

    #[test]
    fn commands_use_the_clap_grammar_with_quoting() {
        assert_eq!(
            step("put greeting \"hello world\"").unwrap(),
            Step::Cluster {
                command: Box::new(Command::Put {
                    key: "greeting".into(),
                    value: "hello world".into()
                }),
                may_fail: false
            }
        );
        assert_eq!(
            step("node kill n3").unwrap(),
            Step::Cluster {
                command: Box::new(Command::Node(NodeCommand::Kill { id: NodeId(3) })),
                may_fail: false
            }
        );
        assert_eq!(
            step("try node pause 2").unwrap(),
            Step::Cluster {
                command: Box::new(Command::Node(NodeCommand::Pause { id: NodeId(2) })),
                may_fail: true
            }
        );
        let err = step("frobnicate now").unwrap_err();
        assert!(
            matches!(err, ScriptError::Usage(ref m) if m.contains("frobnicate")),
            "{err:?}"
        );
        assert!(step("put onlykey").is_err());
        assert!(step("put k 'unterminated").is_err());
        assert!(matches!(step("get --help"), Ok(Step::Show(ref help)) if help.contains("KEY")));
    }

    #[test]
    fn directives() {
        assert_eq!(
            step("sleep 250ms"),
            Ok(Step::Sleep(Duration::from_millis(250)))
        );
        assert!(step("sleep").is_err());
        assert!(step("sleep 5").is_err(), "a unit is required");
        assert_eq!(
            step("expect get k 'v 1'"),
            Ok(Step::ExpectGet {
                key: "k".into(),
                value: "v 1".into()
            })
        );
        assert_eq!(
            step("expect missing k"),
            Ok(Step::ExpectMissing { key: "k".into() })
        );
        assert!(step("expect get k").is_err());
        assert!(step("expect missing").is_err());
        assert!(step("expect nothing").is_err());
        assert_eq!(
            step("wait healthy"),
            Ok(Step::WaitHealthy {
                timeout: DEFAULT_WAIT_TIMEOUT
            })
        );
        assert_eq!(
            step("wait healthy 5s"),
            Ok(Step::WaitHealthy {
                timeout: Duration::from_secs(5)
            })
        );
        assert_eq!(
            step("wait state n2 down 10s"),
            Ok(Step::WaitState {
                node: NodeId(2),
                state: NodeState::Down,
                timeout: Duration::from_secs(10)
            })
        );
        assert_eq!(
            step("wait state 4 up"),
            Ok(Step::WaitState {
                node: NodeId(4),
                state: NodeState::Up,
                timeout: DEFAULT_WAIT_TIMEOUT
            })
        );
        assert_eq!(
            step("wait bg 1m"),
            Ok(Step::WaitBackground {
                timeout: Duration::from_secs(60)
            })
        );
        assert!(step("wait state 2 sleepy").is_err());
        assert!(step("wait state x up").is_err());
        assert!(step("wait healthy 5s extra").is_err());
        assert!(step("wait").is_err());
        assert_eq!(
            step("let who = someone else"),
            Ok(Step::Let {
                name: "who".into(),
                value: "someone else".into()
            })
        );
        assert!(step("let 1x = 2").is_err());
        assert!(step("let x 2").is_err());
        assert_eq!(step("echo hi  there"), Ok(Step::Echo("hi there".into())));
        assert_eq!(
            step("help node kill"),
            Ok(Step::Help(vec!["node".into(), "kill".into()]))
        );
        assert_eq!(step("exit"), Ok(Step::Exit));
        assert_eq!(step("quit"), Ok(Step::Exit));
        assert!(step("exit 3").is_err());
        assert!(step("try sleep 1s").is_err(), "try takes a cluster command");
        assert!(step("try").is_err());
    }

    #[test]
    fn references_are_scanned_outside_single_quotes() {
        assert_eq!(
            scan("node kill $victim").unwrap(),
            vec![
                text("node kill "),
                Piece::Var {
                    name: "victim".into(),
                    quoted: false
                }
            ]
        );
        assert_eq!(
            scan("put \"k$i\" '$i' $(replica k 1) # $ignored").unwrap(),
            vec![
                text("put \"k"),
                Piece::Var {
                    name: "i".into(),
                    quoted: true
                },
                text("\" '$i' "),
                Piece::Subst {
                    inner: "replica k 1".into(),
                    quoted: false
                },
                text(" "),
            ]
        );
        // Not references: a lone `$`, `$5`, an escaped `\$x`.
        assert_eq!(
            scan("put p $5 $ \\$x").unwrap(),
            vec![text("put p $5 $ \\$x")]
        );
        assert_eq!(
            scan("echo $(replica $(x) 1)").unwrap(),
            vec![
                text("echo "),
                Piece::Subst {
                    inner: "replica $(x) 1".into(),
                    quoted: false
                }
            ]
        );
        assert!(scan("echo $(replica k 1").is_err());
        assert_eq!(parse_static("node kill $victim"), Ok(None));
    }

    #[test]
    fn resolved_values_stay_one_word() {
        let pieces = scan("put $k \"x $v y\"").unwrap();
        let line = assemble(&pieces, &["a key".into(), "say \"hi\"".into()]).unwrap();
        assert_eq!(
            split_words(&line).unwrap(),
            ["put", "a key", "x say \"hi\" y"]
        );
        assert!(assemble(&pieces, &["only one".into()]).is_err());
        let pieces = scan("node kill $(replica k 1)").unwrap();
        assert_eq!(assemble(&pieces, &["3".into()]).unwrap(), "node kill 3");
    }

    #[test]
    fn prefixes_keep_their_body_raw() {
        assert_eq!(
            split_prefix("repeat 3 put k$i v$i").unwrap(),
            Prefixed::Repeat {
                count: 3,
                body: "put k$i v$i"
            }
        );
        assert_eq!(
            split_prefix("  bg repeat 2 get k").unwrap(),
            Prefixed::Background {
                body: "repeat 2 get k"
            }
        );
        assert_eq!(split_prefix("get k").unwrap(), Prefixed::Plain("get k"));
        assert_eq!(
            split_prefix("repeated k").unwrap(),
            Prefixed::Plain("repeated k")
        );
        for bad in [
            "repeat",
            "repeat 0 get k",
            "repeat x get k",
            "repeat 3",
            "bg",
            "bg # c",
        ] {
            assert!(split_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(step("echo repeat").is_ok());
        assert!(step("try repeat 2 get k").is_err());
    }

    #[test]
    fn substitutions() {
        let words = |s: &str| split_words(s).unwrap();
        assert_eq!(
            parse_substitution(&words("replica k 2")),
            Ok(("k".into(), 2))
        );
        assert!(parse_substitution(&words("replica k 0")).is_err());
        assert!(parse_substitution(&words("replica k")).is_err());
        assert!(parse_substitution(&words("nodes")).is_err());
    }

    #[test]
    fn validation_names_the_first_bad_line() {
        let script =
            "put a 1\n# fine\nexpect get a 1\nnode kill $(replica a 1)\nwait state 2 lost\n";
        let (line, err) = validate(script).unwrap_err();
        assert_eq!(line, 5);
        assert!(err.to_string().contains("unknown node state"), "{err}");
        assert!(validate("repeat 2 frobnicate\n").is_err());
        assert!(validate("repeat 2 put k$i v\nbg repeat 5 put a b\nwait bg\n").is_ok());
    }

    #[test]
    fn the_help_example_is_valid() {
        let example = LANGUAGE_HELP
            .split("Example")
            .nth(1)
            .and_then(|s| s.split_once('\n'))
            .map(|(_, body)| body)
            .unwrap();
        assert!(example.lines().count() >= 5);
        validate(example).unwrap();
    }
}
