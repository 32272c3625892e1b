//! `ringkv run SCRIPT`: run a script file and turn its result into an exit code.
//!
//! The work is [`Interpreter::run_file`]; this adds the process's side: a runtime, the final
//! `OK` line, and the failure report `line 7: expected ..., got ...` on stderr.

use std::path::Path;
use std::time::Instant;

use crate::cli::GlobalArgs;
use crate::commands::exit;
use crate::interpreter::Interpreter;
use crate::progress::ProgressMode;
use crate::session::{session_runtime, Session};

/// Run the script at `path` against the coordinator in `global`; returns the exit code.
pub fn main(global: &GlobalArgs, path: &Path) -> u8 {
    let Some(runtime) = session_runtime(&mut tokio::runtime::Builder::new_current_thread()) else {
        return exit::FAILED;
    };
    let session = Session::new(&global.coordinator, global.timeout);
    let mut interpreter = Interpreter::new(session, global.json, ProgressMode::detect());
    let started = Instant::now();
    match runtime.block_on(interpreter.run_file(path)) {
        Ok(()) => {
            println!(
                "OK: {} passed in {:.1}s",
                path.display(),
                started.elapsed().as_secs_f64()
            );
            exit::OK
        }
        Err(err) => {
            // An unhealthy `check` printed its report already; still name the line.
            eprintln!("{}: {err}", path.display());
            err.exit_code()
        }
    }
}
