//! The text of the shell's `help` and `help TOPIC`.
//!
//! The command list is generated from the clap definition, so a command added to
//! [`crate::cli::Command`] shows up here (and in completion) without further work; the
//! directives come from [`crate::script::LANGUAGE_HELP`]. `help COMMAND` is clap's own
//! `COMMAND --help`.

use clap::CommandFactory;

use crate::cli::Cli;
use crate::script::{parse_step, ScriptError, Step, LANGUAGE_HELP};

/// Words that are directives of the shell and scripts rather than cluster commands.
pub const DIRECTIVES: &[&str] = &[
    "sleep", "expect", "wait", "let", "repeat", "bg", "try", "echo", "help", "exit", "quit",
];

/// Column at which the summaries of the command list start.
const SUMMARY_COLUMN: usize = 30;

/// The cluster commands, one per line: `  put KEY VALUE          Store VALUE under KEY; ...`.
pub fn command_list() -> String {
    let mut out = String::new();
    for (usage, about) in command_usages() {
        let pad = SUMMARY_COLUMN.saturating_sub(usage.len() + 2).max(1);
        out.push_str(&format!("  {usage}{:pad$}{about}\n", ""));
    }
    out
}

/// `(usage, one-line summary)` of each cluster command, nested ones (`node kill ID`) expanded.
pub fn command_usages() -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let top = Cli::command();
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.has_subcommands() {
            for nested in sub.get_subcommands().filter(|s| !s.is_hide_set()) {
                let usage = format!("{} {}", sub.get_name(), usage_of(nested));
                rows.push((usage, about_of(nested)));
            }
        } else {
            rows.push((usage_of(sub), about_of(sub)));
        }
    }
    rows
}

fn usage_of(cmd: &clap::Command) -> String {
    let mut usage = cmd.get_name().to_string();
    let mut has_options = false;
    for arg in cmd.get_arguments() {
        if arg.is_positional() {
            let name = arg
                .get_value_names()
                .and_then(|names| names.first())
                .map_or_else(
                    || arg.get_id().to_string().to_uppercase(),
                    |n| n.to_string(),
                );
            if arg.is_required_set() {
                usage.push_str(&format!(" {name}"));
            } else {
                usage.push_str(&format!(" [{name}]"));
            }
        } else if !arg.is_global_set() && !matches!(arg.get_id().as_str(), "help" | "version") {
            has_options = true;
        }
    }
    if has_options {
        usage.push_str(" [OPTIONS]");
    }
    usage
}

fn about_of(cmd: &clap::Command) -> String {
    cmd.get_about().map(|a| a.to_string()).unwrap_or_default()
}

/// The text for `help` with `topic` (empty for the overview).
///
/// # Errors
/// A topic that is neither a command nor a directive.
pub fn help(topic: &[String]) -> Result<String, ScriptError> {
    let Some(first) = topic.first() else {
        return Ok(overview());
    };
    if DIRECTIVES.contains(&first.as_str()) {
        return Ok(directive_help(first));
    }
    let mut words = topic.to_vec();
    words.push("--help".into());
    match parse_step(&words) {
        Ok(Step::Show(text)) => Ok(text),
        _ => Err(ScriptError::Syntax(format!(
            "no help for {:?}; `help` lists the commands",
            topic.join(" ")
        ))),
    }
}

fn overview() -> String {
    format!(
        "Commands (the same as `ringkv COMMAND`; `help COMMAND` for one of them):\n{}\n{LANGUAGE_HELP}\n\n\
         In the shell: tab completes commands and node ids, up and down walk the history, \
         ctrl-r searches it,\nctrl-c abandons the line (or the running command), and ctrl-d or \
         `exit` leaves.\n",
        command_list()
    )
}

/// The lines of [`LANGUAGE_HELP`] that describe `word`, with their continuation lines.
fn directive_help(word: &str) -> String {
    let word = if word == "quit" { "exit" } else { word };
    let mut out = String::new();
    let mut in_entry = false;
    // Only the list at the top describes directives; the example below it is not help.
    for line in LANGUAGE_HELP.lines().skip(1).take_while(|l| !l.is_empty()) {
        let entry = line.strip_prefix("  ").filter(|l| !l.starts_with(' '));
        match entry {
            Some(entry) => {
                let head = entry.split_whitespace().next().unwrap_or_default();
                in_entry = head == word || (word == "let" && head.starts_with("$("));
                if in_entry {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            None if in_entry && line.starts_with("    ") => {
                out.push_str(line);
                out.push('\n');
            }
            None => in_entry = false,
        }
    }
    if word == "help" {
        out.push_str("  help [COMMAND]              list the commands, or describe one\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_overview_lists_commands_and_directives() {
        let text = help(&[]).unwrap();
        for needle in [
            "put KEY VALUE",
            "get KEY",
            "node kill ID",
            "node remove ID",
            "run SCRIPT",
            "wait healthy",
            "expect get KEY VALUE",
            "$(replica KEY N)",
        ] {
            assert!(text.contains(needle), "overview lacks {needle:?}:\n{text}");
        }
    }

    #[test]
    fn command_help_is_clap_help() {
        let text = help(&words("put")).unwrap();
        assert!(text.contains("Store VALUE under KEY"), "{text}");
        assert!(text.contains("Example"), "{text}");
        let text = help(&words("node kill")).unwrap();
        assert!(text.contains("SIGKILL"), "{text}");
        assert!(help(&words("frobnicate")).is_err());
    }

    #[test]
    fn directive_help_picks_its_lines() {
        let text = help(&words("wait")).unwrap();
        assert!(text.contains("wait healthy"), "{text}");
        assert!(text.contains("wait state NODE STATE"), "{text}");
        assert!(
            text.contains("poll `status`"),
            "continuation line kept: {text}"
        );
        assert!(!text.contains("sleep"), "{text}");
        assert!(!text.contains("$second"), "the example is not help: {text}");
        let text = help(&words("let")).unwrap();
        assert!(text.contains("$(replica KEY N)"), "{text}");
        assert!(help(&words("quit")).unwrap().contains("exit"));
        for directive in DIRECTIVES {
            assert!(!help(&words(directive)).unwrap().is_empty(), "{directive}");
        }
    }

    #[test]
    fn every_command_has_an_example() {
        let top = Cli::command();
        for sub in top.get_subcommands() {
            let leaves: Vec<&clap::Command> = if sub.has_subcommands() {
                sub.get_subcommands().collect()
            } else {
                vec![sub]
            };
            for leaf in leaves {
                let after = leaf.get_after_help().map(|s| s.to_string());
                let after_long = leaf.get_after_long_help().map(|s| s.to_string());
                let text = after.or(after_long).unwrap_or_default();
                assert!(
                    text.contains("Example"),
                    "`{} {}` has no example in its help",
                    sub.get_name(),
                    leaf.get_name()
                );
            }
        }
    }
}
