//! The README against the binary, so they cannot drift apart: the defaults block against
//! `etask config --print-default`, the synopses and the exit statuses against `--help`, the
//! "Try it" commands run as written, and one title per section.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// The first fenced block (```lang) after the line `heading`.
fn block_after(text: &str, heading: &str, lang: &str) -> String {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no {heading:?} section"));
    let fence = format!("```{lang}\n");
    let open = start + text[start..].find(&fence).expect("a fenced block") + fence.len();
    let close = open + text[open..].find("\n```").expect("a closing fence");
    text[open..close].to_owned()
}

fn etask(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(args)
        .output()
        .expect("run etask");
    assert!(out.status.success(), "etask {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Every key of a TOML document as `table.key` → value; tables (also empty ones) as
/// `table` → "{table}".
fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            if !prefix.is_empty() {
                out.insert(prefix.to_owned(), "{table}".into());
            }
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        v => {
            out.insert(prefix.to_owned(), v.to_string());
        }
    }
}

fn keys(toml_text: &str, what: &str) -> BTreeMap<String, String> {
    let v: toml::Value =
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("{what} is not TOML: {e}"));
    let mut out = BTreeMap::new();
    flatten("", &v, &mut out);
    out
}

#[test]
fn readme_defaults_block_is_what_print_default_prints() {
    let readme = keys(
        &block_after(&readme(), "### Configuration", "toml"),
        "the README's defaults block",
    );
    let binary = keys(&etask(&["config", "--print-default"]), "--print-default");
    let only = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
    };
    assert!(
        readme == binary,
        "README defaults block and `etask config --print-default` differ\nonly in the README: \
         {:?}\nonly in the binary: {:?}",
        only(&readme, &binary),
        only(&binary, &readme)
    );
}

/// The options (`--x`, `-x`) named in `text`.
fn options(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| (w.starts_with("--") && w.len() > 2) || (w.len() == 2 && w.starts_with('-')))
        .filter(|w| !matches!(*w, "--help" | "--"))
        .map(str::to_owned)
        .collect()
}

/// The `Options:` of a `--help` text.
fn help_options(help: &str) -> BTreeSet<String> {
    let opts = help
        .split("\nOptions:\n")
        .nth(1)
        .expect("an Options: section")
        .split("\n\n")
        .next()
        .unwrap_or("");
    // The first column of each line: "  --name, -n      description".
    opts.lines()
        .filter_map(|l| l.trim_start().split("  ").next())
        .flat_map(options)
        .collect()
}

/// The subcommands `etask --help` lists.
fn commands() -> Vec<String> {
    let help = etask(&["--help"]);
    let section = help
        .split("\nCommands:\n")
        .nth(1)
        .expect("a Commands: section")
        .split("\n\n")
        .next()
        .unwrap_or("");
    section
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("    "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn readme_synopses_name_every_command_and_option_of_the_help() {
    let synopsis = block_after(&readme(), "### Synopsis", "sh");
    // Continuation lines (indented) belong to the command above them.
    let mut by_command: BTreeMap<String, String> = BTreeMap::new();
    let mut current = String::new();
    for line in synopsis.lines() {
        if let Some(rest) = line.strip_prefix("etask ") {
            current = rest.split_whitespace().next().unwrap_or("").to_owned();
        }
        assert!(
            !current.is_empty(),
            "synopsis line before any command: {line:?}"
        );
        let e = by_command.entry(current.clone()).or_default();
        e.push_str(line);
        e.push('\n');
    }
    let listed: BTreeSet<String> = by_command.keys().cloned().collect();
    let have: BTreeSet<String> = commands().into_iter().collect();
    assert_eq!(listed, have, "README synopsis commands vs `etask --help`");
    for (cmd, text) in &by_command {
        let help = etask(&[cmd, "--help"]);
        assert_eq!(
            options(text),
            help_options(&help),
            "README synopsis of `etask {cmd}` vs `etask {cmd} --help`"
        );
    }
}

/// The `Error codes:` lines of a `--help` text.
fn error_codes(help: &str) -> Vec<(String, String)> {
    help.split("\nError codes:\n")
        .nth(1)
        .expect("an Error codes: section")
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.trim().split_once(' '))
        .map(|(c, t)| (c.to_owned(), t.to_owned()))
        .collect()
}

#[test]
fn exit_statuses_are_the_same_in_every_help_and_in_the_readme() {
    let top = error_codes(&etask(&["--help"]));
    assert!(top.len() >= 8, "{top:?}");
    for cmd in commands() {
        assert_eq!(
            error_codes(&etask(&[&cmd, "--help"])),
            top,
            "`etask {cmd} --help` lists other exit statuses than `etask --help`"
        );
    }
    let table = readme();
    for (code, text) in &top {
        let row = format!("| {code} | {text} |");
        assert!(
            table.contains(&row),
            "README \"Exit status\" lacks the row {row}"
        );
    }
}

#[test]
fn readme_section_titles_are_unique() {
    let text = readme();
    let mut seen = BTreeSet::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if !in_code && line.starts_with('#') {
            assert!(
                seen.insert(line.to_owned()),
                "README has two sections {line:?}"
            );
        }
    }
}

