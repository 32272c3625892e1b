//! `ringkv chaos` end to end: a run under kill, pause and coordinator-kill must pass, and a
//! build with a deliberately broken read path must fail one.

mod broken_build;
mod faults;
mod util;
