//! What tab completes in the shell, as a pure function of the words typed so far.
//!
//! Command names come from the clap definition (so new commands complete without changes
//! here) plus the shell's directives. Node ids are asked for only where an id goes (after
//! `node kill`, `wait state`, ...), through a callback, because fetching them costs a
//! `status` request. The shell's rustyline helper ([`crate::shell`]) finds the word under the
//! cursor and handles file names after `run`.

use clap::CommandFactory;

use crate::cli::Cli;
use crate::help::DIRECTIVES;

/// The `node` subcommands that take a node id.
const NODE_ID_COMMANDS: &[&str] = &["remove", "kill", "pause", "resume"];

/// The states `wait state NODE STATE` accepts.
const STATES: &[&str] = &["up", "suspect", "down", "leaving", "removed"];

/// Where the word being completed sits, which decides what fits there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// Words from a fixed list.
    Words(Vec<String>),
    /// A node id.
    NodeId,
    /// A file name (`run SCRIPT`).
    File,
    /// Free text (a key, a value) or nothing at all.
    Nothing,
}

/// What fits after the complete words `before`.
pub fn slot(before: &[&str]) -> Slot {
    let words = |list: &[&str]| Slot::Words(list.iter().map(|s| s.to_string()).collect());
    match before {
        [] => Slot::Words(command_names()),
        // Prefixes that take a whole line after them.
        ["try" | "bg" | "help", rest @ ..] if !matches!(before, ["help", _, ..]) => slot(rest),
        ["repeat", _count, rest @ ..] => slot(rest),
        ["repeat"] => Slot::Nothing,
        ["help", "node"] => Slot::Words(subcommand_names("node")),
        ["help", ..] => Slot::Nothing,
        ["node"] => Slot::Words(subcommand_names("node")),
        ["node", sub] if NODE_ID_COMMANDS.contains(sub) => Slot::NodeId,
        ["node", "remove", _] => words(&["--accept-loss"]),
        ["wait"] => words(&["healthy", "state", "bg"]),
        ["wait", "state"] => Slot::NodeId,
        ["wait", "state", _] => words(STATES),
        ["expect"] => words(&["get", "missing"]),
        ["run"] => Slot::File,
        _ => Slot::Nothing,
    }
}

/// The candidates for `partial` after the words `before`; `node_ids` is called only when an
/// id fits there.
pub fn candidates(
    before: &[&str],
    partial: &str,
    node_ids: impl FnOnce() -> Vec<String>,
) -> Vec<String> {
    let list = match slot(before) {
        Slot::Words(list) => list,
        Slot::NodeId => node_ids(),
        Slot::File | Slot::Nothing => return Vec::new(),
    };
    let mut matches: Vec<String> = list
        .into_iter()
        .filter(|word| word.starts_with(partial))
        .collect();
    matches.sort_by(|a, b| natural(a).cmp(&natural(b)));
    matches.dedup();
    matches
}

/// Sort numbers by value (node 10 after node 9), everything else alphabetically.
fn natural(word: &str) -> (u8, u64, &str) {
    match word.parse::<u64>() {
        Ok(n) => (0, n, word),
        Err(_) => (1, 0, word),
    }
}

/// Every word that may start a line: commands, their visible aliases, and directives.
pub fn command_names() -> Vec<String> {
    let top = Cli::command();
    let mut names: Vec<String> = top
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .flat_map(|s| {
            std::iter::once(s.get_name().to_string())
                .chain(s.get_visible_aliases().map(str::to_string))
        })
        .collect();
    names.extend(DIRECTIVES.iter().map(|s| s.to_string()));
    names
}

fn subcommand_names(parent: &str) -> Vec<String> {
    Cli::command()
        .find_subcommand(parent)
        .map(|cmd| {
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(|s| s.get_name().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(before: &[&str], partial: &str) -> Vec<String> {
        candidates(before, partial, || {
            vec!["10".into(), "2".into(), "1".into()]
        })
    }

    #[test]
    fn command_names_complete_first() {
        assert_eq!(complete(&[], "ge"), ["get"]);
        assert_eq!(complete(&[], "no"), ["node", "nodes"]);
        assert_eq!(complete(&[], "de"), ["del", "delete"]);
        assert_eq!(complete(&[], "wa"), ["wait"]);
        let all = complete(&[], "");
        for name in [
            "put", "check", "run", "status", "help", "exit", "expect", "sleep",
        ] {
            assert!(
                all.contains(&name.to_string()),
                "{name} missing from {all:?}"
            );
        }
        assert_eq!(all.iter().filter(|n| *n == "help").count(), 1, "{all:?}");
    }

    #[test]
    fn node_ids_complete_where_ids_go() {
        assert_eq!(complete(&["node"], "k"), ["kill"]);
        assert_eq!(complete(&["node"], "re"), ["remove", "resume"]);
        assert_eq!(complete(&["node", "remove", "4"], "--"), ["--accept-loss"]);
        assert!(complete(&["node", "kill", "4"], "--").is_empty());
        assert_eq!(complete(&["node", "kill"], ""), ["1", "2", "10"]);
        assert_eq!(complete(&["node", "pause"], "1"), ["1", "10"]);
        assert_eq!(complete(&["wait", "state"], ""), ["1", "2", "10"]);
        assert_eq!(complete(&["wait", "state", "2"], "d"), ["down"]);
        assert_eq!(complete(&["try", "node", "kill"], "2"), ["2"]);
        assert_eq!(complete(&["repeat", "3", "node", "resume"], "2"), ["2"]);
        assert_eq!(complete(&["bg", "wa"], ""), Vec::<String>::new());
    }

    #[test]
    fn ids_are_fetched_only_when_needed() {
        let asked = std::cell::Cell::new(false);
        let ids = || {
            asked.set(true);
            Vec::new()
        };
        assert!(candidates(&["get"], "", ids).is_empty());
        assert!(!asked.get());
    }

    #[test]
    fn other_slots() {
        assert_eq!(complete(&["wait"], ""), ["bg", "healthy", "state"]);
        assert_eq!(complete(&["expect"], "m"), ["missing"]);
        assert_eq!(complete(&["help"], "pu"), ["put"]);
        assert_eq!(complete(&["help", "node"], "a"), ["add"]);
        assert!(complete(&["help", "put"], "").is_empty());
        assert!(complete(&["put"], "").is_empty());
        assert_eq!(slot(&["run"]), Slot::File);
    }
}
