//! The command line as a user meets it: `etask run` next to other runs and after crashed ones,
//! validation before side effects, exit codes, `config --check`, and the table output of the
//! client commands. Every test runs the real binary.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::temp_dir;

/// `etask ARGS` with `TMPDIR` set to `tmp` (so `etask run` workspaces land in the test's dir).
fn etask(tmp: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(args)
        .env("TMPDIR", tmp)
        .env_remove("ETASK_SERVER")
        .env_remove("ETASK_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run etask")
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn workspaces(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn concurrent_runs_and_leftovers_of_killed_runs_never_collide() {
    let dir = temp_dir("cli-run-ws");
    let script = dir.join("s.sh");
    std::fs::write(&script, "sleep 5\n").unwrap();
    let root = dir.join("etask-work");
    let mut long = support::Proc(
        Command::new(env!("CARGO_BIN_EXE_etask"))
            .args(["run", "--shell"])
            .arg(&script)
            .env("TMPDIR", &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while workspaces(&root).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no workspace appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second run while the first one runs.
    let o = etask(&dir, &["run", "--exec", "--", "true"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    // The first run dies without cleaning up: its workspace stays behind...
    long.kill9();
    let left = workspaces(&root);
    assert_eq!(left.len(), 1, "{left:?}");
    // ...and blocks nothing.
    for _ in 0..2 {
        let o = etask(&dir, &["run", "--exec", "--", "true"]);
        assert_eq!(code(&o), 0, "{}", text(&o));
    }
    assert_eq!(workspaces(&root), left);
    let _ = std::fs::remove_dir_all(&dir);
}
