//! Termination signals as channel messages: SIGINT and SIGTERM are blocked in every thread and
//! one named thread receives them with sigwait, so shutdown is ordinary control flow and no
//! signal handler touches program state. Call before spawning any other thread.

use crossbeam_channel::Receiver;

/// "SIGTERM", "SIGINT", "SIGHUP", or "signal N": how logs name what stopped a process.
pub fn name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP for the process and returns a channel that yields each
/// one as it arrives. Child processes start with an empty mask (std resets it before exec).
pub fn termination() -> std::io::Result<Receiver<i32>> {
    let sigs = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    // SAFETY: building and applying a signal mask on a stack sigset.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in sigs {
            libc::sigaddset(&mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    // Unbounded on purpose: a handful of signals at most, and the waiter must never block.
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: sigwait on the set blocked above.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 && tx.send(sig).is_err() {
                return;
            }
        })?;
    Ok(rx)
}

/// Marks the process not dumpable (`PR_SET_DUMPABLE` 0): other processes of the same uid can no
/// longer read its `/proc/<pid>/environ`, `mem` or `maps`, nor attach a debugger, and it leaves
/// no core file. Children get the default back when they `execve`.
pub fn not_dumpable() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// Removes `name` from the environment and overwrites its value where the kernel shows it
/// (`/proc/<pid>/environ` reads the process's original environment block, which `unsetenv`
/// leaves in place). Call while the process is single-threaded.
pub fn scrub_env(name: &str) {
    let Ok(c) = std::ffi::CString::new(name) else {
        return;
    };
    // SAFETY: single-threaded (documented precondition); getenv returns a pointer into the
    // environment block or null, and we overwrite exactly the value's bytes before the NUL.
    unsafe {
        let p = libc::getenv(c.as_ptr());
        if !p.is_null() {
            let len = libc::strlen(p);
            std::ptr::write_bytes(p, 0, len);
        }
    }
    std::env::remove_var(name);
}
