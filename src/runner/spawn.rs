//! Starting one child without copying the node: `clone3(CLONE_VM | CLONE_VFORK |
//! CLONE_INTO_CGROUP)` on x86_64 (`clone(CLONE_VM | CLONE_VFORK)` where clone3 is missing or
//! refused), so the cost of a spawn does not grow with the node's memory. The child shares the
//! node's memory until it calls `execve`, so it runs only raw system calls on data the parent
//! prepared beforehand (paths, argv, envp, fds); see `child_main`. It gets a new session, the
//! result pipe at fd 3, every other fd closed on exec, rlimits, its run's cgroups, an optional
//! drop to an unprivileged uid/gid, default signal dispositions and an empty mask.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// Resource limits applied to each run (None = inherit the node's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    pub cpu_seconds: Option<u64>,
    pub address_space_bytes: Option<u64>,
    pub open_files: Option<u64>,
    /// Per-user process count (RLIMIT_NPROC). The kernel ignores it for root, so it only
    /// contains fork bombs together with `run_as` (the cgroup `pids` limit binds root too).
    pub processes: Option<u64>,
}

/// The uid/gid a run drops to when the node runs as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// Where the child is placed before it runs anything: the run's cgroup v2 directory (for
/// `CLONE_INTO_CGROUP`) and the `cgroup.procs` files the child writes itself into (the v1
/// hierarchies, and the v2 one when `CLONE_INTO_CGROUP` is not available).
#[derive(Debug, Default)]
pub struct Placement {
    pub v2_dir: Option<OwnedFd>,
    pub v2_procs: Option<OwnedFd>,
    pub v1_procs: Vec<OwnedFd>,
}

pub struct SpawnSpec<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
    pub stdin: bool,
    pub limits: &'a Rlimits,
    pub run_as: Option<RunAs>,
    pub cgroup: Option<&'a Placement>,
}

pub struct Spawned {
    pub pid: i32,
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub result: OwnedFd,
}

/// Whether spawns use clone3, which places the child into its v2 cgroup itself
/// (`CLONE_INTO_CGROUP`); otherwise the child needs the v2 `cgroup.procs` in its `Placement`.
pub fn clone3_in_use() -> bool {
    cfg!(target_arch = "x86_64") && !CLONE3_UNAVAILABLE.load(Ordering::Relaxed)
}

/// Spawns with clone(CLONE_VM | CLONE_VFORK) from now on, as on a kernel without clone3 (the
/// tests run both paths with it).
pub fn disable_clone3() {
    CLONE3_UNAVAILABLE.store(true, Ordering::Relaxed);
}

/// Which clone flavour creates the children (for the node's start-up log line).
pub fn spawn_path() -> &'static str {
    if clone3_in_use() {
        "clone3(CLONE_VM|CLONE_VFORK|CLONE_INTO_CGROUP)"
    } else {
        "clone(CLONE_VM|CLONE_VFORK)"
    }
}

/// Set once clone3 failed with an error that says it (or `CLONE_INTO_CGROUP`) is not there:
/// an old kernel (< 5.7) or a seccomp filter that answers ENOSYS, as container runtimes do.
static CLONE3_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

const RESULT_FD: RawFd = 3;
const SYS_CLOSE_RANGE: libc::c_long = 436;
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// The child's stack: it runs a handful of system calls and one small getdents buffer.
const STACK_SIZE: usize = 64 << 10;

/// Which step of the child failed (reported back through the shared memory).
#[derive(Clone, Copy)]
#[repr(u32)]
enum Step {
    None = 0,
    Setsid,
    Deathsig,
    ParentGone,
    Cgroup,
    Dup,
    CloseFds,
    Rlimit,
    Chdir,
    Groups,
    Gid,
    Uid,
    Exec,
}

impl Step {
    fn from_u32(v: u32) -> Step {
        match v {
            1 => Step::Setsid,
            2 => Step::Deathsig,
            3 => Step::ParentGone,
            4 => Step::Cgroup,
            5 => Step::Dup,
            6 => Step::CloseFds,
            7 => Step::Rlimit,
            8 => Step::Chdir,
            9 => Step::Groups,
            10 => Step::Gid,
            11 => Step::Uid,
            12 => Step::Exec,
            _ => Step::None,
        }
    }
    fn what(self) -> &'static str {
        match self {
            Step::None => "the child",
            Step::Setsid => "setsid",
            Step::Deathsig => "PR_SET_PDEATHSIG",
            Step::ParentGone => "the node exited while the child started",
            Step::Cgroup => "entering the run's cgroup",
            Step::Dup => "setting up stdio",
            Step::CloseFds => "closing inherited fds",
            Step::Rlimit => "setrlimit",
            Step::Chdir => "chdir to the working directory",
            Step::Groups => "setgroups",
            Step::Gid => "setgid",
            Step::Uid => "setuid",
            Step::Exec => "execve",
        }
    }
}

