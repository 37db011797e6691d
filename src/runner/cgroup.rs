//! Containment of runs in cgroups. At node start it finds where runs can be contained (a
//! writable cgroup v2 subtree with whichever controllers it has, the v1 `pids`, `memory`, `cpu`
//! and `freezer` hierarchies, or nothing) and removes what a previous incarnation of the node
//! left there. Per run it creates the run's cgroup with its limits, lists and kills its
//! processes, reads what the run used and removes the cgroup. Owns no run state; Linux only.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::program::Limits;
use super::spawn::Placement;

const LOG: &str = "etask::runner";

/// What the operator asked for (`node.cgroup`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Want {
    /// cgroup v2 where writable, the v1 controllers where not (or for what v2 lacks), else off.
    #[default]
    Auto,
    /// Only cgroup v2; the node does not start without a writable v2 subtree.
    V2,
    /// Only the v1 hierarchies; the node does not start without a writable one.
    V1,
    /// No cgroups: runs are tracked by the environment token (the fallback).
    Off,
}

/// A `node.cgroup` value that is none of auto, v2, v1, off.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node.cgroup must be \"auto\", \"v2\", \"v1\" or \"off\", not {0:?}")]
pub struct UnknownWant(pub String);

/// Back to its message, for the config's checks (which report text).
impl From<UnknownWant> for String {
    fn from(e: UnknownWant) -> String {
        e.to_string()
    }
}

impl std::str::FromStr for Want {
    type Err = UnknownWant;
    fn from_str(s: &str) -> Result<Want, UnknownWant> {
        match s {
            "auto" => Ok(Want::Auto),
            "v2" => Ok(Want::V2),
            "v1" => Ok(Want::V1),
            "off" => Ok(Want::Off),
            _ => Err(UnknownWant(s.to_owned())),
        }
    }
}

/// Where the pool contains its runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupConfig {
    pub want: Want,
    /// A cgroup path (as in /proc/self/cgroup, the same in every hierarchy) under which the
    /// node makes its subtree; None = the cgroup the node runs in (systemd `Delegate=yes`).
    pub root: Option<String>,
    /// The node's subtree. A named node finds what its previous incarnation left there and
    /// removes it at start; None = an ephemeral `etask-tmp-<pid>-<random>`, removed at stop
    /// (`etask run`, tests).
    pub name: Option<String>,
}

/// How runs are contained on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// cgroup v2 only (with whichever controllers the subtree has).
    Cgroup2,
    /// cgroup v2 for placement and kill, v1 controllers for the limits (hybrid hosts).
    Hybrid,
    /// cgroup v1 hierarchies only (legacy hosts: CentOS/RHEL 7-8).
    Cgroup1,
    /// No cgroup: processes are found by the run's environment token.
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cgroup2 => "cgroup2",
            Mode::Hybrid => "hybrid",
            Mode::Cgroup1 => "cgroup1",
            Mode::Off => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ctl {
    Memory,
    Pids,
    Cpu,
    Freezer,
    Cpuacct,
}

impl Ctl {
    fn name(self) -> &'static str {
        match self {
            Ctl::Memory => "memory",
            Ctl::Pids => "pids",
            Ctl::Cpu => "cpu",
            Ctl::Freezer => "freezer",
            Ctl::Cpuacct => "cpuacct",
        }
    }
    const V1: [Ctl; 5] = [Ctl::Pids, Ctl::Memory, Ctl::Cpu, Ctl::Freezer, Ctl::Cpuacct];
}

/// One v1 hierarchy the node uses: the controllers mounted there that it uses, and the
/// node's directory in it.
#[derive(Debug)]
struct V1Hier {
    ctls: BTreeSet<Ctl>,
    dir: PathBuf,
}

/// How a run's processes are killed at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillHow {
    /// v2 `cgroup.kill` (5.14+): one write, the kernel kills every process, forks included.
    CgroupKill,
    /// v2 `cgroup.freeze`: freeze, SIGKILL each, thaw.
    Freeze2,
    /// The v1 freezer hierarchy (index into `v1`): freeze, SIGKILL each, thaw.
    Freezer1(usize),
    /// SIGKILL each listed process until none is left (no freezer anywhere).
    Loop,
}

/// Where runs are contained, found once at node start and shared by the pool's threads.
#[derive(Debug)]
pub struct Containment {
    mode: Mode,
    /// The node's v2 directory and the controllers its runs get there.
    v2: Option<(PathBuf, BTreeSet<Ctl>)>,
    v1: Vec<V1Hier>,
    kill: KillHow,
    name: String,
    ephemeral: bool,
    /// Held for the life of the pool, one per hierarchy: a second live node on this subtree is
    /// refused, a restarted node knows what it finds there was left by a dead one, and other
    /// nodes leave it alone.
    _locks: Vec<File>,
    summary: String,
}

