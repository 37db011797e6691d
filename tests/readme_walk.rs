//! The README's own commands, verbatim, as a new user runs them: from an empty directory, with
//! no extra flags, on the real binary. The commands are read out of README.md at test time, so
//! README and test cannot drift apart: change one and this test runs the other. Each walk runs
//! in a private network namespace (`unshare --net`), so the documented fixed ports (8765, 9090,
//! 9091, 2379, 9092) are free and nothing collides with other tests.
//!
//! What is not the README's is the scaffolding around its commands: starting a daemon line in
//! the background (a user opens another terminal), waiting until it listens, and putting
//! `etask` on PATH (`./target/release/etask` is a link to the binary under test).

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The first ```sh block after the heading line `heading`.
fn block_after(text: &str, heading: &str) -> String {
    let at = text
        .lines()
        .position(|l| l.trim() == heading)
        .unwrap_or_else(|| panic!("README has no heading {heading:?}"));
    let rest: Vec<&str> = text.lines().skip(at).collect();
    let start = rest
        .iter()
        .position(|l| l.trim() == "```sh")
        .expect("an sh block")
        + 1;
    let len = rest[start..]
        .iter()
        .position(|l| l.trim() == "```")
        .expect("block end");
    rest[start..start + len].join("\n") + "\n"
}

/// A block's commands: `\` continuations joined, comment lines dropped (they show output).
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in block.lines() {
        if cur.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(l) => {
                cur.push_str(l);
                cur.push(' ');
            }
            None => {
                cur.push_str(line);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    out
}

/// A daemon line as a background job with its output in `log`: the trailing `&` and any
/// comment after it are the README's; the redirection is the test's.
fn background(cmd: &str, log: &str) -> String {
    let cmd = cmd
        .split("  #")
        .next()
        .unwrap()
        .trim()
        .trim_end_matches('&')
        .trim();
    format!("{cmd} >{log} 2>&1 &\n")
}

const WAIT_HTTP: &str = "for i in $(seq 1 100); do curl -s http://127.0.0.1:8765/healthz >/dev/null && break; sleep 0.1; done\n";

/// Runs `script` with bash in a new network namespace (loopback up) inside `dir`, with the
/// binary under test on PATH as `etask` and at `./target/release/etask`.
fn walk(dir: &Path, script: &str) -> String {
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    let bin = env!("CARGO_BIN_EXE_etask");
    let _ = std::fs::remove_file(dir.join("target/release/etask"));
    std::os::unix::fs::symlink(bin, dir.join("target/release/etask")).unwrap();
    let bindir = Path::new(bin).parent().unwrap().display().to_string();
    let full = format!(
        "set -u\nip link set lo up\nexport PATH={bindir}:$PATH\ncd {}\n{script}\nkill $(jobs -p) 2>/dev/null; wait\n",
        dir.display()
    );
    let out = Command::new("unshare")
        .args(["--net", "bash", "-c", &full])
        .output()
        .expect("unshare");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    format!("{text}\n--- stderr\n{err}")
}

/// Output lines between `=== name` and the next marker.
fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let start = out
        .find(&format!("=== {name}\n"))
        .unwrap_or_else(|| panic!("no section {name} in:\n{out}"))
        + name.len()
        + 5;
    let end = out[start..].find("=== ").map_or(out.len(), |e| start + e);
    out[start..end].trim()
}

/// The keys a documented output line shows, e.g. `"id"`, `"status"` of `{"id":1,…}`.
fn documented_keys(comment: &str) -> Vec<String> {
    comment
        .split('"')
        .enumerate()
        .filter(|(i, part)| i % 2 == 1 && comment.contains(&format!("\"{part}\":")))
        .map(|(_, p)| p.to_owned())
        .collect()
}

