//! The `ringkv` command line, as clap derive types.
//!
//! Two layers, kept apart on purpose:
//! - [`Cli`] is the process's argv: the [`GlobalArgs`] (where the coordinator is, `--json`,
//!   `--timeout`) and an optional [`Command`].
//! - [`Command`] is one operation against the cluster. It knows nothing about flags or the
//!   process, so the interactive shell and the script runner parse each of their lines into the
//!   same enum with [`parse_words`] (clap's `multicall` mode: the first word is the command).
//!
//! Parsing does no I/O: `put KEY -` only records that the value comes from stdin
//! ([`Command::reads_stdin`]); the caller reads it.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ringkv_common::{NodeId, DEFAULT_COORDINATOR_ADDR};

/// The `--help` epilogue of the top-level command; keep in sync with [`crate::commands::exit`].
const TOP_AFTER_HELP: &str = "\
Examples:
  ringkv put user:1 alice
  ringkv get user:1
  ringkv --json status
  cat photo.jpg | ringkv put photo -
  RINGKV_COORDINATOR=10.0.0.5:7400 ringkv check
  ringkv                              # the interactive shell
  ringkv run examples/scenarios/kill-while-writing.ringkv

Exit codes:
  0  success
  1  the coordinator answered with an error (unavailable, indeterminate, not_found, ...),
     or `check` found keys that are not healthy
  2  usage error: bad arguments, or the value could not be read from stdin
  3  no usable connection: cannot connect (or the protocol versions differ), the connection
     was lost, or no answer within --timeout

A failed write may still have taken effect (may_have_applied): after indeterminate,
internal, timeout or connection_lost, read the key before writing it again.

With --json, stdout holds exactly one JSON document: the result, or
{\"error\":{\"class\":CLASS,\"message\":MESSAGE,\"may_have_applied\":BOOL}} on failure.
Errors also go to stderr.";

/// The `ringkv` process's arguments.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(
    name = "ringkv",
    version,
    about = "Client for RingKV, a sharded, replicated key-value store",
    long_about = "Client for RingKV, a sharded, replicated key-value store.\n\n\
                  Each command opens one connection to the coordinator, runs, prints its result \
                  and exits. Keys and values are byte strings; they are given here as text, and \
                  `put KEY -` reads a binary-safe value from stdin.\n\n\
                  Without a command, `ringkv` opens an interactive shell (history, completion, \
                  `help`); with standard input not a terminal, the shell reads one command a line.",
    after_help = TOP_AFTER_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    /// The command to run; without one, `ringkv` opens the interactive shell.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Flags that apply to every command; they may appear before or after the command name.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct GlobalArgs {
    /// Address of the coordinator (HOST:PORT).
    #[arg(
        long,
        env = "RINGKV_COORDINATOR",
        default_value = DEFAULT_COORDINATOR_ADDR,
        value_name = "ADDR",
        global = true
    )]
    pub coordinator: String,

    /// Print each result as JSON instead of text: a command prints one document; in the shell
    /// and in scripts each command's result is one JSON line among the echoed steps.
    #[arg(long, global = true)]
    pub json: bool,

    /// How long to wait for each answer, e.g. `500ms`, `5s`, `2m`.
    #[arg(
        long,
        default_value = "10s",
        value_parser = parse_duration,
        value_name = "DURATION",
        global = true
    )]
    pub timeout: Duration,
}