impl Containment {
    /// The fallback: no cgroups, runs tracked by their environment token (prefixed `name`).
    fn off(why: &str, name: String) -> Containment {
        Containment {
            mode: Mode::Off,
            v2: None,
            v1: Vec::new(),
            kill: KillHow::Loop,
            name,
            ephemeral: true,
            _locks: Vec::new(),
            summary: format!("none ({why}): runs are tracked by their environment token; a run that clears its environment and daemonizes escapes, limits are per-process rlimits only"),
        }
    }

    /// Finds where runs can be contained, takes the node's subtree and kills and removes
    /// whatever a previous incarnation of a named node left in it. Returns the fallback for
    /// `Want::Auto` when no hierarchy is writable.
    ///
    /// # Errors
    /// `Want::V2`/`Want::V1` cannot be satisfied, the name is not a plain file name, or another
    /// live node holds the same subtree.
    pub fn start(cfg: &CgroupConfig) -> io::Result<Containment> {
        let (name, ephemeral) = match &cfg.name {
            Some(n) => (n.clone(), false),
            None => (
                format!(
                    "{EPHEMERAL_PREFIX}{}-{:06x}",
                    std::process::id(),
                    fastrand::u32(..0xff_ffff)
                ),
                true,
            ),
        };
        if name.is_empty()
            || name.starts_with('.')
            || name.starts_with("run-")
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(invalid(format!(
                "cgroup name {name:?} must be letters, digits, '.', '_' or '-' (and not start with '.' or \"run-\")"
            )));
        }
        if cfg.want == Want::Off {
            return Ok(Containment::off("node.cgroup = \"off\"", name));
        }
        let mounts = read_mounts();
        let own = read_own_cgroups();
        let mut notes: Vec<String> = Vec::new();

