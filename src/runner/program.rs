//! What to run: the `Program` shape shared by every path (HTTP, gRPC, Kafka), its validation,
//! and how it turns into an argv, an environment and files in the run's workspace.
//! Everything a user can get wrong is rejected here, before anything is spawned.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgramKind {
    /// `code` run by `/bin/sh` (or bash, with `"shell": "bash"`).
    Shell,
    /// `code` run by `python3`.
    Python,
    /// `argv` run as given, or `code` written as an executable file (shebang) and run.
    Exec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ShellKind {
    #[default]
    Sh,
    Bash,
}

/// A script and how to run it. Unknown fields are refused so a typo is an error, not a silently
/// ignored setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    pub kind: ProgramKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<ShellKind>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Like `env`, but the values are masked in logs and never echoed back by the API.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Working directory relative to the run's workspace (created if missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

impl Program {
    pub fn shell(code: impl Into<String>) -> Program {
        Program::of_kind(ProgramKind::Shell, Some(code.into()), None)
    }
    pub fn python(code: impl Into<String>) -> Program {
        Program::of_kind(ProgramKind::Python, Some(code.into()), None)
    }
    pub fn exec(argv: Vec<String>) -> Program {
        Program::of_kind(ProgramKind::Exec, None, Some(argv))
    }
    fn of_kind(kind: ProgramKind, code: Option<String>, argv: Option<Vec<String>>) -> Program {
        Program {
            kind,
            code,
            argv,
            shell: None,
            args: Vec::new(),
            env: BTreeMap::new(),
            secret_env: BTreeMap::new(),
            stdin: None,
            workdir: None,
        }
    }

    /// Checks everything that can be checked without spawning.
    pub fn validate(&self) -> Result<(), ProgramError> {
        match (self.kind, &self.code, &self.argv) {
            (ProgramKind::Shell | ProgramKind::Python, Some(_), None) => {}
            (ProgramKind::Shell | ProgramKind::Python, _, _) => {
                return Err(ProgramError::new(format!(
                    "program kind {:?} needs \"code\" and takes no \"argv\"",
                    self.kind
                )))
            }
            (ProgramKind::Exec, Some(_), None) => {}
            (ProgramKind::Exec, None, Some(argv)) if !argv.is_empty() && !argv[0].is_empty() => {}
            (ProgramKind::Exec, _, _) => {
                return Err(ProgramError::new(
                    "program kind exec needs either a non-empty \"argv\" or an executable file in \"code\", not both",
                ))
            }
        }
        if self.shell.is_some() && self.kind != ProgramKind::Shell {
            return Err(ProgramError::new(
                "\"shell\" applies to program kind shell only",
            ));
        }
        for (k, v) in self.env.iter().chain(self.secret_env.iter()) {
            validate_env(k, v)?;
        }
        if let Some(k) = self.env.keys().find(|k| self.secret_env.contains_key(*k)) {
            return Err(ProgramError::new(format!(
                "env variable {k} is given both in env and secret_env"
            )));
        }
        for a in self.args.iter().chain(self.argv.iter().flatten()) {
            if a.contains('\0') {
                return Err(ProgramError::new("arguments may not contain NUL bytes"));
            }
        }
        if let Some(w) = &self.workdir {
            relative_inside(w)?;
        }
        Ok(())
    }

    /// Values that must never appear in logs.
    pub fn secret_values(&self) -> impl Iterator<Item = String> + '_ {
        self.secret_env.values().cloned()
    }

    /// A copy safe to show or store in plain view: secret values replaced by the mask.
    pub fn redacted(&self) -> Program {
        let mut p = self.clone();
        for v in p.secret_env.values_mut() {
            *v = "******".into();
        }
        p
    }
}

/// A user error in a program definition; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProgramError(pub String);

impl ProgramError {
    fn new(msg: impl Into<String>) -> Self {
        ProgramError(msg.into())
    }
}

/// Names the runner sets itself; a request may not override them.
pub const RESERVED_ENV: &[&str] = &[
    "ETASK_RESULT_FD",
    "EWORK_RESULT_FD",
    "ETASK_WORKSPACE",
    "ETASK_RUN_TOKEN",
];

