//! Trust on the dispatch path: the scheduler signs every dispatch and cancel (Ed25519) over
//! the canonical encoding of `canonical`; nodes verify the signature, the expiry and the
//! pool/node binding before anything starts (replays are caught by each node's spool).
//! `seal` encrypts secrets to a pool's key; `keys` reads and writes key files.
//! Sync code only: no I/O but key files, no transport knowledge.

pub mod canonical;
pub mod keys;
pub mod seal;
pub mod tls;

use std::path::Path;

use base64::Engine;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use crate::model::DeliveryPath;

pub use canonical::{CancelFields, DispatchFields};
use keys::{KeyError, Kind};

/// The signature of a dispatch or cancel as the wires carry it:
/// `v1.<key id>.<base64 of the 64-byte Ed25519 signature>` (key id: `seal::key_id` of the
/// signer's public key).
const SIG_VERSION: &str = "v1";

/// How long a dispatch or cancel sent over gRPC may wait before a node refuses it.
pub const GRPC_TTL_MS: i64 = 60_000;

/// Where a signed dispatch is bound and when it was signed; carried next to the dispatch on
/// every wire. `Default` = unsigned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    /// The node it is for; None = any node of its pool.
    pub node: Option<String>,
    /// Unix ms; 0 = not stamped.
    pub issued_at: i64,
    pub expires_at: i64,
    /// None = unsigned.
    pub sig: Option<String>,
}

/// Why a node refused a dispatch or a cancel. The text is what the scheduler records and the
/// dead-letter topic carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// No signature, and this node requires one.
    #[error("untrusted dispatch: unsigned (this node trusts only signed dispatches)")]
    Unsigned,
    /// Signed by a key that is not in `security.trusted_keys`.
    #[error("untrusted dispatch: signed by unknown key {0}")]
    UnknownKey(String),
    /// The signature does not match the content: something was changed after signing.
    #[error("untrusted dispatch: bad signature (tampered with, or signed for other content)")]
    BadSignature,
    /// The signature field is not in the `v1.<key id>.<base64>` shape.
    #[error("untrusted dispatch: malformed signature: {0}")]
    Malformed(String),
    /// Past its `expires_at`.
    #[error("untrusted dispatch: expired {0} ms ago")]
    Expired(i64),
    /// Signed for another pool.
    #[error("untrusted dispatch: for pool {got:?}, this node serves pool {want:?}")]
    WrongPool { want: String, got: String },
    /// Signed for another node.
    #[error("untrusted dispatch: for node {got:?}, this is node {want:?}")]
    WrongNode { want: String, got: String },
    /// This node already took this execution attempt.
    #[error(
        "untrusted dispatch: replay of execution {0} attempt {1}, which this node already took"
    )]
    Replay(i64, u32),
    /// A sealed secret does not open here.
    #[error("untrusted dispatch: {0}")]
    Sealed(String),
}

impl Refusal {
    /// Whether a refusal text came from here (the scheduler fails such an attempt instead of
    /// trying another node).
    pub fn is_refusal_text(s: &str) -> bool {
        s.contains("untrusted dispatch:")
    }
}

fn sig_text(key: &SigningKey, msg: &[u8]) -> String {
    let id = seal::key_id(key.verifying_key().as_bytes());
    let sig = key.sign(msg);
    format!(
        "{SIG_VERSION}.{id}.{}",
        base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
    )
}

/// The scheduler's signing key (none = dispatches go out unsigned).
pub struct Signer {
    key: Option<SigningKey>,
}

impl Signer {
    pub fn none() -> Signer {
        Signer { key: None }
    }

    pub fn from_bytes(b: [u8; 32]) -> Signer {
        Signer {
            key: Some(SigningKey::from_bytes(&b)),
        }
    }

    /// Reads `security.signing_key` (a path or an inline key line); empty = no signing.
    ///
    /// # Errors
    /// The key cannot be read (see `keys::load`).
    pub fn load(spec: &str) -> Result<Signer, KeyError> {
        if spec.is_empty() {
            return Ok(Signer::none());
        }
        keys::load(Kind::SigningPrivate, spec).map(Signer::from_bytes)
    }

