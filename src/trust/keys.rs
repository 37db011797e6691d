//! Key files: what `etask keygen` writes and what `[security]` keys name. A key file is one
//! line, `<kind>:<base64 of 32 bytes>` (standard alphabet, padded), kind one of
//! `ed25519-private`, `ed25519-public` (dispatch signing) or `x25519-private`, `x25519-public`
//! (a pool's sealing key). A config value may also carry the line itself instead of a path.
//! Private files are written 0600 and refused when anyone may read them.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;

/// The four kinds of key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SigningPrivate,
    SigningPublic,
    PoolPrivate,
    PoolPublic,
}

impl Kind {
    /// Every kind of key file.
    pub const ALL: [Kind; 4] = [
        Kind::SigningPrivate,
        Kind::SigningPublic,
        Kind::PoolPrivate,
        Kind::PoolPublic,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::SigningPrivate => "ed25519-private",
            Kind::SigningPublic => "ed25519-public",
            Kind::PoolPrivate => "x25519-private",
            Kind::PoolPublic => "x25519-public",
        }
    }
    fn private(self) -> bool {
        matches!(self, Kind::SigningPrivate | Kind::PoolPrivate)
    }
}

/// Why a key could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file cannot be read or written (missing, permissions).
    #[error("{0}")]
    Io(String),
    /// The content is not a key of the expected kind.
    #[error("{0}")]
    Format(String),
    /// A private key file that other users may read.
    #[error("{0}")]
    TooOpen(String),
}

/// The one-line text of a key.
pub fn encode(kind: Kind, bytes: &[u8; 32]) -> String {
    format!(
        "{}:{}",
        kind.label(),
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Parses one key line of `kind`; `what` names where it came from in the error.
///
/// # Errors
/// Another kind, bad base64, or not 32 bytes.
pub fn decode(kind: Kind, line: &str, what: &str) -> Result<[u8; 32], KeyError> {
    let line = line.trim();
    let Some((label, b64)) = line.split_once(':') else {
        return Err(KeyError::Format(format!(
            "{what}: not a key (expected \"{}:BASE64\", as `etask keygen` writes)",
            kind.label()
        )));
    };
    if label != kind.label() {
        // Name the other kind only when it is one: what precedes a ':' in an arbitrary file
        // (an environment dump, a secret) is not echoed into logs.
        let known = Kind::ALL.iter().any(|k| k.label() == label);
        return Err(KeyError::Format(if known {
            format!(
                "{what}: an {label} key where an {} key is needed",
                kind.label()
            )
        } else {
            format!(
                "{what}: not a key (expected \"{}:BASE64\", as `etask keygen` writes)",
                kind.label()
            )
        }));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| KeyError::Format(format!("{what}: bad base64: {e}")))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        KeyError::Format(format!(
            "{what}: a key is 32 bytes, this one {}",
            bytes.len()
        ))
    })
}

/// Reads a key from `spec`: the key line itself, or the path of a file holding it. A private
/// key file readable by every user is refused.
///
/// # Errors
/// The file cannot be read, is world-readable (private keys), or holds no key of `kind`.
pub fn load(kind: Kind, spec: &str) -> Result<[u8; 32], KeyError> {
    // A key line of any kind is a key line (a wrong kind is named as such, not looked for as
    // a file).
    let inline = Kind::ALL
        .iter()
        .any(|k| spec.trim_start().starts_with(&format!("{}:", k.label())));
    if inline {
        return decode(kind, spec, "inline key");
    }
    let path = Path::new(spec);
    let text = crate::read_bounded_text(path, crate::MAX_KEY_FILE_BYTES, true)
        .map_err(|e| KeyError::Io(format!("cannot read key file {spec}: {e}")))?;
    // What the file holds first: a public key given where a private one is needed is that
    // mistake, not a private key to chmod.
    let key = decode(kind, &text, spec)?;
    if kind.private() {
        let mode = std::fs::metadata(path)
            .map_err(|e| KeyError::Io(format!("cannot read key file {spec}: {e}")))?
            .permissions()
            .mode();
        if mode & 0o004 != 0 {
            return Err(KeyError::TooOpen(format!(
                "private key file {spec} is readable by every user (mode {:o}): chmod 600 it \
                 (and make a new key: this one may be known)",
                mode & 0o777
            )));
        }
    }
    Ok(key)
}

/// Writes a key file: private ones 0600 (created so, never widened), public ones 0644. An
/// existing file is not overwritten.
///
/// # Errors
/// The file exists or cannot be written.
pub fn write(path: &Path, kind: Kind, bytes: &[u8; 32]) -> Result<(), KeyError> {
    let exists = || {
        KeyError::Io(format!(
            "{} exists: not overwritten (move it away to make a new key)",
            path.display()
        ))
    };
    if path.exists() {
        return Err(exists());
    }
    // Written whole to a temporary file, then linked into place (which fails if the name
    // exists: never an overwrite) and the temporary removed: a full disk or a crash leaves
    // no empty or partial key under the real name (one did, and every later start and
    // `keygen` refused it).
    let mode = if kind.private() { 0o600 } else { 0o644 };
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map_or("key".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed a public key's mode; set it as documented.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        writeln!(f, "{}", encode(kind, bytes))?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    written.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            exists()
        } else {
            KeyError::Io(format!("cannot write {}: {e}", path.display()))
        }
    })
}

/// The files of a key pair: `<dir>/<stem>.key` and `<dir>/<stem>.pub`.
pub fn pair_paths(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{stem}.key")),
        dir.join(format!("{stem}.pub")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_kinds_are_not_mixed_up() {
        let k = [7u8; 32];
        let line = encode(Kind::PoolPublic, &k);
        assert_eq!(decode(Kind::PoolPublic, &line, "t").unwrap(), k);
        assert!(decode(Kind::SigningPublic, &line, "t")
            .unwrap_err()
            .to_string()
            .contains("an x25519-public key where an ed25519-public"));
        assert!(decode(Kind::PoolPublic, "x25519-public:AAAA", "t").is_err());
        assert!(decode(Kind::PoolPublic, "garbage", "t").is_err());
        assert_eq!(load(Kind::PoolPublic, &line).unwrap(), k);
    }

    #[test]
    fn private_files_are_0600_and_refused_when_world_readable() {
        let dir = std::env::temp_dir().join(format!("etask-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (key, public) = pair_paths(&dir, "p");
        write(&key, Kind::SigningPrivate, &[1; 32]).unwrap();
        write(&public, Kind::SigningPublic, &[2; 32]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&key), mode(&public)), (0o600, 0o644));
        assert!(write(&key, Kind::SigningPrivate, &[3; 32])
            .unwrap_err()
            .to_string()
            .contains("not overwritten"));
        assert_eq!(
            load(Kind::SigningPrivate, key.to_str().unwrap()).unwrap(),
            [1; 32]
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load(Kind::SigningPrivate, key.to_str().unwrap()),
            Err(KeyError::TooOpen(_))
        ));
        // A public key (0644 by nature) where the private one is needed: that is the error,
        // not "chmod 600 it".
        let e = load(Kind::SigningPrivate, public.to_str().unwrap()).unwrap_err();
        assert!(
            e.to_string()
                .contains("an ed25519-public key where an ed25519-private key is needed"),
            "{e}"
        );
        // A key line of the wrong kind is named so, not looked for as a file.
        let e = load(Kind::SigningPrivate, &encode(Kind::SigningPublic, &[2; 32])).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("inline key: an ed25519-public key"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