        // cgroup v2: the node's (or the configured) cgroup, with the controllers it can pass on.
        let mut v2 = None;
        if matches!(cfg.want, Want::Auto | Want::V2) {
            match setup_v2(&mounts, &own, cfg.root.as_deref(), &name) {
                Ok(found) => v2 = Some(found),
                Err(e) => notes.push(format!("cgroup v2: {e}")),
            }
        }
        if cfg.want == Want::V2 && v2.is_none() {
            return Err(io::Error::other(format!(
                "node.cgroup = \"v2\" but {}",
                notes.join("; ")
            )));
        }
        // cgroup v1: what v2 does not provide (all of it under Want::V1).
        let mut v1: Vec<V1Hier> = Vec::new();
        if matches!(cfg.want, Want::Auto | Want::V1) {
            let have2: BTreeSet<Ctl> = v2.as_ref().map(|(_, c)| c.clone()).unwrap_or_default();
            let v2_kill = v2.as_ref().is_some_and(|(d, _)| {
                d.join("cgroup.kill").exists() || d.join("cgroup.freeze").exists()
            });
            for ctl in Ctl::V1 {
                let wanted = match ctl {
                    Ctl::Memory | Ctl::Pids | Ctl::Cpu => !have2.contains(&ctl),
                    Ctl::Freezer => !v2_kill,
                    // Only for CPU usage when there is no v2 (whose cpu.stat always has it).
                    Ctl::Cpuacct => v2.is_none(),
                };
                if !wanted || v1.iter().any(|h| h.ctls.contains(&ctl)) {
                    continue;
                }
                match setup_v1(&mounts, &own, cfg.root.as_deref(), &name, ctl) {
                    Ok((dir, comounted)) => {
                        let ctls: BTreeSet<Ctl> = comounted
                            .into_iter()
                            .filter(|c| match c {
                                Ctl::Memory | Ctl::Pids | Ctl::Cpu => !have2.contains(c),
                                Ctl::Freezer => !v2_kill,
                                Ctl::Cpuacct => v2.is_none(),
                            })
                            .collect();
                        v1.push(V1Hier { ctls, dir });
                    }
                    Err(e) => notes.push(format!("v1 {}: {e}", ctl.name())),
                }
            }
        }
        if cfg.want == Want::V1 && v1.is_empty() {
            return Err(io::Error::other(format!(
                "node.cgroup = \"v1\" but {}",
                notes.join("; ")
            )));
        }
        let mode = match (&v2, v1.is_empty()) {
            (Some(_), true) => Mode::Cgroup2,
            (Some(_), false) => Mode::Hybrid,
            (None, false) => Mode::Cgroup1,
            (None, true) => {
                return Ok(Containment::off(
                    &format!("no writable cgroup hierarchy: {}", notes.join("; ")),
                    name,
                ))
            }
        };
        let kill = match &v2 {
            Some((d, _)) if d.join("cgroup.kill").exists() => KillHow::CgroupKill,
            Some((d, _)) if d.join("cgroup.freeze").exists() => KillHow::Freeze2,
            _ => v1
                .iter()
                .position(|h| h.ctls.contains(&Ctl::Freezer))
                .map_or(KillHow::Loop, KillHow::Freezer1),
        };
        let mut locks = Vec::new();
        if !ephemeral {
            let dirs = v2.iter().map(|(d, _)| d).chain(v1.iter().map(|h| &h.dir));
            for d in dirs {
                locks.push(lock_node_dir(d)?);
            }
            // Another node may have removed a directory as stale before it was locked here
            // (`lock_node_dir` made it again): pass the controllers on once more.
            if let Some((d, ctls)) = &v2 {
                for c in ctls {
                    if let Err(e) = enable(d, *c) {
                        log::warn!(target: LOG, "{}: cannot enable {}: {e}", d.display(), c.name());
                    }
                }
            }
        }
        let mut c = Containment {
            mode,
            v2,
            v1,
            kill,
            name,
            ephemeral,
            _locks: locks,
            summary: String::new(),
        };
        c.summary = c.describe(&notes);
        c.sweep();
        Ok(c)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// One line for the log and `etask nodes`: the mode, where, how runs are killed, which
    /// limits can be enforced and why anything is missing.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// The node's subtree name (also the prefix of its runs' environment tokens).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn describe(&self, notes: &[String]) -> String {
        let mut s = format!("{}:", self.mode.as_str());
        if let Some((d, ctls)) = &self.v2 {
            s.push_str(&format!(" v2 {}", d.display()));
            if !ctls.is_empty() {
                let names: Vec<&str> = ctls.iter().map(|c| c.name()).collect();
                s.push_str(&format!(" [{}]", names.join(",")));
            }
        }
        for h in &self.v1 {
            let names: Vec<&str> = h.ctls.iter().map(|c| c.name()).collect();
            s.push_str(&format!(" v1 {} [{}]", h.dir.display(), names.join(",")));
        }
        s.push_str(match self.kill {
            KillHow::CgroupKill => "; kill=cgroup.kill",
            KillHow::Freeze2 => "; kill=cgroup.freeze+SIGKILL",
            KillHow::Freezer1(_) => "; kill=freezer+SIGKILL",
            KillHow::Loop => "; kill=SIGKILL each (no freezer)",
        });
        let limits: Vec<&str> = [Ctl::Memory, Ctl::Pids, Ctl::Cpu]
            .into_iter()
            .filter(|c| self.provides(*c))
            .map(|c| c.name())
            .collect();
        s.push_str(&format!("; limits=[{}]", limits.join(",")));
        if !notes.is_empty() {
            s.push_str(&format!("; not used: {}", notes.join("; ")));
        }
        s
    }

    fn provides(&self, c: Ctl) -> bool {
        self.v2.as_ref().is_some_and(|(_, s)| s.contains(&c))
            || self.v1.iter().any(|h| h.ctls.contains(&c))
    }

    /// The limits of `limits` this node cannot enforce, each with the reason.
    pub fn unenforceable(&self, limits: &Limits) -> Vec<String> {
        let mut out = Vec::new();
        for (asked, ctl, what) in [
            (limits.memory_bytes.is_some(), Ctl::Memory, "memory_bytes"),
            (limits.pids.is_some(), Ctl::Pids, "pids"),
            (limits.cpu_millicores.is_some(), Ctl::Cpu, "cpu_millicores"),
        ] {
            if asked && !self.provides(ctl) {
                out.push(if self.mode == Mode::Off {
                    format!("{what}: this node contains runs without cgroups")
                } else {
                    format!("{what}: no writable {} controller on this node", ctl.name())
                });
            }
        }
        out
    }

    /// Creates the cgroup `name` of one run with its limits, in every hierarchy it needs, and
    /// opens what the child needs to enter it.
    ///
    /// # Errors
    /// A directory could not be created or a limit not written; nothing is left behind.
    pub fn create_run(&self, name: &str, limits: &Limits) -> io::Result<RunCgroup> {
        let mut run = RunCgroup {
            v2: None,
            v1: Vec::new(),
            members: PathBuf::new(),
            kill: RunKill::Loop,
            cpu: None,
            memory: None,
            pids: None,
        };
        let result = self.fill_run(&mut run, name, limits);
        match result {
            Ok(()) => Ok(run),
            Err(e) => {
                let _ = run.remove();
                Err(e)
            }
        }
    }

    fn fill_run(&self, run: &mut RunCgroup, name: &str, limits: &Limits) -> io::Result<()> {
        if self.mode == Mode::Off {
            return Err(io::Error::other("runs are not contained in cgroups"));
        }
        if let Some((node, ctls)) = &self.v2 {
            let d = node.join(name);
            mkdir(&d)?;
            run.v2 = Some(d.clone());
            run.members = d.join("cgroup.procs");
            run.cpu = Some(CpuSource::V2(d.join("cpu.stat")));
            if ctls.contains(&Ctl::Memory) {
                if let Some(m) = limits.memory_bytes {
                    write_file(&d.join("memory.max"), &m.to_string())?;
                    // Swap would let the run go past its limit; absent without swap accounting.
                    let swap = d.join("memory.swap.max");
                    if swap.exists() {
                        write_file(&swap, "0")?;
                    }
                }
                run.memory = Some(MemorySource::V2(d.clone()));
            }
            if ctls.contains(&Ctl::Pids) {
                if let Some(p) = limits.pids {
                    write_file(&d.join("pids.max"), &p.to_string())?;
                }
                run.pids = Some(d.join("pids.events"));
            }
            if ctls.contains(&Ctl::Cpu) {
                if let Some(m) = limits.cpu_millicores {
                    write_file(&d.join("cpu.max"), &cpu_max(m))?;
                }
            }
            run.kill = match self.kill {
                KillHow::CgroupKill => RunKill::CgroupKill(d.join("cgroup.kill")),
                KillHow::Freeze2 => RunKill::Freeze2(d.clone()),
                _ => RunKill::Loop,
            };
        }
        for (i, h) in self.v1.iter().enumerate() {
            // A hierarchy is joined only when the run needs it: each one costs a mkdir, a
            // migration at spawn and an rmdir.
            let needed = (h.ctls.contains(&Ctl::Memory) && limits.memory_bytes.is_some())
                || (h.ctls.contains(&Ctl::Pids) && limits.pids.is_some())
                || (h.ctls.contains(&Ctl::Cpu) && limits.cpu_millicores.is_some())
                || self.kill == KillHow::Freezer1(i)
                || (self.v2.is_none()
                    && (i == self.v1_members() || h.ctls.contains(&Ctl::Cpuacct)));
            if !needed {
                continue;
            }
            let d = h.dir.join(name);
            mkdir(&d)?;
            run.v1.push(d.clone());
            if h.ctls.contains(&Ctl::Memory) {
                if let Some(m) = limits.memory_bytes {
                    write_file(&d.join("memory.limit_in_bytes"), &m.to_string())?;
                    let memsw = d.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write_file(&memsw, &m.to_string())?;
                    }
                }
                run.memory = Some(MemorySource::V1(d.clone()));
            }
            if h.ctls.contains(&Ctl::Pids) {
                if let Some(p) = limits.pids {
                    write_file(&d.join("pids.max"), &p.to_string())?;
                }
                run.pids = Some(d.join("pids.events"));
            }
            if h.ctls.contains(&Ctl::Cpu) {
                if let Some(m) = limits.cpu_millicores {
                    write_file(&d.join("cpu.cfs_period_us"), "100000")?;
                    write_file(
                        &d.join("cpu.cfs_quota_us"),
                        &(m * 100).max(1000).to_string(),
                    )?;
                }
            }
            if h.ctls.contains(&Ctl::Cpuacct) && run.cpu.is_none() {
                run.cpu = Some(CpuSource::Cpuacct(d.clone()));
            }
            if self.kill == KillHow::Freezer1(i) {
                run.kill = RunKill::Freezer1(d.clone());
            }
            if self.v2.is_none() && i == self.v1_members() {
                run.members = d.join("cgroup.procs");
            }
        }
        Ok(())
    }

    /// The v1 hierarchy whose `cgroup.procs` lists a run's processes when there is no v2.
    fn v1_members(&self) -> usize {
        for want in [Ctl::Freezer, Ctl::Pids, Ctl::Memory] {
            if let Some(i) = self.v1.iter().position(|h| h.ctls.contains(&want)) {
                return i;
            }
        }
        0
    }

    /// Kills and removes every run cgroup a previous incarnation of this node left (a named
    /// node), and ephemeral subtrees whose process is gone. Runs before the node takes work.
    fn sweep(&self) {
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Some((d, _)) = &self.v2 {
            dirs.push(d.clone());
        }
        dirs.extend(self.v1.iter().map(|h| h.dir.clone()));
        let mut left = 0;
        if !self.ephemeral {
            for d in &dirs {
                for child in subdirs(d) {
                    left += 1;
                    let _ = remove_tree(&child, Duration::from_secs(10));
                }
            }
        }
        // Subtrees of other nodes that are gone: `etask run` and test pools (their pid is in
        // the name), and nodes of a default name (`etask-<8 hex>`) that no live process holds
        // locked — crashed, and perhaps never started again (a data dir that was removed).
        let mut stale = 0;
        let bases: Vec<&Path> = dirs.iter().filter_map(|d| d.parent()).collect();
        let mut named = BTreeSet::new();
        for base in &bases {
            for sib in subdirs(base) {
                let Some(name) = sib.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if name == self.name {
                    continue;
                }
                if let Some(rest) = name.strip_prefix(EPHEMERAL_PREFIX) {
                    let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
                    if pid.is_some_and(|p| !super::tree::alive(p)) {
                        stale += 1;
                        let _ = remove_tree(&sib, Duration::from_secs(10));
                    }
                } else if is_default_name(name) {
                    named.insert(name.to_owned());
                }
            }
        }
        // A named subtree is stale only if none of its directories is locked (a live node
        // holds them all); the locks are kept while removing, so its node cannot start on it
        // meanwhile (it would make its directories again).
        'names: for name in named {
            let paths: Vec<PathBuf> = bases
                .iter()
                .map(|b| b.join(&name))
                .filter(|p| p.is_dir())
                .collect();
            let mut held = Vec::new();
            for p in &paths {
                match try_lock(p) {
                    Ok(Some(f)) => held.push(f),
                    _ => continue 'names,
                }
            }
            stale += 1;
            for p in &paths {
                let _ = remove_tree(p, Duration::from_secs(10));
            }
        }
        if stale > 0 {
            log::info!(target: LOG, "removed {stale} cgroup subtrees of nodes that are gone");
        }
        if left > 0 {
            log::warn!(target: LOG, "removed {left} run cgroups left by a previous incarnation of node cgroup {} (their processes were killed)", self.name);
        }
    }
}

