//! Process-tree control for the pool: makes this process a child subreaper, turns SIGCHLD into
//! a readable pipe for the reactor, reaps children (with what they used), and — for the
//! fallback without cgroups — finds every process that belongs to a run (its descendants, plus
//! orphans re-parented to us that carry the run's token in their environment) and kills them.
//! Linux only; reads /proc. Owns no run state.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, LazyLock, Mutex};

use polling::Poller;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::OnceLock;

/// Name of the env variable that tags every process of a run, so orphans that were re-parented
/// to the node (after `setsid` or a double fork) can still be attributed to their run.
pub const TOKEN_VAR: &str = "ETASK_RUN_TOKEN";

/// Makes the current process adopt orphaned descendants instead of init, so they can be found
/// and reaped.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises the soft open-file limit to the hard one: each run holds three pipes.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

static SIGCHLD_PIPE: OnceLock<(RawFd, RawFd)> = OnceLock::new();

extern "C" fn on_sigchld(_: libc::c_int) {
    if let Some(&(_, w)) = SIGCHLD_PIPE.get() {
        // SAFETY: write(2) is async-signal-safe; errno is saved and restored around it.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(w, b"c".as_ptr().cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

/// Installs the SIGCHLD handler (once per process) and returns the read end of its pipe. The
/// pipe is non-blocking on both ends; a full pipe just means a wake-up is already pending.
pub fn sigchld_pipe() -> io::Result<RawFd> {
    if let Some(&(r, _)) = SIGCHLD_PIPE.get() {
        return Ok(r);
    }
    let (r, w) = pipe_cloexec()?;
    set_nonblocking(r.as_raw_fd())?;
    set_nonblocking(w.as_raw_fd())?;
    // Leaked on purpose: the handler may run at any time for the life of the process.
    let pair = (r.as_raw_fd(), w.as_raw_fd());
    if SIGCHLD_PIPE.set(pair).is_ok() {
        std::mem::forget(r);
        std::mem::forget(w);
        // SAFETY: installing a handler that only calls write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigchld as *const () as usize;
            sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(SIGCHLD_PIPE.get().map(|p| p.0).unwrap_or(pair.0))
}

/// Empties the SIGCHLD pipe.
pub fn drain_fd(fd: RawFd) {
    let mut buf = [0u8; 256];
    // SAFETY: reading into a stack buffer from a non-blocking fd.
    while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// How a reaped process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    Exited(i32),
    Signaled(i32),
}

/// What a reaped process and the children it waited for used (wait4's rusage).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcUsage {
    pub user_ms: u64,
    pub system_ms: u64,
}

/// One reaped root of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: i32,
    pub status: WaitStatus,
    pub usage: ProcUsage,
}

/// Every child of the process is reaped here, whichever pool wakes first: run roots are filed
/// for the pool that owns them (and that pool's poller is woken), adopted orphans are dropped.
///
/// A spawn does not hold the lock: with CLONE_VFORK the spawning thread waits until the child
/// has exec'd, and holding the lock that long would serialize every launcher and the reaping.
/// So a root can be reaped before its spawner registers it: while spawns are in flight, an
/// exit of an unknown pid is kept (`unclaimed`) for the spawner to claim. Pids are handed out
/// cyclically, so a kept exit cannot be mistaken for a later child of the same pid: entries go
/// when no spawn is in flight, or after a second.
struct Reaper {
    roots: HashMap<i32, usize>,
    exits: HashMap<usize, Vec<Exit>>,
    pollers: HashMap<usize, Arc<Poller>>,
    next_pool: usize,
    spawning: usize,
    unclaimed: HashMap<i32, (Exit, std::time::Instant)>,
}

static REAPER: LazyLock<Mutex<Reaper>> = LazyLock::new(|| {
    Mutex::new(Reaper {
        roots: HashMap::new(),
        exits: HashMap::new(),
        pollers: HashMap::new(),
        next_pool: 0,
        spawning: 0,
        unclaimed: HashMap::new(),
    })
});

fn reaper() -> std::sync::MutexGuard<'static, Reaper> {
    // A panic while holding the lock leaves plain maps behind; they are still consistent.
    REAPER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers a pool with the process-wide reaper; returns its id.
pub fn register_pool(poller: Arc<Poller>) -> usize {
    let mut r = reaper();
    r.next_pool += 1;
    let id = r.next_pool;
    r.pollers.insert(id, poller);
    id
}

pub fn unregister_pool(id: usize) {
    let mut r = reaper();
    r.pollers.remove(&id);
    r.exits.remove(&id);
    r.roots.retain(|_, owner| *owner != id);
}

/// Runs `spawn` and records the new root for `pool` (or files its exit, when the reaper was
/// quicker).
pub fn spawn_root<T>(
    pool: usize,
    spawn: impl FnOnce() -> io::Result<(i32, T)>,
) -> io::Result<(i32, T)> {
    reaper().spawning += 1;
    let res = spawn();
    let mut r = reaper();
    r.spawning -= 1;
    let claimed = match &res {
        Ok((pid, _)) => match r.unclaimed.remove(pid) {
            Some((exit, _)) => {
                r.exits.entry(pool).or_default().push(exit);
                true
            }
            None => {
                r.roots.insert(*pid, pool);
                false
            }
        },
        Err(_) => false,
    };
    if r.spawning == 0 {
        r.unclaimed.clear();
    }
    if claimed {
        if let Some(p) = r.pollers.get(&pool) {
            let _ = p.notify();
        }
    }
    res
}

/// Reaps what has ended and returns the exits of `pool`'s roots.
pub fn collect_exits(pool: usize) -> Vec<Exit> {
    let mut r = reaper();
    let mut wake = Vec::new();
    reap_all(|exit| match r.roots.remove(&exit.pid) {
        Some(owner) => {
            r.exits.entry(owner).or_default().push(exit);
            if owner != pool {
                wake.push(owner);
            }
        }
        // Perhaps a root whose spawner has not registered it yet (see `Reaper`).
        None if r.spawning > 0 => {
            r.unclaimed
                .insert(exit.pid, (exit, std::time::Instant::now()));
        }
        None => {
            log::debug!(target: "etask::runner", "reaped adopted orphan pid={} {:?}", exit.pid, exit.status)
        }
    });
    if !r.unclaimed.is_empty() {
        if let Some(old) = std::time::Instant::now().checked_sub(std::time::Duration::from_secs(1))
        {
            r.unclaimed.retain(|_, (_, at)| *at > old);
        }
    }
    for owner in wake {
        if let Some(p) = r.pollers.get(&owner) {
            let _ = p.notify();
        }
    }
    r.exits.remove(&pool).unwrap_or_default()
}

/// Reaps every child that has ended, without blocking.
fn reap_all(mut each: impl FnMut(Exit)) {
    loop {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid value of the plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 with valid out pointers.
        let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut ru) };
        if pid <= 0 {
            return;
        }
        let ms = |t: libc::timeval| t.tv_sec.max(0) as u64 * 1000 + t.tv_usec.max(0) as u64 / 1000;
        let usage = ProcUsage {
            user_ms: ms(ru.ru_utime),
            system_ms: ms(ru.ru_stime),
        };
        let ws = if libc::WIFEXITED(status) {
            WaitStatus::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            WaitStatus::Signaled(libc::WTERMSIG(status))
        } else {
            continue;
        };
        each(Exit {
            pid,
            status: ws,
            usage,
        });
    }
}

