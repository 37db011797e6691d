//! Starting one child: a new session, the result pipe at fd 3, every other inherited fd closed
//! on exec, rlimits, an optional drop to an unprivileged uid/gid, and a scrubbed environment.
//! Only async-signal-safe calls run between fork and exec.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// Resource limits applied to each run (None = inherit the node's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    pub cpu_seconds: Option<u64>,
    pub address_space_bytes: Option<u64>,
    pub open_files: Option<u64>,
    /// Per-user process count (RLIMIT_NPROC). The kernel ignores it for root, so it only
    /// contains fork bombs together with `run_as`.
    pub processes: Option<u64>,
}

/// The uid/gid a run drops to when the node runs as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

pub struct SpawnSpec<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a std::path::Path,
    pub stdin: bool,
    pub limits: &'a Rlimits,
    pub run_as: Option<RunAs>,
}

pub struct Spawned {
    pub pid: i32,
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub result: OwnedFd,
}

const RESULT_FD: RawFd = 3;
const SYS_CLOSE_RANGE: libc::c_long = 436;
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Spawned> {
    let (result_r, result_w) = super::tree::pipe_cloexec()?;
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(spec.cwd)
        .stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let wfd = result_w.as_raw_fd();
    let limits = to_rlimits(spec.limits);
    let run_as = spec.run_as;
    // SAFETY: the closure only makes async-signal-safe syscalls and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // A clean signal state: the node blocks SIGTERM/SIGINT/SIGHUP (they are read with
            // sigwait) and ignores SIGPIPE, and both would otherwise survive exec.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Die with the node rather than run on unsupervised; the scheduler retries.
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            if wfd == RESULT_FD {
                if libc::fcntl(wfd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(wfd, RESULT_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            // Everything above fd 3 closes on exec, whoever opened it (our pipes to other runs,
            // fds the node inherited). Marking rather than closing keeps std's exec-error pipe.
            if libc::syscall(
                SYS_CLOSE_RANGE,
                4 as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                let top = lim.rlim_cur.min(1 << 16) as RawFd;
                for fd in 4..top {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            for (res, value) in limits.iter().flatten() {
                let lim = libc::rlimit {
                    rlim_cur: *value,
                    rlim_max: *value,
                };
                if libc::setrlimit(*res, &lim) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(RunAs { uid, gid }) = run_as {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(result_w);
    let pid = child.id() as i32;
    // The reactor reaps with waitpid(-1); `child` is dropped without waiting on purpose.
    let stdin = child.stdin.take().map(OwnedFd::from);
    let stdout = OwnedFd::from(
        child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout pipe"))?,
    );
    let stderr = OwnedFd::from(
        child
            .stderr
            .take()
            .ok_or_else(|| io::Error::other("no stderr pipe"))?,
    );
    for fd in [
        Some(&stdout),
        Some(&stderr),
        Some(&result_r),
        stdin.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        super::tree::set_nonblocking(fd.as_raw_fd())?;
    }
    Ok(Spawned {
        pid,
        stdin,
        stdout,
        stderr,
        result: result_r,
    })
}

#[cfg(target_env = "gnu")]
type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type RlimitResource = libc::c_int;

fn to_rlimits(l: &Rlimits) -> [Option<(RlimitResource, libc::rlim_t)>; 4] {
    [
        l.cpu_seconds.map(|v| (libc::RLIMIT_CPU, v as libc::rlim_t)),
        l.address_space_bytes
            .map(|v| (libc::RLIMIT_AS, v as libc::rlim_t)),
        l.open_files
            .map(|v| (libc::RLIMIT_NOFILE, v as libc::rlim_t)),
        l.processes.map(|v| (libc::RLIMIT_NPROC, v as libc::rlim_t)),
    ]
}
