//! The packages, for real: builds the .deb and .rpm with scripts/package.sh, compares their
//! contents, then boots a Debian 12 rootfs with systemd as PID 1 (systemd-nspawn), installs
//! the .deb, runs the scheduler, an executor and an agent as their units, upgrades, removes,
//! purges, and installs the .rpm in the same system. Ignored by plain `cargo test` (needs root,
//! mmdebstrap, systemd-nspawn, rpm and a few minutes); scripts/test.sh runs it after the musl
//! build: `cargo test --test packaging -- --ignored --nocapture`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn home() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
}

fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| home().join(".cache/etask-target"))
}

fn tools_dir() -> PathBuf {
    std::env::var("ETASK_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| home().join(".cache/etask-tools"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs and returns stdout; panics with both streams when it fails.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Packages {
    dir: PathBuf,
}

impl Packages {
    fn deb(&self, rev: u32) -> PathBuf {
        self.dir.join(format!("etask_{VERSION}-{rev}_amd64.deb"))
    }
    fn rpm(&self, rev: u32) -> PathBuf {
        self.dir.join(format!("etask-{VERSION}-{rev}.x86_64.rpm"))
    }
}

/// The packages of revision 1 and, for the upgrade, revision 2 (same binary, bumped version),
/// built once per test binary by the script operators and CI use.
fn packages() -> &'static Packages {
    static P: OnceLock<Packages> = OnceLock::new();
    P.get_or_init(|| {
        let dir = target_dir().join("packages-test");
        let _ = std::fs::remove_dir_all(&dir);
        for rev in ["1", "2"] {
            let t0 = Instant::now();
            ok(Command::new(repo().join("scripts/package.sh"))
                .args(["--out"])
                .arg(&dir)
                .args(["--revision", rev]));
            eprintln!("packaging: revision {rev} built in {:.1?}", t0.elapsed());
        }
        Packages { dir }
    })
}

