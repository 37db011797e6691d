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

/// `etask ARGS --server URL`.
fn client(tmp: &Path, url: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--server", url]);
    etask(tmp, &all)
}

#[test]
fn submit_refuses_cron_with_wait_before_creating_anything() {
    let dir = temp_dir("cli-submit-validate");
    let s = support::server::Server::start(&dir, &[], "");
    let script = dir.join("s.sh");
    std::fs::write(&script, "true\n").unwrap();
    let script = script.to_str().unwrap();
    for bad in [
        &[
            "submit",
            "--shell",
            script,
            "--cron",
            "*/5 * * * * *",
            "--wait",
        ][..],
        &["submit", "--shell", script, "--timeout", "-1"][..],
        &["submit", "--shell", script, "--max-attempts", "0"][..],
        &["submit", "--shell", script, "--env", "NOEQUALS"][..],
        &["submit", "--shell", script, "--python", script][..],
    ] {
        let o = client(&dir, &s.url, bad);
        assert_eq!(code(&o), 64, "{bad:?}: {}", text(&o));
    }
    let (st, v) = s.call("GET", "/api/v1/tasks", None);
    assert_eq!(
        (st, v["items"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );
}

#[test]
fn exit_statuses_follow_one_scheme_in_every_command() {
    let dir = temp_dir("cli-exit");
    let s = support::server::Server::start(&dir, &[], "");
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let exit3 = write("exit3.sh", "exit 3\n");
    let exit69 = write("exit69.sh", "echo x; exit 69\n");
    let cases: Vec<(Vec<&str>, i32)> = vec![
        // argh's own parse errors, and ours
        (vec!["run", "--no-such-flag"], 64),
        (vec!["nosuchcommand"], 64),
        (vec!["run", "--exec"], 64),
        (vec!["server", "--mode", "sideways"], 64),
        (vec!["config"], 64),
        // files that cannot be read
        (vec!["run", "--shell", "/nonexistent/x.sh"], 66),
        (vec!["config", "--check", "/nonexistent/etask.toml"], 66),
        // the script's outcome
        (vec!["run", "--shell", &exit3], 3),
        (vec!["run", "--shell", &exit69], 1),
        (
            vec!["run", "--timeout", "0.2", "--exec", "--", "sleep", "5"],
            124,
        ),
        (vec!["run", "--exec", "--", "/nonexistent/binary"], 127),
        (vec!["run", "--exec", "--", "sh", "-c", "kill -9 $$"], 137),
    ];
    for (args, want) in &cases {
        let o = etask(&dir, args);
        assert_eq!(code(&o), *want, "{args:?}: {}", text(&o));
    }
    let o = etask(&dir, &["run", "--shell", &exit69]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("exit code 69"),
        "{}",
        text(&o)
    );
    // A workspace root that cannot be created: the script could not start.
    let not_a_dir = dir.join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(["run", "--exec", "--", "true"])
        .env("TMPDIR", &not_a_dir)
        .output()
        .unwrap();
    assert_eq!(code(&o), 127, "{}", text(&o));
    // The client: the scheduler's answers and its absence.
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let client_cases: Vec<(Vec<&str>, &str, i32)> = vec![
        (vec!["submit", "--shell", &exit3, "--wait"], &s.url, 3),
        (vec!["submit", "--shell", &exit69, "--wait"], &s.url, 1),
        (vec!["submit", "--shell", &exit3, "--wait"], &dead, 69),
        (vec!["get", "999999"], &s.url, 66),
        (vec!["logs", "999999"], &s.url, 66),
        (vec!["tasks"], &dead, 69),
    ];
    for (args, url, want) in &client_cases {
        let o = client(&dir, url, args);
        assert_eq!(code(&o), *want, "{args:?} at {url}: {}", text(&o));
    }
    // Values the client checks with the scheduler's own rules: a bad command line (64),
    // nothing sent. What only the scheduler knows (the paths it serves) is its refusal (65).
    let before = s.call("GET", "/api/v1/tasks", None).1;
    for args in [
        vec!["submit", "--shell", &exit3, "--cron", "nope"],
        vec![
            "submit",
            "--shell",
            &exit3,
            "--cron",
            "0 * * * * *",
            "--overlap",
            "bogus",
        ],
        vec![
            "submit",
            "--shell",
            &exit3,
            "--cron",
            "0 * * * * *",
            "--timezone",
            "Mars/Base",
        ],
        vec!["submit", "--shell", &exit3, "--max-attempts", "101"],
        vec!["submit", "--shell", &exit3, "--name", "bad\nname"],
        vec!["submit", "--shell", &exit3, "--cron", "0 0 0 30 2 *"], // never fires
        vec!["submit", "--shell", &exit3, "--cron", "0 0 0 1 1 * 2020"],
        vec!["tasks", "--limit", "0"],
        vec!["tasks", "--limit", "501"],
    ] {
        let o = client(&dir, &s.url, &args);
        assert_eq!(code(&o), 64, "{args:?}: {}", text(&o));
        assert!(!text(&o).contains(" column "), "{args:?}: {}", text(&o));
    }
    // The flag is named, in its own words.
    let o = client(
        &dir,
        &s.url,
        &[
            "submit",
            "--shell",
            &exit3,
            "--cron",
            "0 * * * * *",
            "--overlap",
            "bogus",
        ],
    );
    assert!(
        text(&o).contains("--overlap") && text(&o).contains("forbid, allow, queue, replace"),
        "{}",
        text(&o)
    );
    let o = client(
        &dir,
        &s.url,
        &["submit", "--shell", &exit3, "--max-attempts", "101"],
    );
    assert!(
        text(&o).contains("--max-attempts must be 1 to 100, not 101"),
        "{}",
        text(&o)
    );
    // A --server that is no scheduler base URL is a bad command line, not an absent server.
    let base = s.url.trim_start_matches("http://").to_owned();
    for bad in [
        base.clone(),
        format!("{}/api/v1", s.url),
        format!("ftp://{base}"),
    ] {
        for args in [
            vec!["tasks"],
            vec!["get", "1"],
            vec!["submit", "--shell", &exit3],
        ] {
            let o = client(&dir, &bad, &args);
            assert_eq!(code(&o), 64, "{args:?} --server {bad}: {}", text(&o));
            assert!(text(&o).contains("base URL"), "{}", text(&o));
        }
    }
    assert_eq!(
        s.call("GET", "/api/v1/tasks", None).1,
        before,
        "a refused command sent a task"
    );
    let o = client(
        &dir,
        &s.url,
        &["submit", "--shell", &exit3, "--max-attempts", "100"],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = client(&dir, &s.url, &["tasks", "--limit", "500"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    // A refused request (400) and a wrong token (401).
    let unserved = client(
        &dir,
        &s.url,
        &["submit", "--shell", &exit3, "--path", "pull"],
    );
    assert_eq!(code(&unserved), 65, "{}", text(&unserved));
    assert!(
        text(&unserved).contains("pull needs"),
        "{}",
        text(&unserved)
    );
    let dir2 = temp_dir("cli-exit-token");
    let t = support::server::Server::start(&dir2, &[], "[server]\ntoken = \"right\"\n");
    let o = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(["tasks", "--server", &t.url])
        .env("ETASK_TOKEN", "wrong")
        .output()
        .unwrap();
    assert_eq!(code(&o), 77, "{}", text(&o));
    // Also with a script larger than the scheduler reads before it refuses the token (it was
    // a broken pipe: 69, "cannot reach the scheduler").
    let big = dir.join("big.sh");
    std::fs::write(&big, format!("# {}\ntrue\n", "x".repeat(12 << 20))).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args([
            "submit",
            "--shell",
            big.to_str().unwrap(),
            "--server",
            &t.url,
        ])
        .env("ETASK_TOKEN", "wrong")
        .output()
        .unwrap();
    assert_eq!(code(&o), 77, "{}", text(&o));
}

#[test]
fn config_check_refuses_exactly_what_the_server_refuses() {
    let dir = temp_dir("cli-config-check");
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    // Kafka TLS files are checked at start, relative paths taken from the start directory.
    let missing_ca = format!(
        "kafka.ssl_ca {}: cannot read",
        std::env::current_dir()
            .unwrap()
            .join("missing-ca.pem")
            .display()
    );
    let bad = [
        (
            write("open.toml", "[server]\nlisten = \"0.0.0.0:0\"\n"),
            "without a token",
        ),
        (
            write(
                "sasl.toml",
                "[kafka]\nsecurity_protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\n",
            ),
            "needs kafka.sasl_username",
        ),
        (
            write(
                "mech.toml",
                "[kafka]\nsecurity_protocol = \"sasl_plaintext\"\nsasl_mechanism = \"GSSAPI\"\n",
            ),
            "kafka.sasl_mechanism \"GSSAPI\"",
        ),
        (
            write(
                "ca.toml",
                "[kafka]\nsecurity_protocol = \"ssl\"\nssl_ca = \"missing-ca.pem\"\n",
            ),
            &missing_ca,
        ),
        (
            write("pg.toml", "[server]\nstore = \"postgres://x\"\n"),
            "server.store",
        ),
        (
            write("path.toml", "[executor]\npath = \"sideways\"\n"),
            "executor.path",
        ),
        (
            write("grpc.toml", "[server]\ngrpc_listen = \"nine-oh-nine-oh\"\n"),
            "server.grpc_listen",
        ),
        // Times near u64::MAX overflowed a deadline and panicked the node's reactor.
        (
            write(
                "grace.toml",
                "[node]\nkill_grace_seconds = 9223372036854775807\n",
            ),
            "node.kill_grace_seconds = 9223372036854775807 is over its maximum",
        ),
        (
            write(
                "retention.toml",
                "[scheduler]\nretention_days = 200000000000\n",
            ),
            "scheduler.retention_days",
        ),
        // A token no header can carry (a trailing space locked every client out).
        (
            write("token.toml", "[server]\ntoken = \"abc \"\n"),
            "server.token (or $ETASK_TOKEN) may hold visible ASCII characters only",
        ),
    ];
    for (file, why) in &bad {
        let f = file.to_str().unwrap();
        let check = etask(&dir, &["config", "--check", f]);
        assert_eq!(code(&check), 78, "{f}: {}", text(&check));
        assert!(
            String::from_utf8_lossy(&check.stderr).contains(why),
            "{}",
            text(&check)
        );
        let data = dir.join("data");
        let server = etask(
            &dir,
            &[
                "server",
                "--mode",
                "all",
                "--config",
                f,
                "--data-dir",
                data.to_str().unwrap(),
            ],
        );
        assert_eq!(code(&server), 78, "{f}: {}", text(&server));
        assert_eq!(
            String::from_utf8_lossy(&check.stderr),
            String::from_utf8_lossy(&server.stderr),
            "config --check and the server must say the same"
        );
    }
    // What the server accepts, --check accepts: the token may come from the environment.
    let open = bad[0].0.to_str().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(["config", "--check", open])
        .env("ETASK_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).ends_with(": ok\n"),
        "{}",
        text(&o)
    );
    // Key and TLS files a mode loads: `--check --mode M` refuses exactly what `server --mode
    // M` refuses, with the same words and 78 (they used to pass the check, and the start
    // failed with 69).
    let world_readable = dir.join("keys");
    let o = etask(
        &dir,
        &[
            "keygen",
            "--out",
            world_readable.to_str().unwrap(),
            "--pool",
            "p",
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let pool_key = world_readable.join("pool-p.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pool_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let garbage = write("garbage.pub", "not a key\n");
    let by_mode = [
        (
            "all",
            write(
                "trusted.toml",
                &format!("[security]\ntrusted_keys = [{:?}]\n", garbage.display()),
            ),
            "garbage.pub",
        ),
        (
            "all",
            write(
                "poolkey.toml",
                &format!(
                    "[security]\npool_private_keys = [{:?}]\n",
                    pool_key.display()
                ),
            ),
            "chmod 600",
        ),
        (
            "all",
            write(
                "https.toml",
                "[server]\ntls_cert = \"missing-cert.pem\"\ntls_key = \"missing-key.pem\"\n",
            ),
            "missing-cert.pem",
        ),
        (
            "scheduler",
            write(
                "grpctls.toml",
                "[tls]\ncert = \"missing-grpc.pem\"\nkey = \"missing-grpc.key\"\n",
            ),
            "missing-grpc.pem",
        ),
        (
            "scheduler",
            write("cbca.toml", "[callbacks]\nca = \"missing-cb-ca.pem\"\n"),
            "missing-cb-ca.pem",
        ),
        (
            "executor",
            write(
                "etcdtls.toml",
                "[registry]\netcd = \"https://127.0.0.1:1\"\nca = \"missing-etcd-ca.pem\"\n",
            ),
            "missing-etcd-ca.pem",
        ),
    ];
    for (mode, file, why) in &by_mode {
        let f = file.to_str().unwrap();
        let check = etask(&dir, &["config", "--check", f, "--mode", mode]);
        assert_eq!(code(&check), 78, "{f} --mode {mode}: {}", text(&check));
        assert!(
            String::from_utf8_lossy(&check.stderr).contains(why),
            "{why}: {}",
            text(&check)
        );
        let data = dir.join(format!("data-{mode}"));
        let server = etask(
            &dir,
            &[
                "server",
                "--mode",
                mode,
                "--config",
                f,
                "--data-dir",
                data.to_str().unwrap(),
            ],
        );
        assert_eq!(code(&server), 78, "{f} --mode {mode}: {}", text(&server));
        assert_eq!(
            String::from_utf8_lossy(&check.stderr),
            String::from_utf8_lossy(&server.stderr),
            "config --check and the server must say the same"
        );
    }
    // A key "file" that never ends, or a FIFO nobody writes: refused at once, bounded (it
    // grew the process to 22 GB, or hung the check).
    let endless = write("endless.toml", "[security]\nsigning_key = \"/dev/zero\"\n");
    let o = etask(
        &dir,
        &[
            "config",
            "--check",
            endless.to_str().unwrap(),
            "--mode",
            "scheduler",
        ],
    );
    assert_eq!(code(&o), 78, "{}", text(&o));
    assert!(text(&o).contains("not a regular file"), "{}", text(&o));
    // Scripts may come from a pipe, but not without end.
    let o = etask(&dir, &["run", "--shell", "/dev/zero"]);
    assert_eq!(code(&o), 66, "{}", text(&o));
    assert!(text(&o).contains("larger than"), "{}", text(&o));
    // A node's pool and id are plain names (a pool with a newline reached topic names and
    // forged log lines).
    let forged = write(
        "forged.toml",
        "[kafka]\nbrokers = \"127.0.0.1:1\"\n[agent]\npool = \"x\\nERROR forged\"\n",
    );
    let o = etask(
        &dir,
        &[
            "config",
            "--check",
            forged.to_str().unwrap(),
            "--mode",
            "agent",
        ],
    );
    assert_eq!(code(&o), 78, "{}", text(&o));
    assert!(
        text(&o).contains("agent.pool") && !text(&o).contains("x\nERROR"),
        "{}",
        text(&o)
    );
    // The client: a token no header carries is a bad command line, and is never echoed;
    // credentials in --server are refused.
    for (token, server) in [
        ("abc\ndef-s3cr3t", "http://127.0.0.1:1"),
        ("ok-token", "http://u:p4ss@127.0.0.1:1"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_etask"))
            .args(["tasks", "--server", server])
            .env("ETASK_TOKEN", token)
            .output()
            .unwrap();
        assert_eq!(code(&o), 64, "{}", text(&o));
        assert!(
            !text(&o).contains("s3cr3t") && !text(&o).contains("p4ss"),
            "{}",
            text(&o)
        );
    }
    // Mode requirements: an executor needs a registry, an agent Kafka.
    let empty = write("empty.toml", "");
    let empty = empty.to_str().unwrap();
    assert_eq!(code(&etask(&dir, &["config", "--check", empty])), 0);
    for mode in ["executor", "agent"] {
        let o = etask(&dir, &["config", "--check", empty, "--mode", mode]);
        assert_eq!(code(&o), 78, "{mode}: {}", text(&o));
        let s = etask(&dir, &["server", "--mode", mode, "--config", empty]);
        assert_eq!(code(&s), 78, "{mode}: {}", text(&s));
    }
}

/// Starts `etask server --mode all ARGS` in `cwd`; returns the child once it printed its
/// listen lines (both of them), or its exit status if it ended first.
fn start_all(cwd: &Path, args: &[&str]) -> Result<(support::Proc, Vec<String>), Output> {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(["server", "--mode", "all"])
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for _ in 0..2 {
        let mut l = String::new();
        if out.read_line(&mut l).unwrap_or(0) == 0 {
            return Err(child.wait_with_output().unwrap());
        }
        lines.push(l.trim().to_owned());
    }
    Ok((support::Proc(child), lines))
}

#[test]
fn a_second_mode_all_on_one_host_needs_its_own_dir_and_ports_and_says_so() {
    let dir = temp_dir("cli-second-all");
    let grpc = format!("127.0.0.1:{}", support::free_port());
    let (_first, lines) =
        start_all(&dir, &["--listen", "127.0.0.1:0", "--grpc-listen", &grpc]).expect("first");
    assert!(
        lines[0].starts_with("etask listening on http://127.0.0.1:"),
        "{lines:?}"
    );
    assert_eq!(lines[1], format!("etask grpc on http://{grpc}"));
    // Same directory: the SQLite store is the first one's.
    let o = start_all(
        &dir,
        &["--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"],
    )
    .err()
    .expect("second in the same dir must not start");
    assert_eq!(code(&o), 69, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use by another etask"),
        "{}",
        text(&o)
    );
    // Same gRPC port: the error says how to pick another.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let o = start_all(&other, &["--listen", "127.0.0.1:0", "--grpc-listen", &grpc])
        .err()
        .expect("second on the same gRPC port must not start");
    assert_eq!(code(&o), 69, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--grpc-listen 127.0.0.1:0"),
        "{}",
        text(&o)
    );
    // Its own directory and free ports: it runs.
    let (_second, lines) = start_all(
        &other,
        &["--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"],
    )
    .map_err(|o| text(&o))
    .expect("second with its own dir and ports");
    assert!(
        lines[1].starts_with("etask grpc on http://127.0.0.1:"),
        "{lines:?}"
    );
    // gRPC off.
    let third = dir.join("third");
    std::fs::create_dir_all(&third).unwrap();
    let (_third, lines) = start_all(&third, &["--listen", "127.0.0.1:0", "--grpc-listen", ""])
        .map_err(|o| text(&o))
        .expect("third without gRPC");
    assert_eq!(lines[1], "etask grpc off");
}

#[test]
fn migrate_creates_a_missing_mysql_database_and_the_server_says_to_run_it() {
    use mysql::prelude::Queryable;
    let dir = temp_dir("cli-migrate");
    let db = format!("etask_t_created_{}", std::process::id());
    let url = format!("{}/{db}", support::mysql_server().trim_end_matches('/'));
    let data = dir.join("data");
    let o = etask(
        &dir,
        &[
            "server",
            "--mode",
            "all",
            "--store",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "",
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 69, "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("does not exist") && err.contains("etask migrate"),
        "{err}"
    );
    assert!(
        !err.contains("MySqlError"),
        "a Rust type name in an operator's message: {err}"
    );
    let o = etask(&dir, &["migrate", "--store", &url]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("database created"),
        "{}",
        text(&o)
    );
    let o = etask(&dir, &["migrate", "--store", &url]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("schema up to date"),
        "{}",
        text(&o)
    );
    let mut conn =
        mysql::Conn::new(mysql::Opts::from_url(&support::mysql_server()).unwrap()).unwrap();
    conn.query_drop(format!("DROP DATABASE {db}")).unwrap();
}

/// The character column where `word` starts in `line`.
fn column(line: &str, word: &str) -> usize {
    line[..line
        .find(word)
        .unwrap_or_else(|| panic!("{word:?} not in {line:?}"))]
        .chars()
        .count()
}

#[test]
fn tasks_and_nodes_print_aligned_columns_under_a_header() {
    let dir = temp_dir("cli-tables");
    let s = support::server::Server::start(&dir, &[], "");
    let names = ["a", "a much longer task name", "größe-prüfen", "a+b & c=d"];
    let mut execs = std::collections::HashMap::new();
    // An extra execution first, so task and execution ids differ (the table must say which).
    let (t, e) = s.submit(support::server::shell("warm-up", "true"));
    s.wait_final(e, std::time::Duration::from_secs(20));
    let (status, v) = s.call("POST", &format!("/api/v1/tasks/{t}/run"), Some("{}"));
    assert!(status < 300, "{v}");
    let again = v["execution_id"].as_i64().unwrap();
    s.wait_final(again, std::time::Duration::from_secs(20));
    let (status, v) = s.call("DELETE", &format!("/api/v1/tasks/{t}"), None);
    assert!(status < 300, "{v}");
    for n in names {
        let (_, e) = s.submit(support::server::shell(n, "true"));
        s.wait_final(e, std::time::Duration::from_secs(20));
        execs.insert(n, e);
    }
    let mut cron = support::server::shell("every-minute", "true");
    cron["schedule"] = serde_json::json!({"kind": "cron", "expr": "0 * * * * *"});
    s.submit(cron);
    let o = client(&dir, &s.url, &["tasks"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    let header = lines[0];
    assert!(
        header.starts_with("ID") || header.trim_start().starts_with("ID"),
        "{out}"
    );
    let (name_at, sched_at, state_at) = (
        column(header, "NAME"),
        column(header, "SCHEDULE"),
        column(header, "STATE"),
    );
    // Newest first: the cron task, then the names in reverse.
    let expect: Vec<&str> = std::iter::once("every-minute")
        .chain(names.iter().rev().copied())
        .collect();
    for (line, name) in lines[1..].iter().zip(&expect) {
        assert_eq!(column(line, name), name_at, "{out}");
        let sched = if *name == "every-minute" {
            "0 * * * * *"
        } else {
            "once"
        };
        assert_eq!(column(line, sched), sched_at, "{out}");
        // A cron task is active; a once task shows its newest execution's status.
        let state = if *name == "every-minute" {
            "active"
        } else {
            "succeeded"
        };
        assert_eq!(column(line, state), state_at, "{out}");
        // The newest execution's id, what `etask get/logs/cancel` take.
        if let Some(e) = execs.get(name) {
            let last_at = column(header, "LAST EXECUTION");
            let cell: String = line
                .chars()
                .skip(last_at)
                .take_while(|c| *c != ' ')
                .collect();
            assert_eq!(cell, e.to_string(), "{out}");
            let task_id: String = line
                .trim_start()
                .chars()
                .take_while(|c| *c != ' ')
                .collect();
            assert_ne!(task_id, cell, "{out}");
        }
    }
    // The name filter takes any characters.
    let o = client(&dir, &s.url, &["tasks", "--name", "a+b & c=d"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.contains("a+b & c=d"), "{out}");
    // Nodes: a header, then the built-in node.
    let o = client(&dir, &s.url, &["nodes"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        column(lines[0], "ROLE"),
        column(lines[1], "executor"),
        "{out}"
    );
    let path_at = lines[1][..lines[1].rfind("local").unwrap()].chars().count();
    assert_eq!(column(lines[0], "PATH"), path_at, "{out}");
}

#[test]
fn submit_wait_shows_result_errors_and_attempts_and_ctrl_c_cancels() {
    let dir = temp_dir("cli-wait");
    let s = support::server::Server::start(&dir, &[], "");
    let bad = dir.join("bad.sh");
    std::fs::write(&bad, "echo '{bad' >&3\n").unwrap();
    let o = etask(
        &dir,
        &[
            "submit",
            "--server",
            &s.url,
            "--shell",
            bad.to_str().unwrap(),
            "--wait",
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("== result_error: invalid JSON"),
        "{}",
        text(&o)
    );
    // A retried execution's logs say where each attempt begins.
    let flaky = dir.join("flaky.sh");
    std::fs::write(&flaky, "echo try $ETASK_ATTEMPT; exit 3\n").unwrap();
    let o = etask(
        &dir,
        &[
            "submit",
            "--server",
            &s.url,
            "--shell",
            flaky.to_str().unwrap(),
            "--max-attempts",
            "2",
            "--wait",
        ],
    );
    assert_eq!(code(&o), 3, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("== attempt 2"),
        "{}",
        text(&o)
    );
    // --path/--pool reach the task's target (no push node here: refused, naming the pool).
    let o = etask(
        &dir,
        &[
            "submit",
            "--server",
            &s.url,
            "--shell",
            bad.to_str().unwrap(),
            "--path",
            "push",
            "--pool",
            "core",
        ],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("push"),
        "{}",
        text(&o)
    );
    let o = etask(
        &dir,
        &[
            "submit",
            "--server",
            &s.url,
            "--shell",
            bad.to_str().unwrap(),
            "--pool",
            "core",
        ],
    );
    assert_eq!(
        code(&o),
        64,
        "--pool without --path is a usage error: {}",
        text(&o)
    );
    // Ctrl-C while waiting cancels the execution on the server.
    let long = dir.join("long.sh");
    std::fs::write(&long, "sleep 30\n").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args([
            "submit",
            "--server",
            &s.url,
            "--shell",
            long.to_str().unwrap(),
            "--wait",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let (_, v) = s.call("GET", "/api/v1/executions?status=running", None);
        if !v["items"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never running");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, v) = s.call("GET", "/api/v1/executions?status=cancelled", None);
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn a_closed_output_ends_client_commands_quietly() {
    let dir = temp_dir("cli-pipe");
    let s = support::server::Server::start(&dir, &[], "");
    for i in 0..40 {
        s.submit(support::server::shell(&format!("t{i}"), "true"));
    }
    for _ in 0..20 {
        let out = Command::new("bash")
            .args([
                "-c",
                &format!(
                    "{} tasks --server {} | head -c1 >/dev/null",
                    env!("CARGO_BIN_EXE_etask"),
                    s.url
                ),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{err}"
        );
    }
}

/// Daemons must outlive their stdout: every role writes its start-up lines to a pipe whose
/// reader is already gone (a supervisor that closed it, `etask server | head -1`) and keeps
/// serving. Before, the second `println!` panicked the main thread and the server died.
#[test]
fn a_daemon_whose_stdout_reader_is_gone_keeps_serving() {
    let dir = temp_dir("cli-daemon-pipe");
    let port = support::free_port();
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader); // every write to stdout now fails with EPIPE
    let mut child = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(["server", "--mode", "all", "--grpc-listen", ""])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("ETASK_TOKEN")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start server");
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    while ureq::get(&format!("{url}/healthz")).call().is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "server exited ({st}) with its stdout closed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Past the start-up lines: still alive, and a script runs to its end.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "server died after start"
    );
    let script = dir.join("hi.sh");
    std::fs::write(&script, "echo hi\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(["submit", "--server", &url, "--wait", "--shell"])
        .arg(&script)
        .env_remove("ETASK_TOKEN")
        .output()
        .unwrap();
    let _ = child.kill();
    let out_err = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out_err.stderr);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        log.contains("cannot write start-up line to stdout"),
        "the lost line is logged: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// `etask logs -f ID | head -n1` ends once `head` has its line, even while the execution stays
/// quiet for a long time (before, it ran on until the next log line or the execution's end).
#[test]
fn a_follow_ends_when_its_reader_goes_away_not_at_the_next_line() {
    let dir = temp_dir("cli-follow-pipe");
    let s = support::server::Server::start(&dir, &[], "");
    let (_, exec) = s.submit(support::server::shell("quiet", "echo first; sleep 60"));
    s.wait_for(exec, Duration::from_secs(10), |e| e["status"] == "running");
    let t0 = Instant::now();
    let out = Command::new("bash")
        .args([
            "-c",
            &format!(
                "{} logs -f {exec} --server {} | head -n1",
                env!("CARGO_BIN_EXE_etask"),
                s.url
            ),
        ])
        .env_remove("ETASK_TOKEN")
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "first\n");
    // The pipeline ends with the follow, long before the script's 60 s of silence end.
    assert!(took < Duration::from_secs(30), "follow ran on for {took:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        s.execution(exec)["status"],
        "running",
        "the execution goes on"
    );
}

/// A task name with the characters a hand-made query gets wrong reaches the filter intact.
#[test]
fn task_names_with_query_characters_are_filtered_exactly() {
    let dir = temp_dir("cli-query");
    let s = support::server::Server::start(&dir, &[], "");
    for name in ["a+b", "a b", "x#y", "k=v&z"] {
        s.submit(support::server::shell(name, "true"));
    }
    for name in ["a+b", "a b", "x#y", "k=v&z"] {
        let out = etask(&dir, &["tasks", "--server", &s.url, "--name", name]);
        let t = text(&out);
        assert_eq!(code(&out), 0, "{t}");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let rows: Vec<&str> = stdout.lines().skip(1).collect();
        assert_eq!(rows.len(), 1, "--name {name:?}: {t}");
        assert!(rows[0].contains(name), "--name {name:?}: {t}");
    }
}

/// A stderr nobody reads (a stopped `| tee`, a paused terminal) must not stop the server: its
/// log lines fill the pipe, and every task still runs to its end. Before, every thread that
/// logged blocked behind the one `write(2)` and the server stood still after ~700 tasks while
/// `/healthz` said ok. The lines that did not fit are counted and said once stderr moves.
#[test]
fn a_stderr_nobody_reads_does_not_stop_the_server() {
    let dir = temp_dir("cli-stalled-stderr");
    let port = support::free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(["server", "--mode", "all", "--grpc-listen", ""])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("ETASK_TOKEN")
        .env("ETASK_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped()) // held open, never read until the end
        .spawn()
        .expect("start server");
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    while ureq::get(&format!("{url}/healthz")).call().is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20), "never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(20))
        .build();
    let n = 600;
    let mut last = 0;
    for i in 0..n {
        let body = serde_json::json!({
            "name": format!("t{i}"),
            "program": {"kind": "shell", "code": "true"},
        });
        let v: serde_json::Value = agent
            .post(&format!("{url}/api/v1/tasks"))
            .send_json(body)
            .unwrap_or_else(|e| panic!("task {i} not taken: {e}"))
            .into_json()
            .unwrap();
        last = v["execution_id"].as_i64().unwrap();
    }
    let t0 = Instant::now();
    loop {
        let v: serde_json::Value = agent
            .get(&format!("{url}/api/v1/executions/{last}"))
            .call()
            .expect("server answers")
            .into_json()
            .unwrap();
        if v["status"] == "succeeded" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the last task never ran: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Once the queue of lines is full too, /healthz says the log has a gap (and stays 200:
    // the server itself is not held up). More tasks until then (each logs a few lines).
    let health = || -> serde_json::Value {
        agent
            .get(&format!("{url}/healthz"))
            .call()
            .expect("healthy")
            .into_json()
            .unwrap()
    };
    let mut h = health();
    for i in 0..5_000 {
        if h["log"] == "dropping lines" {
            break;
        }
        let body = serde_json::json!({
            "name": format!("more{i}"),
            "program": {"kind": "shell", "code": "true"},
        });
        agent
            .post(&format!("{url}/api/v1/tasks"))
            .send_json(body)
            .unwrap_or_else(|e| panic!("task more{i} not taken: {e}"));
        if i % 50 == 0 {
            h = health();
        }
    }
    assert_eq!(h["log"], "dropping lines", "{h}");
    assert_eq!(h["status"], "ok", "{h}");
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    // Once stderr moved again, the rest was written, in order, up to the last line.
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        &log[log.len().saturating_sub(2000)..]
    );
    assert!(
        log.trim_end().ends_with("etask::server: stopped"),
        "{}",
        &log[log.len().saturating_sub(2000)..]
    );
}

/// Output that cannot be written ends a command with a failure, never with 0 and never with a
/// panic: `run` behind a reader that goes away cancels its endless script and ends like a
/// pipeline's writer (141); `run`, `logs`, `--help` and `--version` into a full disk exit 71.
#[test]
fn unwritable_output_ends_run_logs_and_help_with_a_failure() {
    let dir = temp_dir("cli-unwritable");
    let loud = dir.join("loud.sh");
    std::fs::write(&loud, "while true; do echo line; done\n").unwrap();
    let etask_bin = env!("CARGO_BIN_EXE_etask");
    let sh = |cmd: &str| {
        let t0 = Instant::now();
        let out = Command::new("bash")
            .args(["-c", cmd])
            .env("TMPDIR", &dir)
            .env_remove("ETASK_TOKEN")
            .output()
            .unwrap();
        (out, t0.elapsed())
    };
    // An endless script behind `head -c1`: the run is cancelled, the pipeline ends.
    let (out, took) = sh(&format!(
        "timeout 60 {etask_bin} run --shell {} | head -c1 >/dev/null; echo ${{PIPESTATUS[0]}}",
        loud.display()
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "141",
        "{}",
        text(&out)
    );
    assert!(took < Duration::from_secs(30), "run went on for {took:?}");
    // Into a full disk.
    let (out, _) = sh(&format!(
        "timeout 60 {etask_bin} run --shell {} >/dev/full; echo $?",
        loud.display()
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "71",
        "{}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write the output"));
    let (out, _) = sh(&format!(
        "{etask_bin} run --json --exec -- echo hi >/dev/full; echo $?"
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "71",
        "{}",
        text(&out)
    );
    for flag in ["--help", "--version"] {
        let (out, _) = sh(&format!("{etask_bin} {flag} >/dev/full; echo $?"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "71",
            "{flag}: {err}"
        );
        assert!(!err.contains("panicked"), "{flag}: {err}");
    }
    // A client's logs into a full disk.
    let s = support::server::Server::start(&dir, &[], "");
    let (_, exec) = s.submit(support::server::shell("chatty", "seq 1 1000"));
    s.wait_final(exec, Duration::from_secs(20));
    let (out, _) = sh(&format!(
        "{etask_bin} logs {exec} --server {} >/dev/full; echo $?",
        s.url
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "71",
        "{}",
        text(&out)
    );
}

/// A scheduler that answers what no scheduler answers: every request gets `body` with 200.
/// `None`: accepts connections and never answers. Returns its URL.
fn fake_scheduler(body: Option<&'static str>) -> String {
    fake_scheduler_status(200, body)
}

/// `fake_scheduler` answering with `status`.
fn fake_scheduler_status(status: u16, body: Option<&'static str>) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            match body {
                Some(b) => {
                    let _ = write!(
                        c,
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                        b.len()
                    );
                }
                None => held.push(c),
            }
        }
    });
    url
}

/// Answers etask does not understand end a command with 70 and say so (a `{"items": 5}` list
/// printed an empty table and exited 0; `get` printed `[]`); a scheduler that accepts and
/// never answers ends `logs` and `logs -f` after the 30 s read timeout with 69 (they waited
/// forever).
#[test]
fn answers_of_the_wrong_shape_and_silent_schedulers_end_client_commands() {
    let dir = temp_dir("cli-wrong-shape");
    let silent = fake_scheduler(None);
    let started = Instant::now();
    let follow = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(["logs", "1", "-f", "--server", &silent])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for (body, args) in [
        (r#"{"items": 5}"#, vec!["tasks"]),
        (r#"{"items": [1, 2]}"#, vec!["nodes"]),
        (r#"{"nope": []}"#, vec!["tasks"]),
        ("[]", vec!["get", "1"]),
        ("null", vec!["cancel", "1"]),
    ] {
        let url = fake_scheduler(Some(body));
        let o = client(&dir, &url, &args);
        assert_eq!(code(&o), 70, "{args:?} with {body}: {}", text(&o));
        assert!(text(&o).contains("bad response"), "{}", text(&o));
    }
    // Another service's 404 is not "no such execution" (66): 70.
    let other = fake_scheduler_status(404, Some("<html>not found</html>"));
    for args in [vec!["tasks"], vec!["get", "1"]] {
        let o = client(&dir, &other, &args);
        assert_eq!(code(&o), 70, "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains("without the API's error body"),
            "{}",
            text(&o)
        );
    }
    // Names from a hostile server reach the terminal escaped, never as escape sequences.
    let url = fake_scheduler(Some(
        r#"{"items": [{"id": 1, "name": "x\u001b]0;pwned\u0007\u202ey", "paused": false}]}"#,
    ));
    let o = client(&dir, &url, &["tasks"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        !o.stdout.contains(&0x1b) && !o.stdout.contains(&0x07),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains(r"x\u{1b}]0;pwned\u{7}\u{202e}y"),
        "{}",
        text(&o)
    );
    let out = follow.wait_with_output().unwrap();
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(45),
        "logs -f against a silent scheduler took {took:?}"
    );
}
