//! `ringkv`, the command-line client of RingKV.
//!
//! # Layout
//! - [`cli`]: the clap definitions. [`cli::Cli`] is the process's argv (global flags and an
//!   optional command); [`cli::Command`] is one operation, and [`cli::parse_words`] parses a
//!   shell or script line into the same enum.
//! - [`commands`]: [`commands::execute`] runs a [`cli::Command`] over a
//!   [`ringkv_common::client::Client`] and returns a typed [`commands::Outcome`]; it also owns
//!   the exit codes ([`commands::exit`]).
//! - [`output`]: [`output::render`] turns an outcome into human text or one line of JSON, and
//!   [`output::ErrorReport`] does the same for errors.
//! - [`bench`]: `ringkv bench`, the load generator for RingKV and, with `--redis`, for Redis.
//! - [`chaos`]: `ringkv chaos`, concurrent clients under injected faults, and the checkers
//!   (lost writes, per-key linearizability, replica audit) that judge their history.
//! - The shell and scripts: [`shell`] (`ringkv` with no command), [`runner`] (`ringkv run`),
//!   both driving an [`interpreter::Interpreter`] that runs lines parsed by [`script`] over a
//!   [`session::Session`] (a connection remade when it breaks); [`progress`] shows background
//!   work a command waits on, [`help`] and [`completion`] serve the shell's `help` and tab.
//!
//! `main.rs` only glues these together: parse, read stdin for `put KEY -`, connect, execute,
//! print, exit. `cli`, `commands` and `output` never print or touch the process, so the
//! interactive shell and the script runner reuse all of it; printing belongs to the front ends
//! (`shell`, `runner`, the `interpreter` they share, and `progress`).

pub mod bench;
pub mod chaos;
pub mod cli;
pub mod commands;
pub mod completion;
pub mod help;
pub mod interpreter;
pub mod output;
pub mod progress;
pub mod runner;
pub mod script;
pub mod session;
pub mod shell;