#[cfg(target_env = "gnu")]
type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type RlimitResource = libc::c_int;

/// Everything the child reads, prepared by the parent: the child allocates nothing, takes no
/// lock and touches no memory other threads of the node may change. `step`/`errno` are the
/// only fields it writes, and the parent reads them only after the child has exec'd or exited
/// (CLONE_VFORK).
#[repr(C)]
struct ChildArgs {
    /// Candidate paths for `execve`, tried in order like `execvp` (PATH search done here).
    paths: *const *const libc::c_char,
    n_paths: usize,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    /// Sources for fds 0, 1, 2, 3, each >= 4 so no dup3 clobbers a later source.
    fds: [RawFd; 4],
    rlimits: [(libc::c_int, libc::rlimit64); 4],
    n_rlimits: usize,
    run_as: Option<RunAs>,
    procs: *const RawFd,
    n_procs: usize,
    parent: libc::pid_t,
    step: u32,
    errno: i32,
}

/// Files a run will `execve` (uploaded executables) are open for writing only while no clone
/// is in flight, and the other way round: writers hold it shared, `spawn` exclusively from the
/// clone until the child has exec'd (`CLONE_VFORK`).
///
/// Why: a child inherits every fd of the node until its `execve` closes the `O_CLOEXEC` ones.
/// A clone made by one launcher thread while another has its run's executable open for
/// writing hands that write fd to the child for a moment, and the other run's `execve` then
/// fails with `ETXTBSY` ("Text file busy"; a CI run saw an uploaded executable fail so while
/// other tests' pools were spawning). The lock makes that interleaving impossible instead of
/// retrying it.
static EXEC_FILES: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held while a file that a run will `execve` is open for writing (see `EXEC_FILES`); drop it
/// once the file is closed.
pub fn writing_executable() -> std::sync::RwLockReadGuard<'static, ()> {
    EXEC_FILES.read().unwrap_or_else(|p| p.into_inner())
}

