//! The failure detector: from heartbeat times to `up`, `suspect` and `down`.
//!
//! Pure logic, no clocks of its own: the caller passes `now`. A node that has not been heard
//! from for `suspect_after` is suspect (no new replicas are placed on it); after `down_after`
//! it is down (its replicas are re-created elsewhere). A heartbeat brings it back up.

use std::time::{Duration, Instant};

use ringkv_common::NodeState;

/// Timeouts of the failure detector.
#[derive(Clone, Copy, Debug)]
pub struct DetectorConfig {
    pub suspect_after: Duration,
    pub down_after: Duration,
}

impl Default for DetectorConfig {
    /// With 250 ms heartbeats: suspect after three missed beats, down after six, so a dead
    /// node is declared down within 1.5 s plus one tick.
    fn default() -> Self {
        DetectorConfig {
            suspect_after: Duration::from_millis(750),
            down_after: Duration::from_millis(1500),
        }
    }
}

impl DetectorConfig {
    /// The state a node in `state`, last heard from at `last`, should be in at `now`.
    /// The detector only demotes (`up` -> `suspect` -> `down`); only a heartbeat or a
    /// registration brings a node back up. Other states change by explicit events.
    pub fn judge(&self, state: NodeState, last: Instant, now: Instant) -> NodeState {
        if !matches!(state, NodeState::Up | NodeState::Suspect) {
            return state;
        }
        let silent = now.saturating_duration_since(last);
        if silent >= self.down_after {
            NodeState::Down
        } else if silent >= self.suspect_after {
            NodeState::Suspect
        } else {
            state
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_leads_to_suspect_then_down() {
        let cfg = DetectorConfig::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(cfg.judge(NodeState::Up, t0, at(100)), NodeState::Up);
        assert_eq!(cfg.judge(NodeState::Up, t0, at(800)), NodeState::Suspect);
        assert_eq!(cfg.judge(NodeState::Suspect, t0, at(1600)), NodeState::Down);
        // Silence ending does not promote: only a heartbeat does.
        assert_eq!(
            cfg.judge(NodeState::Suspect, at(1000), at(1100)),
            NodeState::Suspect
        );
        // Down, leaving and removed only change by explicit events.
        assert_eq!(
            cfg.judge(NodeState::Down, at(1000), at(1000)),
            NodeState::Down
        );
        assert_eq!(
            cfg.judge(NodeState::Leaving, t0, at(9000)),
            NodeState::Leaving
        );
    }
}