/// One operation against the cluster; the shell and scripts parse their lines into this too.
#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum Command {
    /// Store VALUE under KEY; prints the version the write was given.
    #[command(after_help = "Examples:\n  ringkv put user:1 alice\n  \
                            printf 'line1\\nline2' | ringkv put notes -\n  \
                            ringkv put photo - < photo.jpg")]
    Put {
        /// The key.
        key: String,
        /// The value; `-` reads it from stdin, byte for byte, until EOF.
        value: String,
    },

    /// Print the value of KEY, or `(nil)` when it does not exist (still exit code 0).
    #[command(
        long_about = "Print the value of KEY, or `(nil)` when it does not exist (still exit code 0).\n\n\
                      Text values are printed followed by a newline; a value that is not valid \
                      UTF-8 is written to stdout byte for byte, without a newline.\n\n\
                      With --json: {\"key\":K,\"value\":V,\"version\":N}, where V is null when \
                      the key does not exist. A value that is not valid UTF-8 is shown with \
                      invalid sequences replaced by U+FFFD and an extra \"binary\":true; use the \
                      plain output to get its exact bytes.",
        after_help = "Examples:\n  ringkv get user:1\n  ringkv get photo > photo.jpg\n  \
                      ringkv --json get user:1"
    )]
    Get {
        /// The key.
        key: String,
    },

    /// Delete KEY; prints the version of the deletion.
    #[command(visible_alias = "delete", after_help = "Example:\n  ringkv del user:1")]
    Del {
        /// The key.
        key: String,
    },

    /// Show which nodes hold KEY and which version each holds.
    #[command(after_help = "Example:\n  ringkv locate user:1")]
    Locate {
        /// The key.
        key: String,
    },

    /// Show the nodes, key counts, replication health and running background jobs.
    #[command(after_help = "Examples:\n  ringkv status\n  ringkv --json status")]
    Status,

    /// List the storage nodes.
    #[command(after_help = "Example:\n  ringkv nodes")]
    Nodes,

    /// Add, remove or signal storage nodes.
    #[command(subcommand)]
    Node(NodeCommand),

    /// Verify that every key has its full count of replicas (--rf) on up nodes, all at the
    /// version the metadata names (like fsck).
    #[command(
        long_about = "Verify that every key has its full count of replicas (--rf, 3 by default) \
                      on nodes that are up, all at the version the metadata names (like \
                      fsck).\n\nExits 0 when every key is healthy and 1 otherwise, after \
                      printing how many keys are under-replicated, lost or stale.",
        after_help = "Examples:\n  ringkv check\n  ringkv check && echo consistent"
    )]
    Check,

    /// Run a script of commands, waits and expectations, for scripted failure injection.
    #[command(
        long_about = "Run a script of commands, waits and expectations, for scripted failure \
                      injection.\n\nEach line is echoed with its result. The script stops at \
                      the first line that fails and exits non-zero, naming the line.",
        after_help = crate::script::LANGUAGE_HELP
    )]
    Run {
        /// The script file (conventionally `*.ringkv`).
        script: std::path::PathBuf,
    },

    /// Measure throughput and latency under load (of RingKV, or of Redis with `--redis`).
    Bench(crate::bench::BenchArgs),

    /// Run concurrent clients while injecting faults, then check that no acknowledged write
    /// was lost and every key stayed linearizable (RingKV's own Jepsen).
    Chaos(crate::chaos::ChaosArgs),
}

/// What `node ...` does.
#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum NodeCommand {
    /// Spawn one more storage node; its share of keys migrates to it. Prints its id.
    #[command(after_help = "Example:\n  ringkv node add")]
    Add,

    /// Decommission a node: copy its keys away, then stop it.
    #[command(
        long_about = "Decommission a node: copy its keys away, then stop it.\n\n\
                      Waits until the decommission finishes (for at least 10 minutes, or \
                      --timeout if longer), showing the keys and bytes copied so far: a \
                      progress bar in a terminal, a plain line every second otherwise.\n\n\
                      After an unclean stop of a coordinator running with --meta-fsync never, \
                      reads wait until the nodes that may hold writes the metadata lost are \
                      reconciled, and such a node cannot be removed: start it again instead. \
                      If it is gone for good, --accept-loss removes it anyway.",
        after_help = "Examples:\n  ringkv node remove 3\n  \
                      ringkv node remove 4 --accept-loss   # gone for good; reads waited for it"
    )]
    Remove {
        /// The node's id, as `status` shows it (`3` or `n3`).
        id: NodeId,
        /// Remove it even if reads wait for its reconciliation after an unclean stop:
        /// acknowledged writes only it held are lost, and a read of such a key finds the
        /// version before.
        #[arg(long)]
        accept_loss: bool,
    },

    /// Kill a spawned node's process at once (SIGKILL), for failure testing.
    #[command(after_help = "Example:\n  ringkv node kill 2")]
    Kill {
        /// The node's id, as `status` shows it (`3` or `n3`).
        id: NodeId,
    },

    /// Freeze a spawned node's process (SIGSTOP): it stays connected but stops answering.
    #[command(after_help = "Example:\n  ringkv node pause 2 && sleep 5 && ringkv node resume 2")]
    Pause {
        /// The node's id, as `status` shows it (`3` or `n3`).
        id: NodeId,
    },

    /// Let a paused node carry on (SIGCONT).
    #[command(after_help = "Example:\n  ringkv node resume 2")]
    Resume {
        /// The node's id, as `status` shows it (`3` or `n3`).
        id: NodeId,
    },
}

impl Command {
    /// Whether this command's value must be read from stdin (`put KEY -`).
    pub fn reads_stdin(&self) -> bool {
        matches!(self, Command::Put { value, .. } if value == STDIN_VALUE)
    }
}

/// The VALUE that means "read the value from stdin".
pub const STDIN_VALUE: &str = "-";

/// A line of the shell or a script: the command name is the first word (clap `multicall`).
#[derive(Parser, Debug)]
#[command(multicall = true)]
struct Line {
    #[command(subcommand)]
    command: Command,
}

/// Parse one already-split line such as `["put", "k", "v"]` into a [`Command`].
///
/// # Errors
/// A clap error for an unknown command or bad arguments; `help` requests come back as an
/// error of kind `DisplayHelp` whose rendering is the help text.
pub fn parse_words<I, T>(words: I) -> Result<Command, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Line::try_parse_from(words).map(|line| line.command)
}

