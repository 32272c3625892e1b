//! The async runtime the server binaries (coordinator and node) run on, and how many worker
//! threads it gets.
//!
//! A coordinator and the nodes it spawns share one machine, and every request crosses
//! processes, so a worker that is woken for one message competes for a core with the process
//! that sent it. Each extra worker adds wake-ups between threads and steals; on two cores one
//! worker per server process costs measurably less CPU per request (`bench/README.md`).

use std::num::NonZeroUsize;

/// Worker threads when no flag says otherwise: half the machine's cores, at least one, so
/// that a server leaves the rest to the processes it talks to.
pub fn default_worker_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    (cores / 2).max(1)
}

/// A multi-threaded runtime with `workers` worker threads (the thread that blocks on the
/// main future runs it too), timers and I/O enabled.
pub fn server_runtime(workers: usize, name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name(name)
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_leaves_cores_to_the_other_processes_but_never_zero() {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let workers = default_worker_threads();
        assert!(workers >= 1);
        assert!(
            workers == 1 || workers < cores,
            "{workers} of {cores} cores"
        );
    }

    #[test]
    fn runtime_runs_spawned_tasks_on_its_workers() {
        let rt = server_runtime(1, "test-worker").unwrap();
        let name = rt.block_on(async {
            tokio::spawn(async { std::thread::current().name().map(str::to_string) })
                .await
                .unwrap()
        });
        assert_eq!(name.as_deref(), Some("test-worker"));
    }
}