impl Drop for Containment {
    /// A pool that stops cleanly leaves no cgroup behind (its runs are over); after a crash
    /// the next start of the node (or any node's sweep) removes what is left.
    fn drop(&mut self) {
        if self.mode != Mode::Off {
            if let Some((d, _)) = &self.v2 {
                let _ = remove_tree(d, Duration::from_secs(5));
            }
            for h in &self.v1 {
                let _ = remove_tree(&h.dir, Duration::from_secs(5));
            }
        }
    }
}

const EPHEMERAL_PREFIX: &str = "etask-tmp-";

/// `etask-` and 8 hex digits: the name a node derives from its data dir (config.rs).
fn is_default_name(name: &str) -> bool {
    name.strip_prefix("etask-")
        .is_some_and(|h| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// `cpu.max` for a quota in thousandths of a CPU, over the default 100 ms period.
fn cpu_max(millicores: u64) -> String {
    format!("{} 100000", (millicores * 100).max(1000))
}

/// How the kill of one run works (resolved from the node's `KillHow` at creation).
#[derive(Debug)]
enum RunKill {
    CgroupKill(PathBuf),
    Freeze2(PathBuf),
    Freezer1(PathBuf),
    Loop,
}

#[derive(Debug)]
enum CpuSource {
    /// v2 `cpu.stat` (always there, controller or not): user_usec / system_usec.
    V2(PathBuf),
    /// v1 cpuacct directory: cpuacct.usage_user / cpuacct.usage_sys (ns), or cpuacct.stat.
    Cpuacct(PathBuf),
}

#[derive(Debug)]
enum MemorySource {
    V2(PathBuf),
    V1(PathBuf),
}

/// One run's cgroup: a directory in v2 and/or in each v1 hierarchy it needed.
#[derive(Debug)]
pub struct RunCgroup {
    v2: Option<PathBuf>,
    v1: Vec<PathBuf>,
    /// The `cgroup.procs` that lists every process of the run.
    members: PathBuf,
    kill: RunKill,
    cpu: Option<CpuSource>,
    memory: Option<MemorySource>,
    pids: Option<PathBuf>,
}

/// What a run's cgroup says about it at its end.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunStats {
    pub oom_killed: bool,
    pub pids_exhausted: bool,
    pub cpu_user_ms: Option<u64>,
    pub cpu_system_ms: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
}

impl RunCgroup {
    /// Opens what the child needs to enter this cgroup before it runs anything.
    ///
    /// # Errors
    /// A directory or `cgroup.procs` file cannot be opened.
    pub fn placement(&self) -> io::Result<Placement> {
        let open_w = |p: &Path| -> io::Result<OwnedFd> {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)
                .map(OwnedFd::from)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        let mut pl = Placement::default();
        if let Some(d) = &self.v2 {
            let dir = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open(d)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
            pl.v2_dir = Some(OwnedFd::from(dir));
            // With clone3 the kernel places the child (CLONE_INTO_CGROUP); spawn opens the
            // file itself should clone3 turn out to be refused.
            if !super::spawn::clone3_in_use() {
                pl.v2_procs = Some(open_w(&d.join("cgroup.procs"))?);
            }
        }
        for d in &self.v1 {
            pl.v1_procs.push(open_w(&d.join("cgroup.procs"))?);
        }
        Ok(pl)
    }

    /// Every process of the run now.
    pub fn procs(&self) -> Vec<i32> {
        read_pids(&self.members)
    }

    pub fn is_empty(&self) -> bool {
        self.procs().is_empty()
    }

    /// Sends `sig` to every process of the run; returns how many there were.
    pub fn signal(&self, sig: i32) -> usize {
        let pids = self.procs();
        for &p in &pids {
            // SAFETY: kill(2); a pid that just exited gives ESRCH, which is fine.
            unsafe { libc::kill(p, sig) };
        }
        pids.len()
    }

    /// Kills every process of the run so that none can fork away meanwhile: `cgroup.kill`, or
    /// freeze, SIGKILL each, thaw. Returns how many processes were there before.
    pub fn kill(&self) -> usize {
        let n = self.procs().len();
        if n == 0 {
            return 0;
        }
        match &self.kill {
            RunKill::CgroupKill(f) => {
                if let Err(e) = write_file(f, "1") {
                    log::warn!(target: LOG, "{}: {e}; killing each process", f.display());
                    self.signal(libc::SIGKILL);
                }
            }
            RunKill::Freeze2(d) => freeze_kill_thaw(
                &d.join("cgroup.freeze"),
                ("1", "0"),
                &|| read_kv(&d.join("cgroup.events"), "frozen") == Some(1),
                &self.members,
            ),
            RunKill::Freezer1(d) => freeze_kill_thaw(
                &d.join("freezer.state"),
                ("FROZEN", "THAWED"),
                &|| {
                    std::fs::read_to_string(d.join("freezer.state"))
                        .is_ok_and(|s| s.trim() == "FROZEN")
                },
                &self.members,
            ),
            RunKill::Loop => {
                self.signal(libc::SIGKILL);
            }
        }
        n
    }

    /// What the run used and whether a limit ended it.
    pub fn stats(&self) -> RunStats {
        let mut st = RunStats::default();
        match &self.cpu {
            Some(CpuSource::V2(f)) => {
                st.cpu_user_ms = read_kv(f, "user_usec").map(|u| u / 1000);
                st.cpu_system_ms = read_kv(f, "system_usec").map(|u| u / 1000);
            }
            Some(CpuSource::Cpuacct(d)) => {
                let ns = |f: &str| read_u64(&d.join(f)).map(|n| n / 1_000_000);
                st.cpu_user_ms = ns("cpuacct.usage_user");
                st.cpu_system_ms = ns("cpuacct.usage_sys");
                if st.cpu_user_ms.is_none() {
                    // Older kernels: USER_HZ ticks (100 per second on Linux).
                    let f = d.join("cpuacct.stat");
                    st.cpu_user_ms = read_kv(&f, "user").map(|t| t * 10);
                    st.cpu_system_ms = read_kv(&f, "system").map(|t| t * 10);
                }
            }
            None => {}
        }
        match &self.memory {
            Some(MemorySource::V2(d)) => {
                st.oom_killed = read_kv(&d.join("memory.events"), "oom_kill").unwrap_or(0) > 0;
                st.memory_peak_bytes = read_u64(&d.join("memory.peak"));
            }
            Some(MemorySource::V1(d)) => {
                st.oom_killed = read_kv(&d.join("memory.oom_control"), "oom_kill").unwrap_or(0) > 0;
                st.memory_peak_bytes = read_u64(&d.join("memory.max_usage_in_bytes"));
            }
            None => {}
        }
        if let Some(f) = &self.pids {
            st.pids_exhausted = read_kv(f, "max").unwrap_or(0) > 0;
        }
        st
    }

    /// Removes the run's directories (kills what is still inside first).
    ///
    /// # Errors
    /// A directory could not be removed within a second (a process stuck in the kernel); it
    /// is left for the node's next start.
    pub fn remove(&self) -> io::Result<()> {
        let mut first_err = None;
        let dirs = self.v2.iter().chain(self.v1.iter());
        for d in dirs {
            if let Err(e) = remove_tree(d, Duration::from_secs(1)) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Freezes the cgroup (so nothing forks meanwhile), SIGKILLs every listed process, thaws it
/// (frozen processes die when thawed).
fn freeze_kill_thaw(
    ctl: &Path,
    (freeze, thaw): (&str, &str),
    frozen: &dyn Fn() -> bool,
    members: &Path,
) {
    if let Err(e) = write_file(ctl, freeze) {
        log::warn!(target: LOG, "{}: {e}", ctl.display());
    }
    let end = Instant::now() + Duration::from_millis(100);
    while !frozen() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
    for p in read_pids(members) {
        // SAFETY: kill(2) on a listed pid.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    if let Err(e) = write_file(ctl, thaw) {
        log::warn!(target: LOG, "{}: {e}", ctl.display());
    }
}

/// Kills everything in `dir` and its sub-cgroups and removes them, deepest first, retrying
/// for up to `within` while the kernel finishes the kills.
fn remove_tree(dir: &Path, within: Duration) -> io::Result<()> {
    let end = Instant::now() + within;
    loop {
        // The common case first: an empty leaf goes with one rmdir (listing a cgroup
        // directory costs as much again, on every run).
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                if Instant::now() >= end {
                    log::warn!(target: LOG, "cannot remove cgroup {}: {e}", dir.display());
                    return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display())));
                }
            }
        }
        // Sub-cgroups a script made (a root script may), deepest first.
        for child in subdirs(dir) {
            let _ = remove_tree(&child, within);
        }
        let kill = dir.join("cgroup.kill");
        if kill.exists() {
            let _ = write_file(&kill, "1");
        } else if dir.join("freezer.state").exists() {
            freeze_kill_thaw(
                &dir.join("freezer.state"),
                ("FROZEN", "THAWED"),
                &|| {
                    std::fs::read_to_string(dir.join("freezer.state"))
                        .is_ok_and(|s| s.trim() == "FROZEN")
                },
                &dir.join("cgroup.procs"),
            );
        } else {
            for p in read_pids(&dir.join("cgroup.procs")) {
                // SAFETY: kill(2) on a listed pid.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

fn mkdir(d: &Path) -> io::Result<()> {
    std::fs::create_dir(d)
        .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", d.display())))
}

fn write_file(p: &Path, value: &str) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
    f.write_all(value.as_bytes()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", p.display()),
        )
    })
}

