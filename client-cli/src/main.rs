//! The `ringkv` binary: parse the arguments, run one command, print its result, exit.
//!
//! Exit codes are in [`ringkv_cli::commands::exit`] and listed in `ringkv --help`.

use std::io::{self, Read, Write};
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use ringkv_cli::cli::Cli;
use ringkv_cli::commands::{self, error_exit_code, exit};
use ringkv_cli::output::{render, ErrorReport};
use ringkv_common::protocol::MAX_VALUE_LEN;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let json = cli.global.json;
    let Some(command) = cli.command else {
        return ExitCode::from(ringkv_cli::shell::main(&cli.global));
    };
    if let ringkv_cli::cli::Command::Run { script } = &command {
        return ExitCode::from(ringkv_cli::runner::main(&cli.global, script));
    }
    if let ringkv_cli::cli::Command::Bench(args) = &command {
        return bench(args, &cli.global);
    }
    if let ringkv_cli::cli::Command::Chaos(args) = &command {
        return ringkv_cli::chaos::main(args.clone(), &cli.global);
    }

    let stdin_value = if command.reads_stdin() {
        match read_stdin() {
            Ok(value) => Some(value),
            Err(e) => {
                let report = ErrorReport::input(format!("cannot read the value from stdin: {e}"));
                return fail(&report, json, exit::USAGE);
            }
        }
    } else {
        None
    };

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let report =
                ErrorReport::new("internal", format!("cannot start the async runtime: {e}"));
            return fail(&report, json, exit::FAILED);
        }
    };
    let global = &cli.global;
    let result = runtime.block_on(async {
        let client = commands::connect(&global.coordinator, global.timeout).await?;
        let progress = ringkv_cli::progress::ProgressMode::detect();
        ringkv_cli::progress::execute(&client, &command, global.timeout, stdin_value, progress)
            .await
    });

    match result {
        Ok(outcome) => match write_stdout(&render(&outcome, json)) {
            Ok(()) => ExitCode::from(outcome.exit_code()),
            Err(e) => {
                let _ = writeln!(io::stderr(), "error: output: {e}");
                ExitCode::from(exit::FAILED)
            }
        },
        Err(err) => fail(&ErrorReport::from(&err), json, error_exit_code(&err)),
    }
}

/// `ringkv bench`: run the load, print the report; exit 1 if any operation failed.
fn bench(args: &ringkv_cli::bench::BenchArgs, global: &ringkv_cli::cli::GlobalArgs) -> ExitCode {
    use ringkv_cli::bench::{run_blocking, BenchError};
    match run_blocking(args, &global.coordinator, global.timeout) {
        Ok(report) => {
            let text = if global.json {
                report.json()
            } else {
                report.human()
            };
            if let Err(e) = write_stdout(text.as_bytes()) {
                let _ = writeln!(io::stderr(), "error: output: {e}");
                return ExitCode::from(exit::FAILED);
            }
            match report.error_total {
                0 => ExitCode::SUCCESS,
                _ => ExitCode::from(exit::FAILED),
            }
        }
        Err(err) => {
            let code = match err {
                BenchError::Usage(_) => exit::USAGE,
                BenchError::Connect(_) => exit::CONNECTION,
                BenchError::Preload { .. } | BenchError::Runtime(_) => exit::FAILED,
            };
            let report = ErrorReport::new(err.class(), err.to_string());
            fail(&report, global.json, code)
        }
    }
}

/// Print a clap error (or the help or version it stands for) and pick the exit code.
fn usage_error(err: clap::Error) -> ExitCode {
    // `--help` and `--version` arrive as "errors" that belong on stdout with status 0.
    if !err.use_stderr() {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    // Parsing failed, so whether `--json` was given is only known from the raw arguments.
    if std::env::args_os().any(|arg| arg == "--json") {
        let message = usage_message(&err.render().to_string());
        let _ = write_stdout(&ErrorReport::usage(message).json());
    }
    let _ = err.print();
    ExitCode::from(exit::USAGE)
}

/// clap's rendered error on one line, without its usage and help hints: every line before
/// `Usage:`, e.g. "the following required arguments were not provided: <KEY>".
fn usage_message(rendered: &str) -> String {
    let lines: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.starts_with("Usage:"))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let joined = lines.join(" ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .to_string()
}

/// Report `report` on stderr (and as JSON on stdout with `--json`) and exit with `code`.
fn fail(report: &ErrorReport, json: bool, code: u8) -> ExitCode {
    if json {
        let _ = write_stdout(&report.json());
    }
    let _ = io::stderr().write_all(report.stderr_line().as_bytes());
    ExitCode::from(code)
}

/// Read the whole of stdin, stopping one byte past the value limit so a huge input cannot
/// exhaust memory; `execute` then refuses the oversized value.
fn read_stdin() -> io::Result<Bytes> {
    let mut value = Vec::new();
    io::stdin()
        .lock()
        .take(MAX_VALUE_LEN as u64 + 1)
        .read_to_end(&mut value)?;
    Ok(Bytes::from(value))
}

/// Write `bytes` to stdout; a reader that went away (`ringkv get k | head -c1`) is not an error.
fn write_stdout(bytes: &[u8]) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usage_error_keeps_what_is_missing_and_drops_the_hints() {
        let rendered = "error: the following required arguments were not provided:\n  <KEY>\n\n\
                        Usage: ringkv get <KEY>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_message(rendered),
            "the following required arguments were not provided: <KEY>"
        );
        assert_eq!(
            usage_message("error: unexpected argument 'x' found\n\nUsage: ringkv\n"),
            "unexpected argument 'x' found"
        );
    }
}
