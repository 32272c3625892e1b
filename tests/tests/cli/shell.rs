//! The interactive shell, driven through its standard input and through a pseudo-terminal.

use ringkv_tests::Cluster;

use crate::util::{PipedShell, TerminalShell};

#[test]
fn the_shell_runs_lines_from_stdin_and_survives_errors() {
    let c = Cluster::start(3);
    let mut shell = PipedShell::start(&c.addr);
    for line in [
        "put greeting \"hello world\"",
        "get greeting",
        "get never-written",
        "frobnicate now",
        "node kill 99",
        "put onlykey",
        "help",
        "help put",
        "nodes",
        "status",
        "let key = greeting",
        "expect get $key 'hello world'",
        "expect missing greeting",
        "echo still here",
        "exit",
        "echo after exit",
    ] {
        shell.send(line);
    }
    let status = shell.finish();
    let out = shell.stdout.text();
    let err = shell.stderr.text();
    let both = format!("--- stdout ---\n{out}\n--- stderr ---\n{err}");

    // `exit` ends the shell successfully even after failed lines; nothing after it runs.
    assert!(status.success(), "{both}");
    assert!(!out.contains("after exit"), "{both}");
    // No prompt or banner when stdin is not a terminal: the first line is the first result.
    assert!(out.starts_with("OK (version "), "{both}");

    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.contains(&"hello world"),
        "quoting keeps the space: {both}"
    );
    assert!(lines.contains(&"(nil)"), "{both}");
    assert!(
        err.contains("error: usage: unrecognized subcommand 'frobnicate'"),
        "{both}"
    );
    assert!(err.contains("error: not_found: node 99"), "{both}");
    assert!(err.contains("Usage: put <KEY> <VALUE>"), "{both}");
    // `help`: the command list and the script directives; `help put`: clap's help with an example.
    assert!(out.contains("node kill ID"), "{both}");
    assert!(out.contains("wait healthy [TIMEOUT]"), "{both}");
    assert!(out.contains("Store VALUE under KEY"), "{both}");
    assert!(out.contains("ringkv put user:1 alice"), "{both}");
    // `nodes` and `status`: the table and the one-line summary. (Whether it says healthy
    // depends on timing: the third replica of a fresh write may still be on its way.)
    assert!(out.contains("last heartbeat"), "{both}");
    let summaries = out
        .lines()
        .filter(|l| l.contains(" nodes up, 1 key, ") && l.ends_with(" running"))
        .count();
    assert_eq!(summaries, 2, "{both}");
    assert!(out.contains("ok: greeting = \"hello world\""), "{both}");
    assert!(
        err.contains("expected greeting to be missing, got \"hello world\""),
        "{both}"
    );
    assert!(lines.contains(&"still here"), "{both}");
}

#[test]
fn the_shell_notices_the_coordinator_going_away_and_coming_back() {
    let mut c = Cluster::start(3);
    let mut shell = PipedShell::start(&c.addr);
    shell.send("put survivor 1");
    shell.stdout.wait_for("OK (version");

    c.kill_coordinator();
    shell.send("get survivor");
    // The request fails either way: refused by a closed port, or lost with the connection if
    // it went out before the shell saw the socket close. The loss is announced once.
    let err = shell.stderr.wait_for(&format!(
        "notice: connection to the coordinator at {} lost",
        c.addr
    ));
    let err = if err.contains("error: ") {
        err
    } else {
        shell.stderr.wait_for("error: ")
    };
    assert!(
        err.contains("error: connect: cannot connect to")
            || err.contains("error: connection_lost: "),
        "{err}"
    );

    c.restart();
    shell.send("get survivor");
    shell.stderr.wait_for(&format!(
        "notice: reconnected to the coordinator at {}",
        c.addr
    ));
    let out = shell.stdout.wait_for("\n1\n");
    assert_eq!(out, "OK (version 1)\n1\n");
    shell.send("exit");
    assert!(shell.finish().success());
    let err = shell.stderr.text();
    assert_eq!(
        err.matches("lost; the next command reconnects").count(),
        1,
        "{err}"
    );
}

#[test]
fn the_shell_in_a_terminal_edits_completes_and_keeps_history() {
    let c = Cluster::start(3);
    let history = c.dir.path().join("history");
    let mut term = TerminalShell::start(&c.addr, &history);
    let prompt = format!("{}> ", c.addr);
    term.wait_for("`help` lists the commands");
    term.wait_for(&prompt);

    term.keys("put k1 \"two words\"\r");
    term.wait_for("OK (version 1)");

    // Tab completes a command name, and then a node id after `node pause`.
    term.keys("ge\tk1\r");
    let screen = term.wait_for("\ntwo words\n");
    assert!(screen.contains("get k1"), "{screen}");

    term.keys("node res\t3\t\r");
    let screen = term.wait_for("OK: node 3 resumed");
    assert!(screen.contains("node resume 3"), "{screen}");

    // An error does not end the shell.
    term.keys("node kill 42\r");
    term.wait_for("error: not_found: node 42");

    // Up-arrow walks back through the history; backspace edits the line.
    term.keys("\x1b[A\x1b[A\r");
    term.wait_count("OK: node 3 resumed", 2);
    term.keys("get kX\x7f1\r");
    term.wait_count("\ntwo words\n", 2);

    term.keys("exit\r");
    assert!(term.wait_exit().success());

    let saved = std::fs::read_to_string(&history).expect("the history file was written");
    assert!(saved.contains("put k1 \"two words\""), "{saved}");
    assert!(saved.contains("node resume 3"), "{saved}");
}