fn read_pids(p: &Path) -> Vec<i32> {
    std::fs::read_to_string(p)
        .map(|s| {
            s.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file ("key value" lines: cpu.stat, memory.events, ...).
fn read_kv(p: &Path, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    s.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

/// Takes an exclusive flock on `dir` without waiting: Ok(None) when another process holds it.
fn try_lock(dir: &Path) -> io::Result<Option<File>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(f))
}

/// Locks the node's directory `dir` for the life of the process, making it again should
/// another node have removed it as stale between its creation and this lock. A lock held
/// elsewhere for over a second is another live node on the same subtree.
fn lock_node_dir(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    let end = Instant::now() + Duration::from_secs(1);
    loop {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("mkdir {}: {e}", dir.display()),
                ))
            }
        }
        match try_lock(dir) {
            Ok(Some(f)) => {
                // Still the directory at that path (not one removed before the lock)?
                let (held, now) = (f.metadata()?, std::fs::metadata(dir));
                if now.is_ok_and(|m| m.ino() == held.ino() && m.dev() == held.dev()) {
                    return Ok(f);
                }
            }
            Ok(None) if Instant::now() >= end => {
                return Err(io::Error::other(format!(
                    "cgroup {} is in use by another running node (one node per data dir; set \
                     node.cgroup_name to run several)",
                    dir.display()
                )))
            }
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A cgroup mount: its fs type ("cgroup2" or "cgroup"), root within the hierarchy, mount
/// point and, for v1, the controllers it carries.
#[derive(Debug, Clone)]
struct Mount {
    v2: bool,
    root: String,
    point: PathBuf,
    ctls: Vec<String>,
}

fn read_mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| parse_mountinfo(&s))
        .unwrap_or_default()
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (pre.get(3), pre.get(4), post.first()) else {
            continue;
        };
        let v2 = *fstype == "cgroup2";
        if !v2 && *fstype != "cgroup" {
            continue;
        }
        let ctls = post
            .get(2)
            .map(|o| o.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        out.push(Mount {
            v2,
            root: unescape(root),
            point: PathBuf::from(unescape(point)),
            ctls,
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The node's own cgroups: (controllers, path) per hierarchy; "" = the v2 hierarchy.
fn read_own_cgroups() -> Vec<(Vec<String>, String)> {
    std::fs::read_to_string("/proc/self/cgroup")
        .map(|s| parse_proc_cgroup(&s))
        .unwrap_or_default()
}

fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctls, path) = (it.next()?, it.next()?, it.next()?);
            let ctls = if ctls.is_empty() {
                Vec::new()
            } else {
                ctls.split(',').map(str::to_owned).collect()
            };
            Some((ctls, path.to_owned()))
        })
        .collect()
}

