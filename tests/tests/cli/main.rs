//! Integration tests of the `ringkv` shell, scripts and scenarios against real processes.

mod scenarios;
mod scripts;
mod shell;
mod util;