/// Starts the child described by `spec`.
///
/// # Errors
/// A pipe, fd or path could not be prepared, clone failed, or a step of the child before exec
/// failed (the error names the step; a missing program is the plain `execve` error).
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Spawned> {
    let (result_r, result_w) = super::tree::pipe_cloexec()?;
    let (out_r, out_w) = super::tree::pipe_cloexec()?;
    let (err_r, err_w) = super::tree::pipe_cloexec()?;
    let (stdin_r, stdin_w) = if spec.stdin {
        let (r, w) = super::tree::pipe_cloexec()?;
        (r, Some(w))
    } else {
        let f = std::fs::File::open("/dev/null")?;
        (OwnedFd::from(f), None)
    };
    // The sources must not sit on 0..=3 (a node started with closed stdio gets them from
    // pipe()), or dup3 onto a lower target could clobber a later source.
    let stdin_r = above_three(stdin_r)?;
    let out_w = above_three(out_w)?;
    let err_w = above_three(err_w)?;
    let result_w = above_three(result_w)?;

    let cstr = |s: &OsStr, what: &str| {
        CString::new(s.as_bytes()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} contains a NUL byte"),
            )
        })
    };
    let program = spec
        .argv
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    let argv_c: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstr(OsStr::new(a), "an argument"))
        .collect::<io::Result<_>>()?;
    // One entry per name, the last one given winning (as with std's Command::envs).
    let mut seen = std::collections::HashSet::new();
    let mut env_c: Vec<CString> = Vec::with_capacity(spec.env.len());
    for (k, v) in spec.env.iter().rev() {
        if seen.insert(k.as_str()) {
            env_c.push(cstr(
                OsStr::new(&format!("{k}={v}")),
                "an environment variable",
            )?);
        }
    }
    env_c.reverse();
    let path_env = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let paths_c: Vec<CString> = exec_candidates(program, path_env)
        .into_iter()
        .map(|p| cstr(OsStr::new(&p), "the program path"))
        .collect::<io::Result<_>>()?;
    let cwd_c = cstr(spec.cwd.as_os_str(), "the working directory")?;
    let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let argv_p = ptrs(&argv_c);
    let env_p = ptrs(&env_c);
    let paths_p = ptrs(&paths_c);

    let mut rlimits = [(
        0,
        libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        },
    ); 4];
    let mut n_rlimits = 0;
    for (res, value) in to_rlimits(spec.limits).into_iter().flatten() {
        rlimits[n_rlimits] = (
            res as libc::c_int,
            libc::rlimit64 {
                rlim_cur: value,
                rlim_max: value,
            },
        );
        n_rlimits += 1;
    }

    let into_cgroup = spec
        .cgroup
        .and_then(|p| p.v2_dir.as_ref().map(|d| d.as_raw_fd()));
    let use_clone3 = clone3_in_use();
    let mut procs: Vec<RawFd> = Vec::new();
    // The v2 cgroup.procs when the child must write itself there (no clone3); lives until the
    // child has exec'd.
    let mut late_procs: Option<OwnedFd> = None;
    if let Some(p) = spec.cgroup {
        procs.extend(p.v1_procs.iter().map(|f| f.as_raw_fd()));
        if !use_clone3 {
            match (&p.v2_procs, &p.v2_dir) {
                (Some(f), _) => procs.push(f.as_raw_fd()),
                (None, Some(d)) => {
                    let f = v2_procs_of(d)?;
                    procs.push(f.as_raw_fd());
                    late_procs = Some(f);
                }
                (None, None) => {}
            }
        }
    }

    let mut args = ChildArgs {
        paths: paths_p.as_ptr(),
        n_paths: paths_c.len(),
        argv: argv_p.as_ptr(),
        envp: env_p.as_ptr(),
        cwd: cwd_c.as_ptr(),
        fds: [
            stdin_r.as_raw_fd(),
            out_w.as_raw_fd(),
            err_w.as_raw_fd(),
            result_w.as_raw_fd(),
        ],
        rlimits,
        n_rlimits,
        run_as: spec.run_as,
        procs: procs.as_ptr(),
        n_procs: procs.len(),
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        step: Step::None as u32,
        errno: 0,
    };

    let stack = STACK.with(|s| s.top())?;
    // No executable of another run is open for writing while this child holds copies of the
    // node's fds (until its exec); released once the clone has returned.
    let no_open_executables = EXEC_FILES.write().unwrap_or_else(|p| p.into_inner());
    let mut pid = -1;
    let mut clone_errno = 0;
    if use_clone3 {
        match clone3_vfork(&mut args, stack, into_cgroup) {
            Ok(p) => pid = p,
            Err(e) if matches!(e, libc::ENOSYS | libc::E2BIG | libc::EINVAL | libc::EPERM) => {
                // ENOSYS: no clone3 (kernel < 5.3, or a seccomp filter); E2BIG/EINVAL: no
                // CLONE_INTO_CGROUP (< 5.7); EPERM: a filter that refuses it. From now on the
                // child writes itself into every cgroup instead.
                if !CLONE3_UNAVAILABLE.swap(true, Ordering::Relaxed) {
                    log::info!(target: "etask::runner", "clone3 refused ({}); spawning with clone(CLONE_VM|CLONE_VFORK), the child enters its cgroups itself", io::Error::from_raw_os_error(e));
                }
                if let Some(dir) = spec.cgroup.and_then(|p| p.v2_dir.as_ref()) {
                    let f = v2_procs_of(dir)?;
                    procs.push(f.as_raw_fd());
                    args.procs = procs.as_ptr();
                    args.n_procs = procs.len();
                    late_procs = Some(f);
                }
            }
            Err(e) => clone_errno = e,
        }
    }
    if pid < 0 && clone_errno == 0 {
        match clone_vfork(&mut args, stack) {
            Ok(p) => pid = p,
            Err(e) => clone_errno = e,
        }
    }
    drop(no_open_executables);
    drop(late_procs);
    if pid < 0 {
        return Err(io::Error::from_raw_os_error(clone_errno));
    }
    // CLONE_VFORK: the child has exec'd or exited by now, so `args` is ours again.
    let step = Step::from_u32(args.step);
    if !matches!(step, Step::None) {
        // It exited with 127 right after recording the failure. Reap it here; should the
        // pool's reaper be quicker, it keeps the exit unclaimed until the spawn returns and
        // then drops it (tree::spawn_root), and this waitpid finds nothing (ECHILD).
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let err = io::Error::from_raw_os_error(args.errno);
        return Err(match step {
            Step::Exec => err,
            s => io::Error::new(err.kind(), format!("{}: {err}", s.what())),
        });
    }
    drop((stdin_r, out_w, err_w, result_w));
    for fd in [
        Some(&out_r),
        Some(&err_r),
        Some(&result_r),
        stdin_w.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        super::tree::set_nonblocking(fd.as_raw_fd())?;
    }
    Ok(Spawned {
        pid,
        stdin: stdin_w,
        stdout: out_r,
        stderr: err_r,
        result: result_r,
    })
}