/// `(command, expected output)` pairs of a shell block: each command (a here-document
/// included) up to the comment lines (`# ...`) that show its output.
fn commands_with_output(block: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut cmd = String::new();
    let mut heredoc_end: Option<String> = None;
    for line in block.lines() {
        if let Some(end) = &heredoc_end {
            cmd.push_str(line);
            cmd.push('\n');
            if line == end {
                heredoc_end = None;
                out.push((std::mem::take(&mut cmd), String::new()));
            }
            continue;
        }
        if let Some(shown) = line.strip_prefix("# ") {
            if let Some(last) = out.last_mut() {
                last.1 = shown.to_owned();
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        cmd.push_str(line);
        cmd.push('\n');
        if let Some((_, tag)) = line.split_once("<<'") {
            heredoc_end = Some(tag.trim_end_matches('\'').to_owned());
            continue;
        }
        out.push((std::mem::take(&mut cmd), String::new()));
    }
    out
}

#[test]
fn try_it_runs_as_written() {
    let dir = support::temp_dir("readme-try");
    let s = support::server::Server::start(&dir, &[], "");
    let block = block_after(&readme(), "### Try it", "sh");
    let steps = commands_with_output(&block);
    assert_eq!(steps.len(), 3, "{steps:?}");
    for (i, (cmd, shown)) in steps.iter().enumerate() {
        // The address is the only change: this server listens on a free port.
        let cmd = cmd.replace("http://127.0.0.1:8765", &s.url);
        let out = Command::new("bash").args(["-c", &cmd]).output().unwrap();
        let got = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{cmd}\n{got}");
        // The README shows the start of each answer ("..." marks where it goes on); fields
        // whose value depends on the machine are compared by name.
        for field in shown
            .trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .filter(|f| *f != "...")
        {
            let name = field.split(':').next().unwrap_or("");
            let want = if field.contains("disk_free_gb") || field.contains("\"data\"") {
                name.to_owned()
            } else {
                field.to_owned()
            };
            assert!(
                got.contains(&want),
                "step {i}: {want:?} not in {got:?}\n{cmd}"
            );
        }
        if i == 0 {
            // A person types the next command seconds later: let the script finish.
            s.wait_final(1, Duration::from_secs(30));
        }
    }
    // "Or with the client": the same, run from the repository like the README says.
    let line = readme()
        .lines()
        .find(|l| l.contains("etask submit --shell examples/disk.sh --wait"))
        .expect("the client example")
        .to_owned();
    let cmd = line
        .split('`')
        .find(|p| p.contains("submit --shell"))
        .unwrap()
        .replace("./target/release/etask", env!("CARGO_BIN_EXE_etask"));
    let out = Command::new("bash")
        .args(["-c", &cmd])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ETASK_SERVER", &s.url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd}\n{err}");
    assert!(err.contains("== result: {\"disk_free_gb\":"), "{err}");
}

#[test]
fn the_run_json_example_has_the_fields_etask_run_prints() {
    let shown: serde_json::Value = serde_json::from_str(&block_after(
        &readme(),
        "## Running a script locally: `etask run`",
        "json",
    ))
    .expect("the --json example is JSON");
    let dir = support::temp_dir("readme-run-json");
    let script = dir.join("s.sh");
    std::fs::write(&script, "echo '{\"disk_free_gb\": 41}' >&3\n").unwrap();
    let printed: serde_json::Value = serde_json::from_str(&etask(&[
        "run",
        "--shell",
        script.to_str().unwrap(),
        "--json",
    ]))
    .expect("etask run --json prints JSON");
    let names = |v: &serde_json::Value| {
        v.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(names(&shown), names(&printed));
    assert_eq!(shown["result"], printed["result"]);
}

#[test]
fn the_second_mode_all_command_starts_next_to_a_first_one() {
    use std::io::BufRead;
    let dir = support::temp_dir("readme-second");
    // The first one, as in "Set-up" (on free ports here).
    let first = support::server::Server::start(&dir, &[], "");
    let line = block_after(&readme(), "A second `etask server --mode all` on the same host needs its own data directory (the first one", "sh");
    let cmd = line
        .trim()
        .replacen("etask ", &format!("{} ", env!("CARGO_BIN_EXE_etask")), 1);
    let mut child = support::Proc(
        Command::new("bash")
            .args(["-c", &format!("exec {cmd}")])
            .current_dir(&dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let (mut l1, mut l2) = (String::new(), String::new());
    out.read_line(&mut l1).unwrap();
    out.read_line(&mut l2).unwrap();
    assert!(
        l1.starts_with("etask listening on http://127.0.0.1:"),
        "{l1:?} {l2:?}"
    );
    assert!(l2.starts_with("etask grpc on http://127.0.0.1:"), "{l2:?}");
    assert!(
        !l1.contains(&first.url),
        "the second took the first one's port"
    );
}