/// The directory of cgroup `path` under `mount`, when the mount shows it.
fn dir_of(mount: &Mount, path: &str) -> Option<PathBuf> {
    let root = mount.root.trim_end_matches('/');
    let rel = if root.is_empty() {
        path
    } else {
        path.strip_prefix(root)?
    };
    if !rel.is_empty() && !rel.starts_with('/') {
        return None;
    }
    Some(mount.point.join(rel.trim_start_matches('/')))
}

/// Creates the node's v2 directory with the controllers its runs can get.
fn setup_v2(
    mounts: &[Mount],
    own: &[(Vec<String>, String)],
    root: Option<&str>,
    name: &str,
) -> Result<(PathBuf, BTreeSet<Ctl>), String> {
    let mount = mounts
        .iter()
        .find(|m| m.v2)
        .ok_or("no cgroup2 file system is mounted")?;
    let own_path = own
        .iter()
        .find(|(c, _)| c.is_empty())
        .map(|(_, p)| p.as_str());
    let base_path = root
        .or(own_path)
        .ok_or("the node's cgroup v2 path is unknown (/proc/self/cgroup)")?;
    let base = dir_of(mount, base_path).ok_or_else(|| {
        format!(
            "cgroup {base_path} is outside the cgroup2 mount at {}",
            mount.point.display()
        )
    })?;
    let node = base.join(name);
    match std::fs::create_dir(&node) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(format!(
                "cannot create {} ({e}); delegate a subtree to the node (systemd Delegate=yes) or set node.cgroup_root",
                node.display()
            ))
        }
    }
    // Controllers pass down one level at a time: base → node dir → runs.
    let available: BTreeSet<Ctl> = read_words(&base.join("cgroup.controllers"))
        .iter()
        .filter_map(|w| match w.as_str() {
            "memory" => Some(Ctl::Memory),
            "pids" => Some(Ctl::Pids),
            "cpu" => Some(Ctl::Cpu),
            _ => None,
        })
        .collect();
    let mut ctls = BTreeSet::new();
    for c in available {
        let mut ok = enable(&base, c);
        if ok
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
            && own_path == Some(base_path)
            && base_path != "/"
        {
            // "No internal processes": the node itself sits in `base`, which must hold only
            // cgroups to pass controllers on. Move the node into a leaf of its own (the way
            // systemd documents for Delegate=yes services) and try again.
            if let Err(e) = move_self(&base.join(format!("{name}.node"))) {
                log::warn!(target: LOG, "cannot move the node into a leaf cgroup: {e}");
            }
            ok = enable(&base, c);
        }
        if ok.is_ok() && enable(&node, c).is_ok() {
            ctls.insert(c);
        }
    }
    Ok((node, ctls))
}