/// The file list of a .deb as absolute paths of files and symlinks (directories left out).
fn deb_files(deb: &Path) -> Vec<String> {
    let mut v: Vec<String> = ok(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    v.sort();
    v
}

#[test]
#[ignore = "needs the packaging tools and the musl target; scripts/test.sh runs it"]
fn deb_and_rpm_ship_the_same_static_binary_units_and_scripts() {
    let p = packages();
    let deb = p.deb(1);
    let rpm = p.rpm(1);
    for f in [&deb, &rpm] {
        let len = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        eprintln!("packaging: {} {} KiB", f.display(), len / 1024);
    }
    // Debian puts units in /lib/systemd/system, RPM distributions in /usr/lib/systemd/system
    // (one directory on merged-/usr systems); everything else is at the same path.
    let deb_list: Vec<String> = deb_files(&deb)
        .into_iter()
        .map(|f| match f.strip_prefix("/lib/systemd/") {
            Some(rest) => format!("/usr/lib/systemd/{rest}"),
            None => f,
        })
        .collect();
    let mut rpm_list: Vec<String> = ok(Command::new("rpm").args(["-qp", "-l"]).arg(&rpm))
        .lines()
        .map(str::to_string)
        .collect();
    rpm_list.sort();
    // cargo-deb adds the Debian copyright file; RPM keeps licences in the header.
    let deb_only: Vec<&String> = deb_list.iter().filter(|f| !rpm_list.contains(f)).collect();
    let rpm_only: Vec<&String> = rpm_list.iter().filter(|f| !deb_list.contains(f)).collect();
    assert_eq!(
        deb_only,
        vec!["/usr/share/doc/etask/copyright"],
        "files only in the .deb"
    );
    assert!(rpm_only.is_empty(), "files only in the .rpm: {rpm_only:?}");
    for want in [
        "/usr/bin/etask",
        "/etc/etask/etask.toml",
        "/usr/lib/systemd/system/etask-scheduler.service",
        "/usr/lib/systemd/system/etask-executor.service",
        "/usr/lib/systemd/system/etask-agent@.service",
        "/usr/share/etask/hardened.conf",
        "/usr/lib/sysusers.d/etask.conf",
        "/usr/lib/tmpfiles.d/etask.conf",
    ] {
        assert!(
            rpm_list.iter().any(|f| f == want),
            "{want} missing: {rpm_list:?}"
        );
    }

    // Conffiles: the config survives upgrades on both.
    let ctrl = tempdir("ctrl");
    ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctrl));
    let conffiles = std::fs::read_to_string(ctrl.join("conffiles")).unwrap_or_default();
    assert_eq!(conffiles.trim(), "/etc/etask/etask.toml");
    let rpm_config = ok(Command::new("rpm").args(["-qp", "--configfiles"]).arg(&rpm));
    assert_eq!(rpm_config.trim(), "/etc/etask/etask.toml");

    // Scriptlets and requirements: the same duties as the Debian maintainer scripts, and
    // nothing required beyond a shell (the binary is static).
    let scripts = ok(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm));
    let scriptlet = |phase: &str| -> String {
        // Sections start with "<phase> scriptlet:" or "<phase> scriptlet (using /bin/sh):".
        let mut on = false;
        let mut text = String::new();
        for l in scripts.lines() {
            if l.contains(" scriptlet") && l.ends_with(':') && !l.starts_with('#') {
                on = l.starts_with(&format!("{phase} scriptlet"));
            } else if on {
                text += l;
                text += "\n";
            }
        }
        text
    };
    for (phase, duty) in [
        ("preinstall", "systemd-sysusers"),
        ("postinstall", "daemon-reload"),
        ("postinstall", "try-restart"),
        ("preuninstall", "systemctl stop"),
        ("postuninstall", "daemon-reload"),
    ] {
        assert!(
            scriptlet(phase).contains(duty),
            "{phase} lacks {duty}:\n{scripts}"
        );
    }
    // The user %pre creates is the one of the sysusers file.
    let sysusers =
        std::fs::read_to_string(repo().join("packaging/sysusers.conf")).unwrap_or_default();
    let user_line = sysusers
        .lines()
        .find(|l| l.starts_with("u "))
        .unwrap_or("none");
    assert!(
        scriptlet("preinstall").contains(user_line),
        "%pre and sysusers.conf differ"
    );
    for (script, duty) in [
        ("postinst", "systemd-sysusers"),
        ("postinst", "daemon-reload"),
        ("postinst", "try-restart"),
        ("prerm", "systemctl stop"),
        ("postrm", "rm -rf /var/lib/etask"),
    ] {
        let text = std::fs::read_to_string(ctrl.join(script)).unwrap_or_default();
        assert!(text.contains(duty), "{script} lacks {duty}:\n{text}");
    }
    let requires = ok(Command::new("rpm").args(["-qp", "--requires"]).arg(&rpm));
    // rpmlib() features and the package's own config() are what every RPM requires.
    let mut deps: Vec<&str> = requires
        .lines()
        .filter(|l| !l.starts_with("rpmlib(") && !l.starts_with("config(etask)"))
        .collect();
    deps.dedup();
    assert_eq!(deps, vec!["/bin/sh"], "rpm requires: {requires}");
    let depends = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Depends"));
    assert!(
        String::from_utf8_lossy(&depends.stdout).trim().is_empty(),
        "the .deb depends on {:?}",
        String::from_utf8_lossy(&depends.stdout)
    );

    // The binary inside is the static musl one, within budget, and says what it is.
    let x = tempdir("x");
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x));
    let bin = x.join("usr/bin/etask");
    let dynamic = ok(Command::new("readelf").arg("-d").arg(&bin));
    assert!(!dynamic.contains("NEEDED"), "not static:\n{dynamic}");
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(u64::MAX);
    eprintln!(
        "packaging: /usr/bin/etask {} bytes ({:.2} MiB), static",
        size,
        size as f64 / 1048576.0
    );
    assert!(
        size <= 20 * 1024 * 1024,
        "binary is {size} bytes, over the 20 MiB budget of scripts/package.sh"
    );
    let version = ok(Command::new(&bin).arg("--version"));
    assert!(
        version.starts_with(&format!("etask {VERSION} (")) && !version.contains("(unknown)"),
        "etask --version printed {version:?}"
    );
    // The shipped config is valid for the binary it ships with.
    ok(Command::new(&bin)
        .args(["config", "--check"])
        .arg(x.join("etc/etask/etask.toml")));
    let _ = std::fs::remove_dir_all(&x);
    let _ = std::fs::remove_dir_all(&ctrl);
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("etask-pkgtest-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

// ---------------------------------------------------------------------------------------------
// The booted system.

/// Packages the rootfs gets besides minbase: systemd as init, curl for the HTTP API, ss, rpm.
const ROOTFS_PACKAGES: &str = "systemd,systemd-sysv,dbus,libnss-systemd,curl,iproute2,rpm";

/// A minimal Debian 12 rootfs from the Debian mirror apt uses here, built once and cached
/// outside the clone (its name changes with the package list).
fn rootfs() -> Result<PathBuf, String> {
    let tag: u32 = ROOTFS_PACKAGES
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    let dir = tools_dir().join(format!("rootfs-bookworm-{tag:08x}"));
    if dir.join("usr/lib/systemd/systemd").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tools_dir()).map_err(|e| e.to_string())?;
    // The mirror lines apt uses on this machine (deb822 or one-line style).
    let sources = [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ]
    .into_iter()
    .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
    let t0 = Instant::now();
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={ROOTFS_PACKAGES}"))
        .arg("bookworm")
        .arg(&tmp);
    if let Some(s) = sources {
        cmd.arg(s);
    }
    let out = run(&mut cmd);
    if !out.status.success() {
        return Err(format!(
            "mmdebstrap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::rename(&tmp, &dir).map_err(|e| e.to_string())?;
    eprintln!(
        "packaging: built the Debian 12 rootfs in {:.1?}",
        t0.elapsed()
    );
    Ok(dir)
}

/// A Debian system booted with systemd-nspawn: its own network namespace (loopback only), a
/// tmpfs overlay over the cached rootfs (nothing persists), commands run with nsenter. Halted
/// and its cgroups removed on drop.
struct Booted {
    nspawn: std::process::Child,
    /// PID (on the host) of the container's systemd.
    init: u32,
    cgroups: Vec<PathBuf>,
    console: PathBuf,
}

impl Booted {
    fn boot(rootfs: &Path, binds: &[(PathBuf, &str)]) -> Result<Booted, String> {
        // nspawn is started from a cgroup of its own (on every hierarchy the host mounts), so
        // the container's cgroups live below it and are removed with it.
        let name = format!("etask-pkgtest-{}", std::process::id());
        let roots: Vec<PathBuf> = if Path::new("/sys/fs/cgroup/unified").is_dir() {
            vec![
                "/sys/fs/cgroup/unified".into(),
                "/sys/fs/cgroup/systemd".into(),
            ]
        } else {
            vec!["/sys/fs/cgroup".into()]
        };
        let cgroups: Vec<PathBuf> = roots.iter().map(|r| r.join(&name)).collect();
        let mut enter = String::new();
        for cg in &cgroups {
            enter += &format!(
                "mkdir -p {0} && echo $$ > {0}/cgroup.procs && ",
                cg.display()
            );
        }
        let console = tempdir("console").join("console.log");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{enter}exec systemd-nspawn \"$@\""))
            .arg("sh")
            .arg("-D")
            .arg(rootfs)
            .args([
                "--volatile=overlay",
                "--private-network",
                "--register=no",
                "--keep-unit",
                "--boot",
                "--console=read-only",
            ]);
        for (host, inside) in binds {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        let log = std::fs::File::create(&console).map_err(|e| e.to_string())?;
        let nspawn = cmd
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start systemd-nspawn: {e}"))?;
        let mut b = Booted {
            init: 0,
            nspawn,
            cgroups,
            console,
        };
        let t0 = Instant::now();
        // The container's init: the child of nspawn that became systemd (nspawn forks helpers
        // first).
        while b.init == 0 {
            if t0.elapsed() > Duration::from_secs(20)
                || b.nspawn.try_wait().ok().flatten().is_some()
            {
                return Err(format!("the container did not start:\n{}", b.console_log()));
            }
            b.init = children(b.nspawn.id())
                .into_iter()
                .find(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "systemd")
                })
                .unwrap_or(0);
            std::thread::sleep(Duration::from_millis(50));
        }
        // `is-system-running --wait` fails before the bus is up: poll instead.
        loop {
            let state = b.sh("systemctl is-system-running 2>/dev/null || true");
            let state = state.trim();
            if state == "running" || state == "degraded" {
                eprintln!(
                    "packaging: container booted to {state} in {:.1?}",
                    t0.elapsed()
                );
                if state == "degraded" {
                    eprintln!("{}", b.sh("systemctl --failed --no-pager || true"));
                }
                return Ok(b);
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "the container did not boot (state {state:?}):\n{}",
                    b.console_log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn console_log(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Runs a shell script inside (as root, clean environment); returns its status and output.
    fn try_sh(&self, script: &str) -> (bool, String) {
        let out = run(Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a", "--"])
            .args([
                "/usr/bin/env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
            ])
            .args(["/bin/sh", "-c", script])
            .stdin(Stdio::null()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Runs a script inside that must succeed; returns its output.
    fn sh(&self, script: &str) -> String {
        let (good, out) = self.try_sh(script);
        assert!(
            good,
            "in the container, failed:\n{script}\n--- output:\n{out}"
        );
        out
    }

    /// `systemctl start` returns 0 for a service that dies at once: check it stays active.
    fn start(&self, unit: &str) {
        let (good, out) = self.try_sh(&format!("systemctl start {unit}"));
        let state = self.prop(unit, "ActiveState");
        assert!(
            good && state == "active",
            "{unit} did not start ({state}): {out}\n{}",
            self.sh(&format!("journalctl -u {unit} --no-pager -n 40 || true"))
        );
    }

    fn prop(&self, unit: &str, prop: &str) -> String {
        self.sh(&format!("systemctl show -P {prop} {unit}"))
            .trim()
            .to_string()
    }

    /// POSTs a task to the scheduler inside; returns its execution id.
    fn submit(&self, task: &serde_json::Value) -> i64 {
        let body = task.to_string().replace('\'', "'\\''");
        let created = self.sh(&format!(
            "curl -sS -f -X POST http://127.0.0.1:8765/api/v1/tasks -d '{body}'"
        ));
        let created: serde_json::Value =
            serde_json::from_str(&created).unwrap_or_else(|e| panic!("{e}: {created}"));
        created["execution_id"].as_i64().expect("execution_id")
    }

    /// Submits a task and waits for its execution to end; returns it.
    fn run_task(&self, task: &serde_json::Value) -> serde_json::Value {
        let id = self.submit(task);
        self.wait_execution(id, |e| {
            matches!(
                e["status"].as_str(),
                Some("succeeded" | "failed" | "timed_out" | "cancelled" | "lost")
            )
        })
    }

    fn execution(&self, id: i64) -> serde_json::Value {
        let text = self.sh(&format!(
            "curl -sS -f http://127.0.0.1:8765/api/v1/executions/{id}"
        ));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    fn wait_execution(
        &self,
        id: i64,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let e = self.execution(id);
            if done(&e) {
                return e;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "execution {id} stuck: {e}\n{}",
                self.sh("journalctl -u 'etask-*' --no-pager -n 60 || true")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        // SIGTERM makes nspawn halt the container cleanly.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while self.nspawn.try_wait().ok().flatten().is_none() {
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // A container whose nspawn died early (or was killed above) leaves its init behind,
        // re-parented to the host's PID 1: kill what is still in our cgroups, then remove them.
        for cg in &self.cgroups {
            let t0 = Instant::now();
            loop {
                let left = cgroup_pids(cg);
                if left.is_empty() || t0.elapsed() > Duration::from_secs(10) {
                    break;
                }
                for pid in left {
                    // SAFETY: these processes were started by this test (the container's).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            remove_cgroup(cg);
        }
    }
}

/// The children of a process, from every one of its threads.
fn children(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            v.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    v
}

/// Every process in a cgroup and below it.
fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                v.extend(cgroup_pids(&e.path()));
            }
        }
    }
    v
}

/// Removes a cgroup directory and everything below it, deepest first.
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Why the booted-system part cannot run here, if it cannot.
fn boot_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for tool in ["systemd-nspawn", "mmdebstrap", "nsenter", "rpm"] {
        if !have(tool) {
            return Some(format!(
                "{tool} is not installed (scripts/test.sh installs it)"
            ));
        }
    }
    None
}

fn tansu() -> PathBuf {
    std::env::var("ETASK_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|_| tools_dir().join("tansu"))
}

fn etcd() -> PathBuf {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// The config the test writes: Kafka and etcd inside the container, pools dmz and ro.
const CONFIG: &str = r#"
[server]
data_dir = "/var/lib/etask"
[registry]
etcd = "http://127.0.0.1:2379"
[kafka]
brokers = "127.0.0.1:9092"
pools = ["dmz", "ro"]
[executor]
pool = "core"
[agent]
drain_seconds = 20
"#;

/// Writes the test's config, keeping the `[security]` section the package shipped (`security`,
/// read right after the install): the roles run with the packaged signing settings.
fn write_config(c: &Booted, security: &str) {
    c.sh(&format!(
        "cat > /etc/etask/etask.toml <<'EOF'\n{CONFIG}\n{security}\nEOF"
    ));
}

/// The shipped `[security]` section (to the end of the file), after checking that it turns
/// signing on with the key pair the install made: private key the scheduler's only.
fn packaged_security(c: &Booted) -> String {
    let security = c.sh("sed -n '/^\\[security\\]/,$p' /etc/etask/etask.toml");
    for want in [
        "signing_key = \"/etc/etask/dispatch.key\"",
        "trusted_keys = [\"/etc/etask/dispatch.pub\"]",
        "require_signed = true",
    ] {
        assert!(
            security.lines().any(|l| l.trim() == want),
            "the shipped config lacks {want}:\n{security}"
        );
    }
    assert_eq!(
        c.sh("stat -c %U:%G:%a /etc/etask/dispatch.key /etc/etask/dispatch.pub"),
        "etask:etask:600\nroot:root:644\n",
        "key pair made on install"
    );
    security
}

fn shell_task(name: &str, pool: Option<(&str, &str)>, code: &str) -> serde_json::Value {
    let mut t = serde_json::json!({
        "name": name,
        "program": {"kind": "shell", "code": code},
        "timeout_seconds": 60,
    });
    if let Some((path, pool)) = pool {
        t["target"] = serde_json::json!({"path": path, "pool": pool});
    }
    t
}

fn assert_result(e: &serde_json::Value, key: &str, want: &serde_json::Value) {
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(&e["result"][key], want, "{e}");
}

#[test]
#[ignore = "needs root, mmdebstrap, systemd-nspawn and rpm; scripts/test.sh runs it"]
fn packages_install_run_upgrade_and_remove_in_a_booted_debian() {
    let p = packages();
    if let Some(why) = boot_unavailable() {
        eprintln!("packaging: SKIPPED the booted-system test: {why}");
        return;
    }
    let rootfs = match rootfs() {
        Ok(r) => r,
        Err(why) => {
            eprintln!("packaging: SKIPPED the booted-system test: cannot build the rootfs: {why}");
            return;
        }
    };
    let binds = [
        (p.dir.clone(), "/pkgs"),
        (tansu(), "/usr/local/bin/tansu"),
        (etcd(), "/usr/local/bin/etcd"),
    ];
    let t0 = Instant::now();
    let c = match Booted::boot(&rootfs, &binds) {
        Ok(c) => c,
        Err(why) => {
            eprintln!(
                "packaging: SKIPPED the booted-system test: booting is impossible here: {why}"
            );
            return;
        }
    };

    // Broker and registry inside: --private-network gives the container its own loopback.
    c.sh(
        "systemd-run --unit=tansu --quiet /usr/local/bin/tansu broker \
          --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
          --storage-engine memory://tansu/",
    );
    c.sh(
        "systemd-run --unit=etcd --quiet /usr/local/bin/etcd --data-dir /var/tmp/etcd \
          --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
          --listen-peer-urls http://127.0.0.1:2380",
    );
    c.sh("for i in $(seq 100); do (echo >/dev/tcp/127.0.0.1/9092) 2>/dev/null && break; sleep 0.1; done
          for t in etask.events etask.control etask.dead-letter etask.dispatch.dmz etask.dispatch.ro; do
            /usr/local/bin/tansu topic create $t --broker tcp://127.0.0.1:9092 --partitions 2 >/dev/null
          done");

    // Install: the user exists, the config is private to it, nothing started or enabled.
    c.sh(&format!("dpkg -i /pkgs/{}", file_name(&p.deb(1))));
    c.sh("getent passwd etask && test \"$(stat -c %U:%G:%a /etc/etask/etask.toml)\" = root:etask:640");
    let security = packaged_security(&c);
    // A reinstall (dpkg runs postinst again) keeps the pair: nodes given its .pub still trust it.
    let pair = c.sh("cat /etc/etask/dispatch.pub");
    c.sh(&format!("dpkg -i /pkgs/{}", file_name(&p.deb(1))));
    assert_eq!(
        c.sh("cat /etc/etask/dispatch.pub"),
        pair,
        "the key pair changed"
    );
    for unit in ["etask-scheduler", "etask-executor", "etask-agent@dmz"] {
        assert_eq!(
            c.prop(unit, "ActiveState"),
            "inactive",
            "{unit} started on install"
        );
        assert_eq!(c.prop(unit, "UnitFileState"), "disabled", "{unit}");
    }
    let verify = c.sh(
        "cd /lib/systemd/system && systemd-analyze verify etask-scheduler.service \
                       etask-executor.service etask-agent@dmz.service 2>&1",
    );
    assert!(
        !verify.contains("etask"),
        "systemd-analyze verify complains:\n{verify}"
    );
    for unit in ["etask-scheduler", "etask-executor", "etask-agent@dmz"] {
        let sec = c.sh(&format!(
            "systemd-analyze security {unit} --no-pager 2>&1 | tail -1"
        ));
        eprintln!("packaging: systemd-analyze security {unit}: {}", sec.trim());
    }

    // A broken config fails the start with a clear journal line (ExecStartPre).
    c.sh("printf '[server]\\nlisen = 1\\n' > /etc/etask/etask.toml");
    let (started, _) = c.try_sh("systemctl start etask-scheduler");
    assert!(!started, "the scheduler started with a broken config");
    let journal = c.sh("journalctl -u etask-scheduler --no-pager -o cat");
    assert!(
        journal.contains("lisen"),
        "no clear journal line:\n{journal}"
    );
    c.sh("systemctl reset-failed etask-scheduler");
    c.sh("printf '[server]\\ndata_dir = \"/var/lib/etask\"\\n' > /etc/etask/etask.toml");
    let (started, _) = c.try_sh("systemctl start etask-agent@dmz");
    assert!(!started, "an agent started without Kafka configured");
    let journal = c.sh("journalctl -u etask-agent@dmz --no-pager -o cat");
    assert!(
        journal.to_lowercase().contains("kafka"),
        "no clear journal line:\n{journal}"
    );
    c.sh("systemctl reset-failed etask-agent@dmz");

    // The three roles as their units, with the shipped signing settings.
    write_config(&c, &security);
    c.start("etask-scheduler");
    c.start("etask-executor");
    c.start("etask-agent@dmz");
    let sched_pid = c.prop("etask-scheduler", "MainPID");
    assert_eq!(
        c.sh(&format!(
            "getent passwd $(awk '/^Uid:/ {{print $2}}' /proc/{sched_pid}/status) | cut -d: -f1"
        ))
        .trim(),
        "etask",
        "the scheduler does not run as etask"
    );
    let agent_pid = c.prop("etask-agent@dmz", "MainPID");
    let listening = c.sh("ss -Hltnup");
    assert!(
        !listening.contains(&format!("pid={agent_pid},")),
        "the agent listens:\n{listening}"
    );
    assert!(
        listening.contains("127.0.0.1:8765"),
        "scheduler HTTP:\n{listening}"
    );
    // journald: the line's <N> prefix is taken as its level (not left in the message), and
    // the time comes from the journal only.
    let info = c.sh("journalctl -u etask-scheduler -p info --no-pager -o cat");
    assert!(
        info.contains("started mode=scheduler"),
        "no start line:\n{info}"
    );
    assert!(
        !info
            .lines()
            .any(|l| l.starts_with("20") || l.starts_with('<')),
        "timestamp or priority prefix left in the message:\n{info}"
    );
    let contained =
        c.sh("journalctl -u etask-agent@dmz --no-pager -o cat | grep -m1 'runs contained' || true");
    eprintln!("packaging: etask-agent@dmz: {}", contained.trim());
    // Signing is on: the scheduler signs, the nodes verify with the packaged key.
    let sched_journal = c.sh("journalctl -u etask-scheduler --no-pager -o cat");
    assert!(
        !sched_journal.contains("no security.signing_key"),
        "the packaged scheduler does not sign:\n{sched_journal}"
    );
    for unit in ["etask-agent@dmz", "etask-executor"] {
        let j = c.sh(&format!("journalctl -u {unit} --no-pager -o cat"));
        assert!(
            j.contains("dispatches and cancels are verified"),
            "{unit} does not verify dispatches:\n{j}"
        );
    }
    let status = c.sh("systemctl status etask-agent@dmz --no-pager || true");
    assert!(status.contains("pool dmz"), "no READY status:\n{status}");

    // A task over HTTP to each node; the fd-3 result comes back.
    let e = c.run_task(&shell_task(
        "agent",
        Some(("agent", "dmz")),
        "echo \"{\\\"uid\\\": $(id -u), \\\"ws\\\": \\\"$ETASK_WORKSPACE\\\"}\" >&3",
    ));
    assert_result(&e, "uid", &serde_json::json!(0));
    assert!(
        e["result"]["ws"]
            .as_str()
            .is_some_and(|w| w.starts_with("/run/etask/agent-dmz/")),
        "workspace not on /run/etask: {e}"
    );
    let e = c.run_task(&shell_task(
        "push",
        Some(("push", "core")),
        "echo '{\"pushed\": true}' >&3",
    ));
    assert_result(&e, "pushed", &serde_json::json!(true));

    // Stopping an agent drains: the running script finishes and is reported.
    let id = c.submit(&shell_task(
        "drain",
        Some(("agent", "dmz")),
        "sleep 3; echo '{\"drained\": true}' >&3",
    ));
    c.wait_execution(id, |e| e["status"] == "running");
    let stop0 = Instant::now();
    c.sh("systemctl stop etask-agent@dmz");
    let took = stop0.elapsed();
    let e = c.wait_execution(id, |e| e["status"] != "running");
    assert_result(&e, "drained", &serde_json::json!(true));
    eprintln!("packaging: systemctl stop drained a 3 s script in {took:.1?}");
    assert_eq!(c.prop("etask-agent@dmz", "ActiveState"), "inactive");
    c.start("etask-agent@dmz");

    // The hardened drop-in, enabled with one command: an unprivileged node on a read-only system.
    c.sh("install -Dm644 /usr/share/etask/hardened.conf /etc/systemd/system/etask-agent@ro.service.d/hardened.conf \
          && systemctl daemon-reload");
    c.start("etask-agent@ro");
    let e = c.run_task(&shell_task(
        "ro",
        Some(("agent", "ro")),
        "if touch /etc/etask-probe 2>/dev/null; then w=true; else w=false; fi\n\
         echo \"{\\\"uid\\\": $(id -u), \\\"etc_writable\\\": $w}\" >&3",
    ));
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_ne!(
        e["result"]["uid"],
        serde_json::json!(0),
        "hardened runs as root: {e}"
    );
    assert_eq!(e["result"]["etc_writable"], serde_json::json!(false), "{e}");
    let sec = c.sh("systemd-analyze security etask-agent@ro --no-pager 2>&1 | tail -1");
    eprintln!(
        "packaging: systemd-analyze security etask-agent@ro (hardened): {}",
        sec.trim()
    );
    c.sh("systemctl stop etask-agent@ro");

    // Upgrade to a bumped version: the edited config stays, running services restart.
    let conf_before = c.sh("sha256sum /etc/etask/etask.toml");
    let pids_before: Vec<String> = ["etask-scheduler", "etask-executor", "etask-agent@dmz"]
        .iter()
        .map(|u| c.prop(u, "MainPID"))
        .collect();
    c.sh(&format!(
        "dpkg -i --force-confold /pkgs/{}",
        file_name(&p.deb(2))
    ));
    assert_eq!(
        c.sh("sha256sum /etc/etask/etask.toml"),
        conf_before,
        "config changed"
    );
    assert!(c
        .sh("dpkg-query -W etask")
        .contains(&format!("{VERSION}-2")));
    for (u, before) in ["etask-scheduler", "etask-executor", "etask-agent@dmz"]
        .iter()
        .zip(&pids_before)
    {
        assert_eq!(c.prop(u, "ActiveState"), "active", "{u} after upgrade");
        assert_ne!(&c.prop(u, "MainPID"), before, "{u} was not restarted");
    }
    assert_eq!(
        c.prop("etask-agent@ro", "ActiveState"),
        "inactive",
        "the upgrade started a stopped service"
    );
    let e = c.run_task(&shell_task(
        "after-upgrade",
        Some(("agent", "dmz")),
        "echo '{\"v\": 2}' >&3",
    ));
    assert_result(&e, "v", &serde_json::json!(2));

    // Remove: services stopped, units gone, state and config kept. Purge: state gone.
    c.sh("dpkg -r etask");
    assert!(
        !c.try_sh("pgrep -x etask").0,
        "etask still runs after dpkg -r"
    );
    c.sh("test ! -e /lib/systemd/system/etask-scheduler.service && test -d /var/lib/etask/scheduler \
          && test -f /etc/etask/etask.toml");
    assert_eq!(c.prop("etask-scheduler", "LoadState"), "not-found");
    c.sh("dpkg -P etask");
    c.sh("test ! -e /var/lib/etask && test ! -e /etc/etask");

    // The .rpm in the same system, with Debian's rpm: its scriptlets create the user and
    // reload systemd; the roles start and run a task.
    c.sh(&format!(
        "rpm -i --nodeps /pkgs/{} 2>&1",
        file_name(&p.rpm(1))
    ));
    c.sh("getent passwd etask && test \"$(stat -c %G /etc/etask/etask.toml)\" = etask");
    let security = packaged_security(&c);
    write_config(&c, &security);
    c.start("etask-scheduler");
    c.start("etask-agent@dmz");
    let e = c.run_task(&shell_task(
        "rpm",
        Some(("agent", "dmz")),
        "echo '{\"rpm\": true}' >&3",
    ));
    assert_result(&e, "rpm", &serde_json::json!(true));
    c.sh("rpm -e etask 2>&1");
    assert!(
        !c.try_sh("pgrep -x etask").0,
        "etask still runs after rpm -e"
    );
    eprintln!("packaging: booted-system test took {:.1?}", t0.elapsed());
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