/// Direct children of `pid` (all its threads), from /proc.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        read_children(&t.path().join("children"), &mut out);
    }
    out
}

fn read_children(file: &Path, out: &mut Vec<i32>) -> bool {
    match std::fs::read_to_string(file) {
        Ok(s) => {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            true
        }
        Err(_) => false,
    }
}

/// Orphans adopted by this process. The kernel hands them to the first live thread of a
/// subreaper, which is the main thread, so one small file is enough in the common case.
fn adopted() -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    if read_children(
        Path::new(&format!("/proc/{me}/task/{me}/children")),
        &mut out,
    ) {
        out
    } else {
        children_of(me)
    }
}

/// True while an orphan adopted by this process has exited and is not reaped yet. A run that
/// had processes killed waits for this, so that by its `Finished` they are gone for good (a
/// pool stopped right after would otherwise leave them as zombies).
pub fn adopted_zombie() -> bool {
    adopted().into_iter().any(|p| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    })
}

/// The run token in a process's environment, if it has one.
pub fn token_of(pid: i32) -> Option<String> {
    let mut env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    // Empty is a real empty environment, or a process caught in execve: its old memory already
    // gone, or its new memory without the environment laid out yet (then `mid_exec`). Look
    // again rather than miss a process of the run: twice in any case, longer while mid-exec.
    let mut tries = 0;
    while env.is_empty() && tries < 20 && (tries < 2 || mid_exec(pid)) {
        std::thread::sleep(std::time::Duration::from_micros(500));
        env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        tries += 1;
    }
    let prefix = format!("{TOKEN_VAR}=");
    env.split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// True while `pid` runs execve between installing its new memory and laying out its
/// environment there (`env_end`, field 51 of /proc/<pid>/stat, is still 0).
fn mid_exec(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return false;
    };
    // rest starts at field 3 (state); env_end is field 51.
    let mut f = rest.split_whitespace();
    let state = f.next();
    state != Some("Z") && f.nth(47).and_then(|v| v.parse::<u64>().ok()) == Some(0)
}