pub fn validate_env(name: &str, value: &str) -> Result<(), ProgramError> {
    let mut chars = name.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !ok_first || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ProgramError::new(format!(
            "invalid env variable name {name:?}: use letters, digits and '_', not starting with a digit"
        )));
    }
    if RESERVED_ENV.contains(&name) || name.starts_with("ETASK_") {
        return Err(ProgramError::new(format!(
            "env variable {name} is reserved for ETask"
        )));
    }
    if value.contains('\0') {
        return Err(ProgramError::new(format!(
            "env variable {name} contains a NUL byte"
        )));
    }
    Ok(())
}

fn relative_inside(p: &str) -> Result<PathBuf, ProgramError> {
    let path = Path::new(p);
    if path
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        Ok(path.to_path_buf())
    } else {
        Err(ProgramError::new(format!(
            "workdir {p:?} must be a relative path inside the workspace (no '/' prefix, no '..')"
        )))
    }
}

/// Interpreters used for `shell` and `python` programs.
#[derive(Debug, Clone)]
pub struct Interpreters {
    pub sh: String,
    pub bash: String,
    pub python: String,
}

impl Default for Interpreters {
    fn default() -> Self {
        Interpreters {
            sh: "/bin/sh".into(),
            bash: "bash".into(),
            python: "python3".into(),
        }
    }
}

/// The concrete launch: a file to write (if any), the argv, the working directory.
#[derive(Debug, Clone)]
pub struct Launch {
    pub script: Option<(PathBuf, Vec<u8>, u32)>,
    pub argv: Vec<String>,
    pub cwd: PathBuf,
}

/// Maps a validated program onto a workspace.
pub fn launch(
    p: &Program,
    workspace: &Path,
    interp: &Interpreters,
) -> Result<Launch, ProgramError> {
    let cwd = match &p.workdir {
        Some(w) => workspace.join(relative_inside(w)?),
        None => workspace.to_path_buf(),
    };
    // Hidden in the workspace itself rather than in a directory of its own: one inode less.
    let file = |name: &str| workspace.join(format!(".etask-{name}"));
    let (script, mut argv) = match p.kind {
        ProgramKind::Shell => {
            let path = file("script.sh");
            let sh = match p.shell.clone().unwrap_or_default() {
                ShellKind::Sh => interp.sh.clone(),
                ShellKind::Bash => interp.bash.clone(),
            };
            let argv = vec![sh, path.display().to_string()];
            (Some((path, code_bytes(p), 0o600)), argv)
        }
        ProgramKind::Python => {
            let path = file("script.py");
            let argv = vec![interp.python.clone(), path.display().to_string()];
            (Some((path, code_bytes(p), 0o600)), argv)
        }
        ProgramKind::Exec => match &p.argv {
            Some(argv) => (None, argv.clone()),
            None => {
                let path = file("program");
                let argv = vec![path.display().to_string()];
                (Some((path, code_bytes(p), 0o700)), argv)
            }
        },
    };
    argv.extend(p.args.iter().cloned());
    Ok(Launch { script, argv, cwd })
}

fn code_bytes(p: &Program) -> Vec<u8> {
    p.code.clone().unwrap_or_default().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_are_checked() {
        assert!(validate_env("GOOD_1", "x").is_ok());
        assert!(validate_env("1BAD", "x")
            .unwrap_err()
            .0
            .contains("invalid env variable name"));
        assert!(validate_env("A-B", "x").is_err());
        assert!(validate_env("", "x").is_err());
        assert!(validate_env("ETASK_ATTEMPT", "x")
            .unwrap_err()
            .0
            .contains("reserved"));
        assert!(validate_env("OK", "a\0b").is_err());
    }

    #[test]
    fn program_shapes_are_checked() {
        assert!(Program::shell("echo").validate().is_ok());
        assert!(Program::exec(vec!["true".into()]).validate().is_ok());
        assert!(Program::exec(vec![]).validate().is_err());
        let mut p = Program::shell("x");
        p.argv = Some(vec!["y".into()]);
        assert!(p.validate().is_err());
        let mut p = Program::shell("x");
        p.workdir = Some("../etc".into());
        assert!(p.validate().unwrap_err().0.contains("relative path"));
        let json = r#"{"kind":"shell","code":"x","bogus":1}"#;
        let err = serde_json::from_str::<Program>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `bogus`"), "{err}");
    }

    #[test]
    fn redacted_hides_secret_values() {
        let mut p = Program::shell("x");
        p.secret_env.insert("TOKEN".into(), "s3cr3t".into());
        assert_eq!(p.redacted().secret_env["TOKEN"], "******");
    }
}