fn enable(dir: &Path, c: Ctl) -> io::Result<()> {
    if read_words(&dir.join("cgroup.subtree_control")).contains(&c.name().to_owned()) {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.subtree_control"))?;
    f.write_all(format!("+{}", c.name()).as_bytes())
}

fn move_self(leaf: &Path) -> io::Result<()> {
    match std::fs::create_dir(leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    write_file(&leaf.join("cgroup.procs"), &std::process::id().to_string())
}

fn read_words(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Creates the node's directory in the v1 hierarchy of `ctl`; returns it with the controllers
/// mounted together there (e.g. cpu,cpuacct).
fn setup_v1(
    mounts: &[Mount],
    own: &[(Vec<String>, String)],
    root: Option<&str>,
    name: &str,
    ctl: Ctl,
) -> Result<(PathBuf, BTreeSet<Ctl>), String> {
    let mount = mounts
        .iter()
        .find(|m| !m.v2 && m.ctls.iter().any(|c| c == ctl.name()))
        .ok_or("not mounted")?;
    let own_path = own
        .iter()
        .find(|(c, _)| c.iter().any(|c| c == ctl.name()))
        .map(|(_, p)| p.as_str());
    let base_path = root
        .or(own_path)
        .ok_or("the node's cgroup in this hierarchy is unknown")?;
    let base = dir_of(mount, base_path).ok_or_else(|| {
        format!(
            "cgroup {base_path} is outside the mount at {}",
            mount.point.display()
        )
    })?;
    let node = base.join(name);
    match std::fs::create_dir(&node) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {} ({e})", node.display())),
    }
    let comounted = Ctl::V1
        .into_iter()
        .filter(|c| mount.ctls.iter().any(|m| m == c.name()))
        .collect();
    Ok((node, comounted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_and_proc_cgroup_of_a_hybrid_host_are_read() {
        let mi = "25 20 0:22 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                  26 20 0:23 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  30 20 0:27 /docker/x /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n\
                  31 20 0:28 / /mnt/with\\040space rw - cgroup cgroup rw,pids\n\
                  40 20 0:30 / /tmp rw - tmpfs tmpfs rw\n";
        let m = parse_mountinfo(mi);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].ctls, vec!["rw", "cpu", "cpuacct"]);
        assert!(m[2].v2);
        assert_eq!(m[3].point, PathBuf::from("/mnt/with space"));
        assert_eq!(
            dir_of(&m[2], "/docker/x/sub"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/sub"))
        );
        assert_eq!(dir_of(&m[2], "/other"), None);
        assert_eq!(dir_of(&m[2], "/docker/xy"), None);
        assert_eq!(
            dir_of(&m[0], "/"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/"))
        );
        let own = parse_proc_cgroup("4:memory:/a/b\n2:cpu,cpuacct:/\n0::/system.slice/x.service\n");
        assert_eq!(own[0], (vec!["memory".to_owned()], "/a/b".to_owned()));
        assert_eq!(own[2], (Vec::new(), "/system.slice/x.service".to_owned()));
    }

    #[test]
    fn flat_keyed_files_are_read_by_key() {
        let dir = std::env::temp_dir().join(format!("etask-kv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("memory.events");
        std::fs::write(&f, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        assert_eq!(read_kv(&f, "oom_kill"), Some(1));
        assert_eq!(read_kv(&f, "max"), Some(3));
        assert_eq!(read_kv(&f, "nope"), None);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(cpu_max(500), "50000 100000");
        assert_eq!(cpu_max(1), "1000 100000");
    }
}