/// Every live process of a run: the root's descendants and the orphans (children of this
/// process that are not run roots) carrying `token`, with their descendants.
pub fn run_members(root: Option<i32>, token: &str, is_root: &dyn Fn(i32) -> bool) -> Vec<i32> {
    let mut queue: VecDeque<i32> = VecDeque::new();
    if let Some(r) = root {
        queue.push_back(r);
    }
    for c in adopted() {
        if !is_root(c) && token_of(c).as_deref() == Some(token) {
            queue.push_back(c);
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while let Some(p) = queue.pop_front() {
        if !seen.insert(p) {
            continue;
        }
        out.push(p);
        queue.extend(children_of(p));
    }
    out
}

/// Signals a run's process group and every member found. Returns how many were signalled.
pub fn signal_run(
    root: Option<i32>,
    token: &str,
    is_root: &dyn Fn(i32) -> bool,
    sig: i32,
) -> usize {
    if let Some(r) = root {
        // The root called setsid, so its pgid is its pid; this catches a fork storm in one go.
        // SAFETY: kill(2) on a process group we created.
        unsafe { libc::kill(-r, sig) };
    }
    let members = run_members(root, token, is_root);
    for &p in &members {
        // SAFETY: kill(2); a pid that just exited gives ESRCH, which is fine.
        unsafe { libc::kill(p, sig) };
    }
    members.len()
}

/// SIGKILLs every process whose run token starts with `prefix` (the runs of a previous
/// incarnation of this node, in the fallback mode), until none is left or `within` passed.
/// Returns how many were killed. Scans all of /proc, so it runs once, at node start.
pub fn kill_by_token_prefix(prefix: &str, within: std::time::Duration) -> usize {
    let end = std::time::Instant::now() + within;
    let mut killed = HashSet::new();
    loop {
        let mut found = 0;
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return killed.len();
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if token_of(pid).is_some_and(|t| t.starts_with(prefix)) {
                found += 1;
                killed.insert(pid);
                // SAFETY: kill(2); ESRCH for a pid that just went is fine.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if found == 0 || std::time::Instant::now() >= end {
            return killed.len();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// True while a process with this pid exists (zombies count until reaped).
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}
