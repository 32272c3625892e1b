//! Finding local processes by their command line, for the tools that clean up after the
//! clusters they start (the test harness and `ringkv chaos`).

/// Pids of live processes, other than this one, whose command line (its NUL-separated
/// arguments, as `/proc/PID/cmdline` has it) satisfies `matches`. Empty where `/proc` is not
/// readable.
pub fn pids_where(matches: impl Fn(&[u8]) -> bool) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            if pid == me {
                return None;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            matches(&cmdline).then_some(pid)
        })
        .collect()
}

/// Whether `haystack` contains `needle` (an empty needle matches nothing).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_child_by_an_argument_and_never_itself() {
        // The marker is an argument `sleep` accepts (it adds the intervals up), so the child
        // stays alive until it is killed.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let marker = format!("0.{}{nanos}", std::process::id());
        let mut child = std::process::Command::new("sleep")
            .args(["30", &marker])
            .spawn()
            .expect("spawn sleep");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = Vec::new();
        while found.is_empty() && std::time::Instant::now() < deadline {
            found = pids_where(|cmdline| contains(cmdline, marker.as_bytes()));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let exited = child.try_wait().ok().flatten();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(exited, None, "the child exited early");
        assert_eq!(found, vec![child.id()]);
        assert!(pids_where(|_| true)
            .iter()
            .all(|&p| p != std::process::id()));
        assert!(!contains(b"abc", b""));
    }
}