/// Parse a duration such as `500ms`, `5s`, `1.5s`, `2m` or `1h`; a unit is required.
///
/// # Errors
/// A message naming the accepted forms, for a missing unit, a bad number or zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let usage =
        || format!("invalid duration {s:?}: expected a number and a unit, like 500ms, 5s or 2m");
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(usage()),
    };
    let number: f64 = number.parse().map_err(|_| usage())?;
    let secs = number * scale;
    // Bounded well below Duration's limit so `from_secs_f64` cannot panic.
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(format!(
            "invalid duration {s:?}: must be above zero and below 1e9 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
        Line::command().debug_assert();
    }

    #[test]
    fn put_from_stdin_parses() {
        let cli = Cli::try_parse_from(["ringkv", "put", "k", "-"]).unwrap();
        let cmd = cli.command.unwrap();
        assert_eq!(
            cmd,
            Command::Put {
                key: "k".into(),
                value: "-".into()
            }
        );
        assert!(cmd.reads_stdin());
        let literal = Command::Put {
            key: "k".into(),
            value: "v".into(),
        };
        assert!(!literal.reads_stdin());
    }

    #[test]
    fn globals_default_and_may_follow_the_command() {
        // The env var is read at parse time, so only check the default when it is unset.
        if std::env::var_os("RINGKV_COORDINATOR").is_none() {
            let cli = Cli::try_parse_from(["ringkv", "status"]).unwrap();
            assert_eq!(cli.global.coordinator, DEFAULT_COORDINATOR_ADDR);
        }
        let cli = Cli::try_parse_from([
            "ringkv",
            "get",
            "k",
            "--json",
            "--timeout",
            "500ms",
            "--coordinator",
            "10.0.0.1:1",
        ])
        .unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.timeout, Duration::from_millis(500));
        assert_eq!(cli.global.coordinator, "10.0.0.1:1");
        let cli = Cli::try_parse_from(["ringkv", "status"]).unwrap();
        assert_eq!(cli.global.timeout, Duration::from_secs(10));
        assert!(!cli.global.json);
    }

    #[test]
    fn coordinator_comes_from_the_environment() {
        let arg = Cli::command()
            .get_arguments()
            .find(|a| a.get_id() == "coordinator")
            .cloned()
            .unwrap();
        assert_eq!(
            arg.get_env(),
            Some(std::ffi::OsStr::new("RINGKV_COORDINATOR"))
        );
        assert_eq!(
            arg.get_default_values(),
            [std::ffi::OsStr::new(DEFAULT_COORDINATOR_ADDR)]
        );
    }

    #[test]
    fn no_command_is_allowed() {
        let cli = Cli::try_parse_from(["ringkv", "--json"]).unwrap();
        assert_eq!(cli.command, None);
    }

    #[test]
    fn node_commands_parse_ids() {
        let cli = Cli::try_parse_from(["ringkv", "node", "kill", "n3"]).unwrap();
        assert_eq!(
            cli.command,
            Some(Command::Node(NodeCommand::Kill { id: NodeId(3) }))
        );
        let cli = Cli::try_parse_from(["ringkv", "node", "remove", "7"]).unwrap();
        assert_eq!(
            cli.command,
            Some(Command::Node(NodeCommand::Remove {
                id: NodeId(7),
                accept_loss: false
            }))
        );
        let cli = Cli::try_parse_from(["ringkv", "node", "remove", "7", "--accept-loss"]).unwrap();
        assert_eq!(
            cli.command,
            Some(Command::Node(NodeCommand::Remove {
                id: NodeId(7),
                accept_loss: true
            }))
        );
        assert!(Cli::try_parse_from(["ringkv", "node", "pause", "x"]).is_err());
        assert!(Cli::try_parse_from(["ringkv", "node", "resume"]).is_err());
    }

    #[test]
    fn del_has_a_delete_alias() {
        let cli = Cli::try_parse_from(["ringkv", "delete", "k"]).unwrap();
        assert_eq!(cli.command, Some(Command::Del { key: "k".into() }));
    }

    #[test]
    fn shell_lines_parse_into_the_same_enum() {
        assert_eq!(
            parse_words(["get", "k"]).unwrap(),
            Command::Get { key: "k".into() }
        );
        assert_eq!(
            parse_words(["node", "add"]).unwrap(),
            Command::Node(NodeCommand::Add)
        );
        assert!(parse_words(["frobnicate"]).is_err());
        let help = parse_words(["help"]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["5", "", "s", "0s", "-1s", "5x", "1e999s", "1..5s", "nan s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
        assert!(Cli::try_parse_from(["ringkv", "--timeout", "10", "status"]).is_err());
    }

    #[test]
    fn help_documents_the_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        for code in [
            "0  success",
            "1  the coordinator answered with an error",
            "2  usage",
            "3  no usable",
            "\"may_have_applied\":BOOL",
        ] {
            assert!(help.contains(code), "help lacks {code:?}");
        }
    }
}