/// The paths `execve` tries, in order, as `execvp` would: the program itself when it names a
/// path, else each directory of the run's PATH (an empty entry is the working directory).
fn exec_candidates(program: &str, path_env: Option<&str>) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_owned()];
    }
    let path = path_env.unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .map(|d| {
            if d.is_empty() {
                program.to_owned()
            } else {
                format!("{}/{program}", d.trim_end_matches('/'))
            }
        })
        .collect()
}

/// Opens `cgroup.procs` of the cgroup v2 directory `dir` for writing.
fn v2_procs_of(dir: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: openat on a directory fd we hold, with a NUL-terminated literal path.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c"cgroup.procs".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves an fd to 10 or above (close-on-exec) when it sits on 0..=3.
fn above_three(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > RESULT_FD {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd we then own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn to_rlimits(l: &Rlimits) -> [Option<(RlimitResource, u64)>; 4] {
    [
        l.cpu_seconds.map(|v| (libc::RLIMIT_CPU, v)),
        l.address_space_bytes.map(|v| (libc::RLIMIT_AS, v)),
        l.open_files.map(|v| (libc::RLIMIT_NOFILE, v)),
        l.processes.map(|v| (libc::RLIMIT_NPROC, v)),
    ]
}

/// One child stack per launcher thread, reused: a spawn occupies it only until the child has
/// exec'd, and the launcher does one spawn at a time. A guard page below it turns an overflow
/// into a fault instead of silent corruption of the node's memory.
struct Stack {
    base: std::cell::Cell<*mut libc::c_void>,
}

thread_local! {
    static STACK: Stack = const { Stack { base: std::cell::Cell::new(std::ptr::null_mut()) } };
}

const PAGE: usize = 4096;

impl Stack {
    fn top(&self) -> io::Result<*mut u8> {
        if self.base.get().is_null() {
            // SAFETY: an anonymous private mapping; the result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    STACK_SIZE + PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the lowest page of the mapping we just made.
            if unsafe { libc::mprotect(p, PAGE, libc::PROT_NONE) } != 0 {
                let e = io::Error::last_os_error();
                // SAFETY: unmapping what we mapped above.
                unsafe { libc::munmap(p, STACK_SIZE + PAGE) };
                return Err(e);
            }
            self.base.set(p);
        }
        // 16-byte aligned top (the mapping is page aligned and PAGE + STACK_SIZE is too).
        // SAFETY: within (one past the end of) the mapping.
        Ok(unsafe { self.base.get().cast::<u8>().add(PAGE + STACK_SIZE) })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let p = self.base.get();
        if !p.is_null() {
            // SAFETY: the mapping made in `top`, no longer used (the thread is ending).
            unsafe { libc::munmap(p, STACK_SIZE + PAGE) };
        }
    }
}

/// Blocks every signal of the calling thread while it lives: a handler of the node must never
/// run in the child, which shares the node's memory until exec. The child resets every
/// disposition to the default and clears the mask itself right before exec.
struct AllBlocked(libc::sigset_t);

impl AllBlocked {
    fn new() -> AllBlocked {
        // SAFETY: sigset operations on stack values; pthread_sigmask with valid pointers.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            AllBlocked(old)
        }
    }
}

impl Drop for AllBlocked {
    fn drop(&mut self) {
        // SAFETY: restoring the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// `struct clone_args` of clone3(2), version 2 (with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3 with CLONE_VM | CLONE_VFORK: the child starts on `stack_top` and calls `child_main`,
/// the parent thread sleeps until the child has exec'd or exited. Returns the pid or errno.
#[cfg(target_arch = "x86_64")]
fn clone3_vfork(
    args: &mut ChildArgs,
    stack_top: *mut u8,
    cgroup: Option<RawFd>,
) -> Result<i32, i32> {
    let mut ca = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack_top as u64 - STACK_SIZE as u64,
        stack_size: STACK_SIZE as u64,
        ..CloneArgs::default()
    };
    if let Some(fd) = cgroup {
        ca.flags |= CLONE_INTO_CGROUP;
        ca.cgroup = fd as u64;
    }
    let _blocked = AllBlocked::new();
    let ret: i64;
    // SAFETY: clone3 with a stack we own exclusively for the child's life (see `Stack`). In
    // the child (rax == 0) the kernel has set rsp to the 16-byte aligned top of that stack; it
    // calls `child_main(args)`, which never returns (it execs or exits), and exits should it
    // ever return. The parent path only reads rax; rcx and r11 are clobbered by `syscall`.
    // Memory is not marked untouched: the child writes `args.step`/`args.errno`, which the
    // parent reads after the call.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r13",
            "call r12",
            "mov edi, eax",
            "mov eax, 60",
            "syscall",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &mut ca as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") child_main as extern "C" fn(*mut libc::c_void) -> libc::c_int,
            in("r13") args as *mut ChildArgs,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret < 0 {
        Err((-ret) as i32)
    } else {
        Ok(ret as i32)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn clone3_vfork(_: &mut ChildArgs, _: *mut u8, _: Option<RawFd>) -> Result<i32, i32> {
    Err(libc::ENOSYS)
}

/// clone(2) with CLONE_VM | CLONE_VFORK, through libc's wrapper (which sets up the call of
/// `child_main` on the new stack). Returns the pid or errno.
fn clone_vfork(args: &mut ChildArgs, stack_top: *mut u8) -> Result<i32, i32> {
    let _blocked = AllBlocked::new();
    // SAFETY: as for clone3: the stack is ours for the child's life, `child_main` only runs
    // raw system calls on `args`, and CLONE_VFORK keeps this thread (and so `args`) waiting
    // until the child has exec'd or exited.
    let pid = unsafe {
        libc::clone(
            child_main,
            stack_top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (args as *mut ChildArgs).cast(),
        )
    };
    if pid < 0 {
        Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL))
    } else {
        Ok(pid)
    }
}

/// The child, between clone and exec. It shares the node's memory, so it makes only raw
/// system calls (no libc wrapper that could take a lock or signal the node's threads, as
/// glibc's and musl's setuid do), allocates nothing, and reads only `ChildArgs`. On a failure
/// it records the step and errno there and exits with 127.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, valid and not touched by the parent until we
    // exec or exit (CLONE_VFORK). Every call below is a raw system call on memory it prepared.
    unsafe {
        let a = &mut *(arg as *mut ChildArgs);
        let fail = |a: &mut ChildArgs, step: Step| -> libc::c_int {
            a.step = step as u32;
            a.errno = *libc::__errno_location();
            libc::syscall(libc::SYS_exit, 127);
            127
        };
        // Default dispositions (the node ignores SIGPIPE; an ignored signal survives exec).
        // Signals stay blocked (the parent blocked them all) until just before exec.
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                let dfl = KSigaction::default();
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KSigaction,
                    std::ptr::null_mut::<KSigaction>(),
                    8usize,
                );
            }
        }
        if libc::syscall(libc::SYS_setsid) < 0 {
            return fail(a, Step::Setsid);
        }
        // Die with the node rather than run on unsupervised; the scheduler retries.
        if libc::syscall(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return fail(a, Step::Deathsig);
        }
        if libc::syscall(libc::SYS_getppid) as libc::pid_t != a.parent {
            *libc::__errno_location() = libc::ESRCH;
            return fail(a, Step::ParentGone);
        }
        // Into the run's cgroups before anything of the run executes ("0" = the writer).
        for i in 0..a.n_procs {
            let fd = *a.procs.add(i);
            if libc::syscall(libc::SYS_write, fd, b"0".as_ptr(), 1usize) != 1 {
                return fail(a, Step::Cgroup);
            }
        }
        for (target, &src) in a.fds.iter().enumerate() {
            if libc::syscall(libc::SYS_dup3, src, target as RawFd, 0) < 0 {
                return fail(a, Step::Dup);
            }
        }
        // Everything above fd 3 closes on exec, whoever opened it (our pipes to other runs,
        // fds the node inherited without close-on-exec).
        if libc::syscall(SYS_CLOSE_RANGE, 4u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0
            && !cloexec_from_proc()
            && !cloexec_by_loop()
        {
            return fail(a, Step::CloseFds);
        }
        for (res, lim) in a.rlimits.iter().take(a.n_rlimits) {
            if libc::syscall(
                libc::SYS_prlimit64,
                0,
                *res,
                lim as *const libc::rlimit64,
                std::ptr::null_mut::<libc::rlimit64>(),
            ) != 0
            {
                return fail(a, Step::Rlimit);
            }
        }
        if libc::syscall(libc::SYS_chdir, a.cwd) != 0 {
            return fail(a, Step::Chdir);
        }
        if let Some(RunAs { uid, gid }) = a.run_as {
            if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
                return fail(a, Step::Groups);
            }
            if libc::syscall(libc::SYS_setgid, gid) != 0 {
                return fail(a, Step::Gid);
            }
            if libc::syscall(libc::SYS_setuid, uid) != 0 {
                return fail(a, Step::Uid);
            }
        }
        let empty: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
        // Like execvp: go on past paths that do not exist or may not be run; report EACCES
        // if any path had it, else the last error.
        let mut saw_eacces = false;
        for i in 0..a.n_paths {
            libc::syscall(libc::SYS_execve, *a.paths.add(i), a.argv, a.envp);
            match *libc::__errno_location() {
                libc::EACCES => saw_eacces = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => break,
            }
        }
        if saw_eacces {
            *libc::__errno_location() = libc::EACCES;
        }
        fail(a, Step::Exec)
    }
}

