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
//!
//! `main.rs` only glues these together: parse, read stdin for `put KEY -`, connect, execute,
//! print, exit. Nothing below prints or touches the process, so the interactive shell and the
//! script runner reuse all of it.

pub mod cli;
pub mod commands;
pub mod output;
