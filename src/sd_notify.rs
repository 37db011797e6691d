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
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => send_to(&path, state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the notify socket `path` (`@name` = abstract namespace).
fn send_to(path: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    // "@name" is a socket in the abstract namespace; anything else is a filesystem path.
    let addr = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(path)?,
    };
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::other("short write to the notify socket"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_reaches_a_path_socket_and_an_abstract_one() {
        let path = std::env::temp_dir().join(format!("etask-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind");
        send_to(path.as_os_str(), "READY=1\nSTATUS=up").expect("send");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=up");
        let _ = std::fs::remove_file(&path);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("etask-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        send_to(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send");
        assert_eq!(recv(&sock), "STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let err = send_to(std::ffi::OsStr::new("/nonexistent/etask-notify"), "READY=1");
        assert!(err.is_err());
    }
}
