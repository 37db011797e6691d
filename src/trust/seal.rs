//! Sealed secrets: `secret_env` values and `secret: true` variables encrypted to a pool's
//! X25519 public key with a sealed box (libsodium's `crypto_box_seal`: an ephemeral key pair,
//! X25519, XSalsa20-Poly1305). The scheduler seals at intake and holds only public keys; the
//! nodes of the pool hold the private key and open the values just before the spawn.
//!
//! A sealed value is the text `etask-sealed:v1:<key id>:<base64 sealed box>`, where the key id
//! is the first 8 bytes of the pool's public key in hex (so a node holding several keys during
//! a rotation knows which one opens it). It replaces the clear value in the same field, so
//! the store, the wires and the API carry it unchanged.

use base64::Engine;
use crypto_box::aead::OsRng;

use crate::runner::Program;

/// Sealing or opening a secret failed; the message names the variable, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SealError(pub String);

pub const PREFIX: &str = "etask-sealed:v1:";

/// Whether a value is sealed (by its prefix).
pub fn is_sealed(v: &str) -> bool {
    v.starts_with(PREFIX)
}

/// The id of a 32-byte public key: its first 8 bytes in hex.
pub fn key_id(public: &[u8; 32]) -> String {
    public[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A pool's public key: what the scheduler seals to.
#[derive(Clone)]
pub struct SealKey {
    id: String,
    key: crypto_box::PublicKey,
}

impl SealKey {
    pub fn from_bytes(b: [u8; 32]) -> SealKey {
        SealKey {
            id: key_id(&b),
            key: crypto_box::PublicKey::from(b),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals one value.
    ///
    /// # Errors
    /// Only if the OS random source fails.
    pub fn seal(&self, clear: &str) -> Result<String, SealError> {
        let boxed = self
            .key
            .seal(&mut OsRng, clear.as_bytes())
            .map_err(|e| SealError(format!("cannot seal a secret: {e}")))?;
        Ok(format!(
            "{PREFIX}{}:{}",
            self.id,
            base64::engine::general_purpose::STANDARD.encode(boxed)
        ))
    }

    /// Seals every clear `secret_env` value and secret variable of `p` in place; values that
    /// are sealed already (a client sealed them) are checked for shape and kept.
    ///
    /// # Errors
    /// A value that looks sealed but is malformed, or the random source fails.
    pub fn seal_program(&self, p: &mut Program) -> Result<(), SealError> {
        for (k, v) in p.secret_env.iter_mut() {
            self.seal_value(v, &format!("secret_env {k}"))?;
        }
        for var in p.variables.iter_mut().filter(|v| v.secret) {
            self.seal_value(&mut var.value, &format!("variable {}", var.key))?;
        }
        Ok(())
    }

    fn seal_value(&self, v: &mut String, what: &str) -> Result<(), SealError> {
        if is_sealed(v) {
            return parse(v)
                .map(|_| ())
                .map_err(|e| SealError(format!("{what}: {e}")));
        }
        let sealed = self.seal(v)?;
        // The clear value is overwritten rather than left in freed memory.
        zero(v);
        *v = sealed;
        Ok(())
    }
}

/// Overwrites a string's bytes with zeros (best effort: earlier copies may exist).
fn zero(s: &mut str) {
    // SAFETY: zero bytes are valid UTF-8.
    unsafe { s.as_bytes_mut() }.fill(0);
}

/// (key id, sealed box) of a sealed value.
fn parse(v: &str) -> Result<(&str, Vec<u8>), String> {
    let rest = v.strip_prefix(PREFIX).ok_or("not a sealed value")?;
    let (id, b64) = rest
        .split_once(':')
        .ok_or("sealed value without a key id")?;
    let boxed = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("sealed value is not base64: {e}"))?;
    // 32-byte ephemeral public key + 16-byte tag at least.
    if boxed.len() < 48 {
        return Err("sealed value too short".into());
    }
    Ok((id, boxed))
}

/// A node's pool private keys (several during a rotation).
#[derive(Clone, Default)]
pub struct OpenKeys {
    keys: Vec<(String, crypto_box::SecretKey)>,
}

impl OpenKeys {
    pub fn new(private: &[[u8; 32]]) -> OpenKeys {
        OpenKeys {
            keys: private
                .iter()
                .map(|b| {
                    let sk = crypto_box::SecretKey::from(*b);
                    (key_id(sk.public_key().as_bytes()), sk)
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// These keys and `private` too.
    pub fn with(mut self, private: [u8; 32]) -> OpenKeys {
        let sk = crypto_box::SecretKey::from(private);
        self.keys.push((key_id(sk.public_key().as_bytes()), sk));
        self
    }

    /// Opens one sealed value.
    ///
    /// # Errors
    /// Malformed, sealed to a key this node does not hold, or tampered with.
    pub fn open(&self, v: &str) -> Result<String, SealError> {
        self.open_value(v).map_err(SealError)
    }

    fn open_value(&self, v: &str) -> Result<String, String> {
        let (id, boxed) = parse(v)?;
        let (_, sk) = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .ok_or_else(|| format!("sealed to pool key {id}, which this node does not hold"))?;
        let clear = sk
            .unseal(&boxed)
            .map_err(|_| format!("sealed value for key {id} does not open (tampered?)"))?;
        String::from_utf8(clear).map_err(|_| "sealed value is not UTF-8".into())
    }

    /// Opens every sealed value of `p` in place (clear ones are kept as they are).
    ///
    /// # Errors
    /// A value that does not open; the message names the variable, never a value.
    pub fn open_program(&self, p: &mut Program) -> Result<(), SealError> {
        for (k, v) in p.secret_env.iter_mut() {
            if is_sealed(v) {
                *v = self
                    .open_value(v)
                    .map_err(|e| SealError(format!("secret_env {k}: {e}")))?;
            }
        }
        for var in p.variables.iter_mut() {
            if is_sealed(&var.value) {
                var.value = self
                    .open_value(&var.value)
                    .map_err(|e| SealError(format!("variable {}: {e}", var.key)))?;
            }
        }
        Ok(())
    }
}

/// A new pool key pair: (private, public).
pub fn generate() -> ([u8; 32], [u8; 32]) {
    let sk = crypto_box::SecretKey::generate(&mut OsRng);
    (sk.to_bytes(), *sk.public_key().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::Variable;

    #[test]
    fn sealed_values_open_only_with_the_pools_key() {
        let (sk, pk) = generate();
        let (other_sk, _) = generate();
        let seal = SealKey::from_bytes(pk);
        let mut p = Program::shell("true");
        p.secret_env.insert("PW".into(), "hunter2".into());
        p.variables = vec![
            Variable {
                key: "TOKEN".into(),
                value: "tok-123".into(),
                secret: true,
            },
            Variable {
                key: "PLAIN".into(),
                value: "visible".into(),
                secret: false,
            },
        ];
        seal.seal_program(&mut p).unwrap();
        let text = serde_json::to_string(&p).unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("tok-123"),
            "{text}"
        );
        assert!(text.contains("visible"));
        assert!(is_sealed(&p.secret_env["PW"]));
        // Sealing twice keeps the sealed value (a client may seal before submitting).
        let once = p.clone();
        seal.seal_program(&mut p).unwrap();
        assert_eq!(p, once);

        let wrong = OpenKeys::new(&[other_sk]);
        let err = wrong.open_program(&mut p.clone()).unwrap_err().to_string();
        assert!(err.contains("PW") && err.contains("does not hold"), "{err}");
        let keys = OpenKeys::new(&[other_sk, sk]);
        keys.open_program(&mut p).unwrap();
        assert_eq!(p.secret_env["PW"], "hunter2");
        assert_eq!(p.variables[0].value, "tok-123");

        // One changed byte of the box: it does not open.
        let mut v = seal.seal("x").unwrap();
        let last = v.pop().unwrap();
        v.push(if last == 'A' { 'B' } else { 'A' });
        assert!(keys.open(&v).is_err());
        assert!(seal
            .seal_program(&mut {
                let mut q = Program::shell("t");
                q.secret_env.insert("X".into(), format!("{PREFIX}00:!!"));
                q
            })
            .is_err());
    }
}
