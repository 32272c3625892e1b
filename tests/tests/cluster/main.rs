//! Integration tests against real processes: one test binary, one module per capability.

mod bad_input;
mod basics;
mod batch;
mod crash;
mod data_dir;
mod deletes;
mod failures;
mod restart;
mod scan;