#[test]
fn set_up_try_it_and_submit_work_verbatim_from_an_empty_directory() {
    let text = readme();
    let setup = block_after(&text, "## Set-up on a fresh machine");
    let start = setup
        .lines()
        .find(|l| l.contains("etask server --mode all"))
        .expect("set-up starts the server");
    assert_eq!(
        start.trim(),
        "./target/release/etask server --mode all >etask.out 2>etask.log &",
        "the set-up's start line changed: update this test's expectations with it"
    );
    let try_it = block_after(&text, "### Try it");
    // The Try-it block is paragraphs of one command and its documented output (comments).
    let paragraphs: Vec<&str> = try_it
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .collect();
    assert_eq!(paragraphs.len(), 3, "{try_it}");
    let mut script = format!("{start}\nfor i in $(seq 1 100); do grep -q listening etask.out 2>/dev/null && break; sleep 0.1; done\n");
    for (i, p) in paragraphs.iter().enumerate() {
        let cmd: Vec<&str> = p.lines().filter(|l| !l.starts_with("# ")).collect();
        // A person reads the answer before typing the next command.
        script.push_str(&format!(
            "echo '=== try{i}'\n{}\necho\nsleep 1.5\n",
            cmd.join("\n")
        ));
    }
    let submit_line = text
        .lines()
        .find(|l| l.contains("etask submit --shell examples/disk.sh --wait"))
        .expect("README shows submit --wait");
    let submit = submit_line
        .split('`')
        .nth(1)
        .expect("the command in backticks");
    script.push_str(&format!(
        "echo '=== submit'\n{submit} 2>&1\necho \"exit=$?\"\necho '=== out'\ncat etask.out\necho '=== end'\n"
    ));
    let dir = support::temp_dir("readme-try");
    std::fs::create_dir_all(dir.join("examples")).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/disk.sh"),
        dir.join("examples/disk.sh"),
    )
    .unwrap();
    let out = walk(&dir, &script);

    assert_eq!(
        section(&out, "out"),
        "etask listening on http://127.0.0.1:8765\netask grpc on http://127.0.0.1:9090",
        "{out}"
    );
    for (i, p) in paragraphs.iter().enumerate() {
        let got = section(&out, &format!("try{i}"));
        let documented: Vec<&str> = p.lines().filter_map(|l| l.strip_prefix("# ")).collect();
        let first = got.lines().next().unwrap_or_default();
        let v: Value =
            serde_json::from_str(first).unwrap_or_else(|e| panic!("try{i}: {e}: {got}\n{out}"));
        for key in documented.iter().flat_map(|d| documented_keys(d)) {
            assert!(
                v.get(&key).is_some() || first.contains(&format!("\"{key}\"")),
                "try{i}: no {key:?} in {first}"
            );
        }
        if i == 0 {
            assert_eq!(first, documented[0], "the first answer is shown exactly");
        }
    }
    let exec: Value = serde_json::from_str(section(&out, "try1").lines().next().unwrap()).unwrap();
    assert_eq!(exec["status"], "succeeded", "{exec}");
    assert!(exec["result"]["disk_free_gb"].is_u64(), "{exec}");
    assert!(section(&out, "try2").contains("Filesystem"), "{out}");
    let sub = section(&out, "submit");
    assert!(sub.contains("== result: {\"disk_free_gb\":"), "{out}");
    assert!(sub.ends_with("exit=0"), "{out}");
    assert!(
        dir.join("etask-data/etask.db").exists(),
        "the default data dir is ./etask-data"
    );
}

#[test]
fn the_push_example_runs_an_executor_as_shown() {
    let text = readme();
    let cmds = commands(&block_after(&text, "### gRPC push"));
    assert_eq!(cmds.len(), 4, "{cmds:?}");
    assert!(cmds[0].starts_with("etcd"));
    let mut script = String::new();
    script.push_str(&background(&cmds[0], "etcd.log"));
    script.push_str("for i in $(seq 1 100); do curl -s http://127.0.0.1:2379/health >/dev/null && break; sleep 0.1; done\n");
    script.push_str(&background(&cmds[1], "scheduler.log"));
    script.push_str(WAIT_HTTP);
    script.push_str(&background(&cmds[2], "executor.log"));
    script.push_str("for i in $(seq 1 100); do curl -s http://127.0.0.1:8765/api/v1/nodes | grep -q exec-1 && break; sleep 0.1; done\n");
    script.push_str(&format!("echo '=== submit'\n{}\necho\n", cmds[3]));
    script.push_str("for i in $(seq 1 100); do curl -s http://127.0.0.1:8765/api/v1/executions/1 | grep -q '\"succeeded\"' && break; sleep 0.1; done\n");
    script.push_str("echo '=== exec'\ncurl -s http://127.0.0.1:8765/api/v1/executions/1\necho\necho '=== logs'\ncurl -s http://127.0.0.1:8765/api/v1/executions/1/logs\necho '=== end'\n");
    let dir = support::temp_dir("readme-push");
    let out = walk(&dir, &script);
    let exec: Value =
        serde_json::from_str(section(&out, "exec")).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(exec["status"], "succeeded", "{out}");
    assert_eq!(exec["node"], "exec-1", "{exec}");
    assert!(!section(&out, "logs").is_empty(), "{out}");
}

#[test]
fn the_agent_example_runs_an_agent_as_shown() {
    let text = readme();
    let cmds = commands(&block_after(&text, "### Kafka agents"));
    assert_eq!(cmds.len(), 3, "{cmds:?}");
    let tansu = support::kafka::tansu_bin();
    let mut script = format!(
        "{} broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ >tansu.log 2>&1 &\n\
         for i in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null && break; sleep 0.1; done\n",
        tansu.display()
    );
    script.push_str(&background(&cmds[0], "scheduler.log"));
    script.push_str(WAIT_HTTP);
    script.push_str(&background(&cmds[1], "agent.log"));
    script.push_str(&format!("sleep 2\necho '=== submit'\n{}\necho\n", cmds[2]));
    script.push_str("for i in $(seq 1 300); do curl -s http://127.0.0.1:8765/api/v1/executions/1 | grep -q '\"succeeded\"' && break; sleep 0.1; done\n");
    script.push_str("echo '=== exec'\ncurl -s http://127.0.0.1:8765/api/v1/executions/1\necho\necho '=== end'\necho '=== agentlog'\ncat agent.log\n");
    let dir = support::temp_dir("readme-agent");
    let out = walk(&dir, &script);
    let exec: Value =
        serde_json::from_str(section(&out, "exec")).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(exec["status"], "succeeded", "{out}");
}