    pub fn signs(&self) -> bool {
        self.key.is_some()
    }

    /// The public key that verifies this signer's signatures.
    pub fn public(&self) -> Option<[u8; 32]> {
        self.key.as_ref().map(|k| k.verifying_key().to_bytes())
    }

    /// A stamp for a dispatch: bound to `node` (None = any node of its pool), valid from `now`
    /// for `ttl_ms`, signed when there is a key. `fields` gives everything else; its own
    /// node/issued_at/expires_at are replaced by these.
    pub fn stamp(
        &self,
        fields: DispatchFields<'_>,
        node: Option<&str>,
        now: i64,
        ttl_ms: i64,
    ) -> Stamp {
        let f = DispatchFields {
            node,
            issued_at: now,
            expires_at: now + ttl_ms,
            ..fields
        };
        Stamp {
            node: node.map(str::to_owned),
            issued_at: f.issued_at,
            expires_at: f.expires_at,
            sig: self
                .key
                .as_ref()
                .map(|k| sig_text(k, &canonical::dispatch_bytes(&f))),
        }
    }

    /// The stamp of a cancel of (execution, attempt) for `node` (None = every node).
    pub fn stamp_cancel(
        &self,
        execution_id: i64,
        attempt: u32,
        node: Option<&str>,
        now: i64,
        ttl_ms: i64,
    ) -> Stamp {
        let f = CancelFields {
            execution_id,
            attempt,
            node,
            issued_at: now,
            expires_at: now + ttl_ms,
        };
        Stamp {
            node: node.map(str::to_owned),
            issued_at: f.issued_at,
            expires_at: f.expires_at,
            sig: self
                .key
                .as_ref()
                .map(|k| sig_text(k, &canonical::cancel_bytes(&f))),
        }
    }
}

/// Who a node is, for the binding checks.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The pool it serves; None = any (the built-in node of `--mode all`).
    pub pool: Option<String>,
    pub node: String,
}

/// A node's view of the schedulers it trusts.
#[derive(Clone, Default)]
pub struct Verifier {
    trusted: Vec<(String, VerifyingKey)>,
    /// Refuse unsigned dispatches (always, when keys are trusted).
    require: bool,
    /// Refuse dispatches valid for longer than this from now: the node remembers what it
    /// took (its replay defence) only this long. 0 = no limit.
    max_validity_ms: i64,
}

impl Verifier {
    /// Trusts nothing and checks nothing but the expiry and the binding: the behaviour of a
    /// node without `security.trusted_keys`.
    pub fn open() -> Verifier {
        Verifier::default()
    }

