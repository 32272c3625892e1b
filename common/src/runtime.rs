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

/// The runtime for `workers` async workers, timers and I/O enabled. One worker is a
/// single-threaded runtime: the thread that blocks on the main future runs every task.
/// Against a multi-threaded runtime with one worker, it parked in `epoll_wait` about a
/// quarter less often per request at the same load, and served more requests per second
/// in alternating runs, most of all without pipelining (`bench/README.md`). More workers
/// get the multi-threaded runtime, with `name` for their threads.
pub fn server_runtime(workers: usize, name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        return tokio::runtime::Builder::new_current_thread()
            .thread_name(name)
            .enable_all()
            .build();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
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

    /// The name of the thread a task spawned on `rt` runs on.
    fn spawned_task_thread(rt: &tokio::runtime::Runtime) -> Option<String> {
        rt.block_on(async {
            tokio::spawn(async { std::thread::current().name().map(str::to_string) })
                .await
                .unwrap()
        })
    }

    #[test]
    fn one_worker_runs_every_task_on_the_thread_that_blocks_on_the_runtime() {
        let rt = server_runtime(1, "test-worker").unwrap();
        let here = std::thread::current().name().map(str::to_string);
        assert_eq!(spawned_task_thread(&rt), here);
        let flavor = tokio::runtime::RuntimeFlavor::CurrentThread;
        assert_eq!(rt.handle().runtime_flavor(), flavor);
    }

    #[test]
    fn more_workers_run_spawned_tasks_on_named_worker_threads() {
        let rt = server_runtime(2, "test-worker").unwrap();
        assert_eq!(spawned_task_thread(&rt).as_deref(), Some("test-worker"));
        let flavor = tokio::runtime::RuntimeFlavor::MultiThread;
        assert_eq!(rt.handle().runtime_flavor(), flavor);
    }
}