/// The kernel's `struct sigaction` for rt_sigaction(2) on x86_64 and aarch64 (handler, flags,
/// restorer, mask); the default value is SIG_DFL with no flags.
#[repr(C)]
#[derive(Default)]
struct KSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Marks fds >= 4 close-on-exec by listing /proc/self/fd with raw getdents64 (for kernels
/// without `CLOSE_RANGE_CLOEXEC`, < 5.11). False when /proc cannot be read.
///
/// # Safety
/// Only raw system calls on a stack buffer; safe to run in the vfork child.
unsafe fn cloexec_from_proc() -> bool {
    let dir = libc::syscall(
        libc::SYS_openat,
        libc::AT_FDCWD,
        c"/proc/self/fd".as_ptr(),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    );
    if dir < 0 {
        return false;
    }
    let mut buf = [0u8; 1024];
    loop {
        let n = libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len());
        if n <= 0 {
            break;
        }
        let mut off = 0usize;
        while off + 19 < n as usize {
            // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name (NUL-terminated).
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            if reclen == 0 {
                break;
            }
            let mut fd: i64 = 0;
            let mut digits = 0;
            let mut j = off + 19;
            while j < off + reclen && j < buf.len() && buf[j] != 0 {
                let c = buf[j];
                if !c.is_ascii_digit() {
                    digits = 0;
                    break;
                }
                fd = fd * 10 + (c - b'0') as i64;
                digits += 1;
                j += 1;
            }
            if digits > 0 && fd > RESULT_FD as i64 && fd != dir {
                libc::syscall(libc::SYS_fcntl, fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
            off += reclen;
        }
    }
    libc::syscall(libc::SYS_close, dir);
    true
}

/// Last resort without /proc: every fd up to the soft RLIMIT_NOFILE (capped at 65536).
///
/// # Safety
/// Only raw system calls; safe to run in the vfork child.
unsafe fn cloexec_by_loop() -> bool {
    let mut lim = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    libc::syscall(
        libc::SYS_prlimit64,
        0,
        libc::RLIMIT_NOFILE,
        std::ptr::null::<libc::rlimit64>(),
        &mut lim as *mut libc::rlimit64,
    );
    let top = lim.rlim_cur.min(1 << 16) as i64;
    for fd in 4..top {
        libc::syscall(libc::SYS_fcntl, fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_candidates_follow_path_like_execvp() {
        assert_eq!(exec_candidates("/bin/sh", Some("/x")), vec!["/bin/sh"]);
        assert_eq!(exec_candidates("./a", None), vec!["./a"]);
        assert_eq!(
            exec_candidates("sh", Some("/usr/bin/:/bin::/opt")),
            vec!["/usr/bin/sh", "/bin/sh", "sh", "/opt/sh"]
        );
    }
}