    /// Trusts these public keys (several during a key rollover); unsigned dispatches are
    /// refused.
    ///
    /// # Errors
    /// A key is not a valid Ed25519 point.
    pub fn trusting(public: &[[u8; 32]]) -> Result<Verifier, KeyError> {
        let trusted = public
            .iter()
            .map(|b| {
                VerifyingKey::from_bytes(b)
                    .map(|k| (seal::key_id(b), k))
                    .map_err(|e| KeyError::Format(format!("not an Ed25519 public key: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Verifier {
            require: !trusted.is_empty(),
            trusted,
            max_validity_ms: 0,
        })
    }

    /// This verifier, also trusting `public` (the built-in node trusts its own scheduler).
    ///
    /// # Errors
    /// Not a valid Ed25519 public key.
    pub fn also_trusting(mut self, public: [u8; 32]) -> Result<Verifier, KeyError> {
        let id = seal::key_id(&public);
        if !self.trusted.iter().any(|(k, _)| *k == id) {
            let k = VerifyingKey::from_bytes(&public)
                .map_err(|e| KeyError::Format(format!("not an Ed25519 public key: {e}")))?;
            self.trusted.push((id, k));
        }
        self.require = true;
        Ok(self)
    }

    /// Refuses signed dispatches that stay valid longer than `ms` from now (how long the node
    /// remembers the attempts it took).
    pub fn with_max_validity(mut self, ms: i64) -> Verifier {
        self.max_validity_ms = ms;
        self
    }

    /// Reads `security.trusted_keys` (paths or inline key lines).
    ///
    /// # Errors
    /// A key cannot be read.
    pub fn load(specs: &[String]) -> Result<Verifier, KeyError> {
        let keys = specs
            .iter()
            .map(|s| keys::load(Kind::SigningPublic, s))
            .collect::<Result<Vec<_>, _>>()?;
        Verifier::trusting(&keys)
    }

    /// Whether signatures are checked (false: anything signed or not is accepted).
    pub fn verifies(&self) -> bool {
        self.require
    }

    /// Logs, once at a node's start, what this verifier checks: the ids of the keys it
    /// trusts, or that it runs dispatches without checking who signed them. Call it on the
    /// verifier the node will use (after `also_trusting`), so the line tells the truth.
    pub fn announce(&self) {
        if self.require {
            let ids: Vec<&str> = self.trusted.iter().map(|(id, _)| id.as_str()).collect();
            log::info!(target: "etask::trust", "dispatches and cancels are verified: trusted key(s) {}; unsigned, forged, expired or replayed ones are refused",
                ids.join(", "));
        } else {
            log::info!(target: "etask::trust", "no security.trusted_keys: dispatches are run without checking who signed them");
        }
    }

    fn check_sig(&self, sig: Option<&str>, msg: &[u8]) -> Result<(), Refusal> {
        if !self.require {
            return Ok(());
        }
        let sig = sig.filter(|s| !s.is_empty()).ok_or(Refusal::Unsigned)?;
        let mut parts = sig.splitn(3, '.');
        let (Some(SIG_VERSION), Some(id), Some(b64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed(
                "expected v1.<key id>.<base64 signature>".into(),
            ));
        };
        let (_, key) = self
            .trusted
            .iter()
            .find(|(k, _)| k == id)
            .ok_or_else(|| Refusal::UnknownKey(id.chars().take(16).collect()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| Refusal::Malformed(format!("bad base64: {e}")))?;
        let bytes = <[u8; 64]>::try_from(bytes.as_slice())
            .map_err(|_| Refusal::Malformed("a signature is 64 bytes".into()))?;
        key.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&bytes))
            .map_err(|_| Refusal::BadSignature)
    }

    /// Checks a dispatch before anything of it runs: signature (when keys are trusted),
    /// expiry, pool and node binding. The replay check is the node's (its spool).
    ///
    /// # Errors
    /// The first check that fails.
    pub fn check_dispatch(
        &self,
        f: &DispatchFields<'_>,
        sig: Option<&str>,
        me: &NodeIdentity,
        now: i64,
    ) -> Result<(), Refusal> {
        // The signature first: nothing of an unauthenticated message is believed, not even
        // the fields the later checks read.
        self.check_sig(sig, &canonical::dispatch_bytes(f))?;
        if f.expires_at > 0 && f.expires_at < now {
            return Err(Refusal::Expired(now - f.expires_at));
        }
        if self.require && f.expires_at <= 0 {
            return Err(Refusal::Malformed("no expiry".into()));
        }
        if self.require && self.max_validity_ms > 0 && f.expires_at - now > self.max_validity_ms {
            return Err(Refusal::Malformed(format!(
                "valid for {} s, longer than this node remembers the dispatches it took ({} s)",
                (f.expires_at - now) / 1000,
                self.max_validity_ms / 1000
            )));
        }
        let pool = canonical::pool_name(f.pool);
        // Without trusted keys a dispatch that names no pool (a scheduler from before pools
        // were on the gRPC wire) is not bound to one; a verified dispatch always is.
        let names_pool = f.pool.is_some_and(|p| !p.is_empty());
        if let Some(want) = me.pool.as_ref().filter(|_| self.require || names_pool) {
            if want != pool {
                return Err(Refusal::WrongPool {
                    want: want.clone(),
                    got: pool.to_owned(),
                });
            }
        }
        if let Some(node) = f.node.filter(|n| !n.is_empty()) {
            if node != me.node {
                return Err(Refusal::WrongNode {
                    want: me.node.clone(),
                    got: node.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Checks a cancel: signature (when keys are trusted), expiry and node binding.
    ///
    /// # Errors
    /// The first check that fails.
    pub fn check_cancel(
        &self,
        f: &CancelFields<'_>,
        sig: Option<&str>,
        me: &NodeIdentity,
        now: i64,
    ) -> Result<(), Refusal> {
        self.check_sig(sig, &canonical::cancel_bytes(f))?;
        if self.require && (f.expires_at <= 0 || f.expires_at < now) {
            return Err(Refusal::Expired(now - f.expires_at));
        }
        if let Some(node) = f.node.filter(|n| !n.is_empty()) {
            if node != me.node {
                return Err(Refusal::WrongNode {
                    want: me.node.clone(),
                    got: node.to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// A new signing key pair: (private, public).
pub fn generate_signing() -> ([u8; 32], [u8; 32]) {
    let k = SigningKey::generate(&mut crypto_box::aead::OsRng);
    (k.to_bytes(), k.verifying_key().to_bytes())
}

/// `etask keygen --out DIR`: writes `dispatch.key` (0600) and `dispatch.pub` (0644);
/// with `pool`, `pool-<NAME>.key` and `pool-<NAME>.pub` instead. Returns the files written.
///
/// # Errors
/// A file exists already or cannot be written; a pool name that is not a plain name.
pub fn keygen(dir: &Path, pool: Option<&str>) -> Result<Vec<std::path::PathBuf>, KeyError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| KeyError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let (stem, (private, public), kinds) = match pool {
        None => (
            "dispatch".to_owned(),
            generate_signing(),
            (Kind::SigningPrivate, Kind::SigningPublic),
        ),
        Some(p) => {
            if !crate::model::is_plain_name(p) {
                return Err(KeyError::Format(format!(
                    "pool name {p:?}: use letters, digits, '-', '_' and '.'"
                )));
            }
            (
                format!("pool-{p}"),
                seal::generate(),
                (Kind::PoolPrivate, Kind::PoolPublic),
            )
        }
    };
    let (kp, pp) = keys::pair_paths(dir, &stem);
    if pp.exists() {
        return Err(KeyError::Io(format!(
            "{} exists: not overwritten (move it away to make a new key)",
            pp.display()
        )));
    }
    keys::write(&kp, kinds.0, &private)?;
    if let Err(e) = keys::write(&pp, kinds.1, &public) {
        // Half a pair is no pair: without this, a full disk left a private key whose public
        // half was missing, and every later run said "exists".
        let _ = std::fs::remove_file(&kp);
        return Err(e);
    }
    Ok(vec![kp, pp])
}

/// The key pairs of `--mode all` (`builtin_keys`).
#[derive(Clone, PartialEq, Eq)]
pub struct BuiltinKeys {
    pub signing_private: [u8; 32],
    pub signing_public: [u8; 32],
    pub pool_private: [u8; 32],
    pub pool_public: [u8; 32],
}

/// The built-in key pairs of `--mode all` in `<data_dir>/keys/` (0700): the dispatch signing
/// pair and the built-in node's pool pair (`pool-local`), created on first start.
///
/// # Errors
/// The directory or a key cannot be created or read.
pub fn builtin_keys(data_dir: &Path) -> Result<BuiltinKeys, KeyError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = data_dir.join("keys");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| KeyError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let pair = |stem: &str, pool: Option<&str>, kinds: (Kind, Kind)| {
        let (kp, pp) = keys::pair_paths(&dir, stem);
        if !kp.exists() {
            // A half-written pair (crash between the two files) is made anew.
            let _ = std::fs::remove_file(&pp);
            keygen(&dir, pool)?;
        }
        let text = |p: &Path| p.to_str().map(str::to_owned).unwrap_or_default();
        Ok::<_, KeyError>((
            keys::load(kinds.0, &text(&kp))?,
            keys::load(kinds.1, &text(&pp))?,
        ))
    };
    let (ss, sp) = pair(
        "dispatch",
        None,
        (Kind::SigningPrivate, Kind::SigningPublic),
    )?;
    let (ps, pp) = pair(
        "pool-local",
        // The built-in node's pool is named after its path.
        Some(DeliveryPath::Local.as_str()),
        (Kind::PoolPrivate, Kind::PoolPublic),
    )?;
    Ok(BuiltinKeys {
        signing_private: ss,
        signing_public: sp,
        pool_private: ps,
        pool_public: pp,
    })
}

/// What a node checks a dispatch with: whom it trusts, who it is, what opens its secrets.
#[derive(Clone)]
pub struct NodeTrust {
    pub verifier: Verifier,
    pub me: NodeIdentity,
    pub open: seal::OpenKeys,
}

/// What the scheduler signs and seals with.
pub struct SchedulerKeys {
    pub signer: std::sync::Arc<Signer>,
    /// Pool name → its public key.
    pub pools: std::collections::HashMap<String, seal::SealKey>,
    /// The built-in node's pool key (`target.path = local`).
    pub local: Option<seal::SealKey>,
    /// Refuse secrets for a pool without a key instead of storing them in clear.
    pub require_sealed: bool,
}

impl SchedulerKeys {
    /// Signs nothing, seals nothing.
    pub fn none() -> SchedulerKeys {
        SchedulerKeys {
            signer: std::sync::Arc::new(Signer::none()),
            pools: Default::default(),
            local: None,
            require_sealed: false,
        }
    }

    /// The key the secrets of a task for (`path`, `pool`) are sealed to.
    pub fn seal_key(&self, path: DeliveryPath, pool: &str) -> Option<&seal::SealKey> {
        if path == DeliveryPath::Local {
            return self.local.as_ref();
        }
        self.pools.get(pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{Program, Variable};

    fn program() -> Program {
        let mut p = Program::shell("echo hi");
        p.args = vec!["a".into()];
        p.env.insert("E".into(), "1".into());
        p.secret_env.insert("S".into(), "sealed".into());
        p.stdin = Some("in".into());
        p.workdir = Some("w".into());
        p.params = serde_json::from_str(r#"{"h":"x"}"#).unwrap();
        p.variables = vec![Variable {
            key: "V".into(),
            value: "v".into(),
            secret: true,
        }];
        p
    }

    fn me() -> NodeIdentity {
        NodeIdentity {
            pool: Some("edge".into()),
            node: "n1".into(),
        }
    }

    fn fields(p: &Program) -> DispatchFields<'_> {
        DispatchFields {
            execution_id: 42,
            attempt: 2,
            task_id: 7,
            pool: Some("edge"),
            node: Some("n1"),
            program: p,
            timeout_ms: Some(5000),
            shard_index: 1,
            shard_total: 3,
            issued_at: 0,
            expires_at: 0,
        }
    }

    fn pair() -> (Signer, Verifier) {
        let (s, p) = generate_signing();
        (Signer::from_bytes(s), Verifier::trusting(&[p]).unwrap())
    }

    #[test]
    fn a_signed_dispatch_verifies_and_every_changed_field_breaks_it() {
        let (signer, verifier) = pair();
        let p = program();
        let now = 1_000_000;
        let st = signer.stamp(fields(&p), Some("n1"), now, 60_000);
        let signed = DispatchFields {
            issued_at: st.issued_at,
            expires_at: st.expires_at,
            ..fields(&p)
        };
        let sig = st.sig.as_deref();
        verifier.check_dispatch(&signed, sig, &me(), now).unwrap();

        // Every field, one at a time (program fields through changed copies).
        let mut programs: Vec<(&str, Program)> = Vec::new();
        let mut q = program();
        q.code = Some("echo hj".into());
        programs.push(("code", q));
        let mut q = program();
        q.kind = crate::runner::ProgramKind::Python;
        programs.push(("kind", q));
        let mut q = program();
        q.args[0] = "b".into();
        programs.push(("args", q));
        let mut q = program();
        q.env.insert("E".into(), "2".into());
        programs.push(("env", q));
        let mut q = program();
        q.secret_env.insert("S".into(), "sealee".into());
        programs.push(("secret_env", q));
        let mut q = program();
        q.stdin = Some("io".into());
        programs.push(("stdin", q));
        let mut q = program();
        q.workdir = Some("x".into());
        programs.push(("workdir", q));
        let mut q = program();
        q.params = serde_json::from_str(r#"{"h":"y"}"#).unwrap();
        programs.push(("params", q));
        let mut q = program();
        q.variables[0].value = "w".into();
        programs.push(("variable value", q));
        let mut q = program();
        q.variables[0].secret = false;
        programs.push(("variable secret", q));
        let mut q = program();
        q.shell = Some(crate::runner::ShellKind::Bash);
        programs.push(("shell", q));
        let mut q = program();
        q.argv_style = crate::runner::ArgvStyle::Legacy;
        programs.push(("argv_style", q));
        let mut q = program();
        q.limits = Some(crate::runner::Limits::default());
        programs.push(("limits present", q));
        let mut q = program();
        q.limits = Some(crate::runner::Limits {
            pids: Some(100),
            ..Default::default()
        });
        programs.push(("limits.pids", q));
        let mut q = program();
        q.kind = crate::runner::ProgramKind::Exec;
        q.code = None;
        q.argv = Some(vec!["/bin/true".into()]);
        programs.push(("argv", q));
        for (what, q) in &programs {
            let f = DispatchFields {
                program: q,
                ..signed
            };
            assert_eq!(
                verifier.check_dispatch(&f, sig, &me(), now),
                Err(Refusal::BadSignature),
                "{what}"
            );
        }
        let scalar: Vec<(&str, DispatchFields<'_>)> = vec![
            (
                "execution_id",
                DispatchFields {
                    execution_id: 43,
                    ..signed
                },
            ),
            (
                "attempt",
                DispatchFields {
                    attempt: 3,
                    ..signed
                },
            ),
            (
                "task_id",
                DispatchFields {
                    task_id: 8,
                    ..signed
                },
            ),
            (
                "pool",
                DispatchFields {
                    pool: Some("edgf"),
                    ..signed
                },
            ),
            (
                "node",
                DispatchFields {
                    node: None,
                    ..signed
                },
            ),
            (
                "timeout",
                DispatchFields {
                    timeout_ms: Some(5001),
                    ..signed
                },
            ),
            (
                "shard_index",
                DispatchFields {
                    shard_index: 0,
                    ..signed
                },
            ),
            (
                "shard_total",
                DispatchFields {
                    shard_total: 4,
                    ..signed
                },
            ),
            (
                "issued_at",
                DispatchFields {
                    issued_at: now + 1,
                    ..signed
                },
            ),
            (
                "expires_at",
                DispatchFields {
                    expires_at: st.expires_at + 1,
                    ..signed
                },
            ),
        ];
        for (what, f) in scalar {
            assert_eq!(
                verifier.check_dispatch(&f, sig, &me(), now),
                Err(Refusal::BadSignature),
                "{what}"
            );
        }
        // Every byte of the canonical encoding is covered.
        let bytes = canonical::dispatch_bytes(&signed);
        let (_, vk) = &verifier.trusted[0];
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sig.unwrap().rsplit('.').next().unwrap())
            .unwrap();
        let s = ed25519_dalek::Signature::from_bytes(&raw.try_into().unwrap());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(vk.verify_strict(&b, &s).is_err(), "byte {i}");
        }
    }

    #[test]
    fn unsigned_unknown_expired_and_misbound_dispatches_are_refused() {
        let (signer, verifier) = pair();
        let (stranger, _) = pair();
        let p = program();
        let now = 1_000_000;
        fn f<'a>(p: &'a Program, st: &'a Stamp) -> DispatchFields<'a> {
            DispatchFields {
                node: st.node.as_deref(),
                issued_at: st.issued_at,
                expires_at: st.expires_at,
                ..fields(p)
            }
        }
        let st = signer.stamp(fields(&p), Some("n1"), now, 60_000);
        assert_eq!(
            verifier.check_dispatch(&f(&p, &st), None, &me(), now),
            Err(Refusal::Unsigned)
        );
        let other = stranger.stamp(fields(&p), Some("n1"), now, 60_000);
        assert!(matches!(
            verifier.check_dispatch(&f(&p, &other), other.sig.as_deref(), &me(), now),
            Err(Refusal::UnknownKey(_))
        ));
        assert!(matches!(
            verifier.check_dispatch(&f(&p, &st), Some("v1.zz"), &me(), now),
            Err(Refusal::Malformed(_))
        ));
        assert_eq!(
            verifier.check_dispatch(&f(&p, &st), st.sig.as_deref(), &me(), now + 60_001),
            Err(Refusal::Expired(1))
        );
        let elsewhere = NodeIdentity {
            pool: Some("core".into()),
            node: "n1".into(),
        };
        assert!(matches!(
            verifier.check_dispatch(&f(&p, &st), st.sig.as_deref(), &elsewhere, now),
            Err(Refusal::WrongPool { .. })
        ));
        let twin = NodeIdentity {
            pool: Some("edge".into()),
            node: "n2".into(),
        };
        assert!(matches!(
            verifier.check_dispatch(&f(&p, &st), st.sig.as_deref(), &twin, now),
            Err(Refusal::WrongNode { .. })
        ));
        // Any node of the pool when not bound to one.
        let any = signer.stamp(fields(&p), None, now, 60_000);
        verifier
            .check_dispatch(&f(&p, &any), any.sig.as_deref(), &twin, now)
            .unwrap();
        // A node that trusts no key checks expiry and binding only.
        Verifier::open()
            .check_dispatch(&f(&p, &st), None, &me(), now)
            .unwrap();
        // Rotation: old and new keys both trusted.
        let (s2, p2) = generate_signing();
        let (_, p1) = (0, signer.public().unwrap());
        let both = Verifier::trusting(&[p1, p2]).unwrap();
        let new = Signer::from_bytes(s2).stamp(fields(&p), Some("n1"), now, 60_000);
        both.check_dispatch(&f(&p, &new), new.sig.as_deref(), &me(), now)
            .unwrap();
        both.check_dispatch(&f(&p, &st), st.sig.as_deref(), &me(), now)
            .unwrap();
    }

    #[test]
    fn cancels_are_signed_and_checked_like_dispatches() {
        let (signer, verifier) = pair();
        let now = 5_000;
        let st = signer.stamp_cancel(9, 1, None, now, 60_000);
        let f = CancelFields {
            execution_id: 9,
            attempt: 1,
            node: None,
            issued_at: st.issued_at,
            expires_at: st.expires_at,
        };
        verifier
            .check_cancel(&f, st.sig.as_deref(), &me(), now)
            .unwrap();
        assert_eq!(
            verifier.check_cancel(&f, None, &me(), now),
            Err(Refusal::Unsigned)
        );
        let other = CancelFields {
            execution_id: 10,
            ..f
        };
        assert_eq!(
            verifier.check_cancel(&other, st.sig.as_deref(), &me(), now),
            Err(Refusal::BadSignature)
        );
        // A dispatch signature is not a cancel signature (domain tags differ).
        let p = program();
        let d = signer.stamp(fields(&p), None, now, 60_000);
        assert_eq!(
            verifier.check_cancel(&f, d.sig.as_deref(), &me(), now),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn keygen_writes_pairs_that_load() {
        let dir = std::env::temp_dir().join(format!("etask-keygen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = keygen(&dir, None).unwrap();
        let s = Signer::load(files[0].to_str().unwrap()).unwrap();
        let v = Verifier::load(&[files[1].to_str().unwrap().to_owned()]).unwrap();
        assert_eq!(v.trusted[0].1.to_bytes(), s.public().unwrap());
        assert!(keygen(&dir, None).is_err(), "never overwrites");
        let files = keygen(&dir, Some("edge")).unwrap();
        assert!(files[1].ends_with("pool-edge.pub"));
        assert!(keygen(&dir, Some("../x")).is_err());
        let first = builtin_keys(&dir).unwrap();
        assert!(
            builtin_keys(&dir).unwrap() == first,
            "created once, then read"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
