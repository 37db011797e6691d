//! systemd's readiness protocol (`Type=notify` units): one datagram such as `READY=1` to the
//! unix socket named by `$NOTIFY_SOCKET`. Hand-written because the protocol is a single
//! `sendto` and a crate would bring more than it saves. Without `$NOTIFY_SOCKET` (not started
//! by systemd, or by a unit of another type) every call does nothing.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Tells systemd the role is up (listening, or consuming): `systemctl start` returns now.
/// `status` is shown by `systemctl status`. Failures are logged, never fatal: a service that
/// runs but cannot reach the notify socket is better than one that stops.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={status}"));
}

/// Tells systemd the process is shutting down on purpose (draining), so `systemctl status`
/// shows "deactivating" rather than a running service that stopped answering.
pub fn stopping(status: &str) {
    send(&format!("STOPPING=1\nSTATUS={status}"));
}

fn send(state: &str) {
    if let Err(e) = notify(state) {
        log::warn!(target: "etask::sd_notify", "cannot notify systemd ({state:?}): {e}");
    }
}

/// Sends one state datagram. `Ok(false)` when `$NOTIFY_SOCKET` is unset.
///
/// # Errors
/// The socket path is invalid, or the datagram could not be sent (systemd gone, socket full).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    use std::os::unix::ffi::OsStrExt;
    // "@name" is a socket in the abstract namespace; anything else is a filesystem path.
    let addr = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(&path)?,
    };
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::other("short write to the notify socket"));
    }
    Ok(true)
}
