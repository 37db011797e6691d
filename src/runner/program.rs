//! What to run: the `Program` shape shared by every path (HTTP, gRPC, Kafka), its validation,
//! and how it turns into an argv, an environment and files in the run's workspace.
//! Everything a user can get wrong is rejected here, before anything is spawned.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
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

/// A variable as the reference Go ETask passes it: an environment variable of the same name,
/// and an entry of the `ETASK_VARIABLES_FILE` list. `secret` values get `secret_env`'s
/// protection (masked in logs, never shown by the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variable {
    pub key: String,
    pub value: String,
    #[serde(default)]
    pub secret: bool,
}

/// How `params` and `variables` reach the script besides the files and the environment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgvStyle {
    /// The reference v1.12 contract: `ETASK_ARGS_FILE`, `ETASK_VARIABLES_FILE` (and for shell
    /// `ETASK_SHELL_ENV_FILE`); the command line carries only `args`.
    #[default]
    Files,
    /// The ECMDB-era contract (reference <= v0.0.7), positional: shell `$1` = the params JSON,
    /// `$2` = a file of `KEY=VALUE` lines to `source`; Python `sys.argv[1]` = the params JSON,
    /// `sys.argv[2]` = the variables JSON. `args` follow.
    Legacy,
}

impl ArgvStyle {
    fn is_files(&self) -> bool {
        *self == ArgvStyle::Files
    }
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
    /// The reference ETask's parameters: a JSON object, written to `ETASK_ARGS_FILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Map<String, Value>>,
    /// The reference ETask's variables, in the environment and in `ETASK_VARIABLES_FILE`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variables: Vec<Variable>,
    #[serde(default, skip_serializing_if = "ArgvStyle::is_files")]
    pub argv_style: ArgvStyle,
    /// Memory, process and CPU limits of the run (its cgroup); unset ones take the node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

/// Resource limits of one run, enforced through its cgroup (runner/cgroup.rs). A field left
/// unset takes the node's default (`[node] limit_*`). A limit the node cannot enforce is
/// listed in the outcome's `resources.unenforced`, never silently dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory of the whole run (all its processes, page cache included), bytes; no swap
    /// beyond it. Past it the kernel's OOM killer ends a process of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Processes and threads of the run at once; a fork past it fails. Binds root too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// CPU per wall-clock time in thousandths of a CPU (500 = half a CPU, 2000 = two CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millicores: Option<u64>,
}

impl Limits {
    /// These limits, with each unset one taken from `defaults`.
    pub fn or(self, defaults: Limits) -> Limits {
        Limits {
            memory_bytes: self.memory_bytes.or(defaults.memory_bytes),
            pids: self.pids.or(defaults.pids),
            cpu_millicores: self.cpu_millicores.or(defaults.cpu_millicores),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// # Errors
    /// A limit too small for any script to start under it.
    pub fn validate(&self) -> Result<(), ProgramError> {
        if self.memory_bytes.is_some_and(|m| m < 1 << 20) {
            return Err(ProgramError::new(
                "limits.memory_bytes must be at least 1048576 (1 MiB)",
            ));
        }
        // Upper bounds are what the kernel files take (`pids.max` and `memory.max` are signed
        // 64-bit): beyond them every run failed to spawn instead of the request being refused.
        if self.pids.is_some_and(|p| !(1..=4_194_304).contains(&p)) {
            return Err(ProgramError::new(
                "limits.pids must be 1 to 4194304 (the kernel's pid_max limit)",
            ));
        }
        if self.memory_bytes.is_some_and(|m| m > i64::MAX as u64 / 2) {
            return Err(ProgramError::new(
                "limits.memory_bytes must be at most 4611686018427387903",
            ));
        }
        if self
            .cpu_millicores
            .is_some_and(|c| !(10..=1_000_000).contains(&c))
        {
            return Err(ProgramError::new(
                "limits.cpu_millicores must be between 10 (1 % of a CPU) and 1000000",
            ));
        }
        Ok(())
    }
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
            params: None,
            variables: Vec::new(),
            argv_style: ArgvStyle::Files,
            limits: None,
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
        // The kernel refuses an exec whose environment is over ~2 MiB anyway; far fewer and
        // smaller entries are every real script's need, and the bound keeps a node's launchers
        // from being tied up by one request.
        let entries = self.env.len() + self.secret_env.len() + self.variables.len();
        if entries > MAX_ENV_ENTRIES {
            return Err(ProgramError::new(format!(
                "at most {MAX_ENV_ENTRIES} env, secret_env and variables entries in all, not {entries}"
            )));
        }
        let bytes: usize = self
            .env
            .iter()
            .chain(self.secret_env.iter())
            .map(|(k, v)| k.len() + v.len())
            .chain(self.variables.iter().map(|v| v.key.len() + v.value.len()))
            .sum();
        if bytes > MAX_ENV_BYTES {
            return Err(ProgramError::new(format!(
                "env, secret_env and variables hold {bytes} bytes; at most {MAX_ENV_BYTES}"
            )));
        }
        for (k, v) in self.env.iter().chain(self.secret_env.iter()) {
            validate_env(k, v)?;
        }
        if let Some(k) = self.env.keys().find(|k| self.secret_env.contains_key(*k)) {
            return Err(ProgramError::new(format!(
                "env variable {k} is given both in env and secret_env"
            )));
        }
        for v in &self.variables {
            validate_env(&v.key, &v.value)
                .map_err(|e| ProgramError::new(format!("variables: {}", e.0)))?;
            if self.env.contains_key(&v.key) || self.secret_env.contains_key(&v.key) {
                return Err(ProgramError::new(format!(
                    "variable {} is also given in env or secret_env; give it once",
                    v.key
                )));
            }
        }
        if self.argv_style == ArgvStyle::Legacy && self.kind == ProgramKind::Exec {
            return Err(ProgramError::new(
                "argv_style \"legacy\" applies to shell and python programs only",
            ));
        }
        for a in self.args.iter().chain(self.argv.iter().flatten()) {
            if a.contains('\0') {
                return Err(ProgramError::new("arguments may not contain NUL bytes"));
            }
        }
        if let Some(w) = &self.workdir {
            relative_inside(w)?;
        }
        if let Some(l) = &self.limits {
            l.validate()?;
        }
        Ok(())
    }

    /// Values that must never appear in logs: `secret_env` and secret variables.
    pub fn secret_values(&self) -> impl Iterator<Item = String> + '_ {
        let vars = self.variables.iter().filter(|v| v.secret).map(|v| &v.value);
        // A value with a quote is also written quoted into ETASK_SHELL_ENV_FILE: a script that
        // prints that file must not show it in that form either.
        let quoted = self
            .variables
            .iter()
            .filter(|v| v.secret && v.value.contains('\''))
            .map(|v| v.value.replace('\'', "'\\''"));
        self.secret_env.values().chain(vars).cloned().chain(quoted)
    }

    /// A copy safe to show or store in plain view: secret values replaced by the mask.
    pub fn redacted(&self) -> Program {
        let mut p = self.clone();
        for v in p.secret_env.values_mut() {
            *v = "******".into();
        }
        for v in p.variables.iter_mut().filter(|v| v.secret) {
            v.value = "******".into();
        }
        p
    }

    /// The variables as the environment gets them: the last of one name wins, as in the
    /// reference.
    pub fn variable_env(&self) -> impl Iterator<Item = (&str, &str)> {
        // The last of one name wins (as in the reference): one pass with a map, not a search
        // of the rest of the list per variable.
        let last: std::collections::BTreeMap<&str, &str> = self
            .variables
            .iter()
            .map(|v| (v.key.as_str(), v.value.as_str()))
            .collect();
        last.into_iter()
    }
}

/// Most env, secret_env and variables entries of one program, in all.
pub const MAX_ENV_ENTRIES: usize = 1024;
/// Most bytes of names and values of env, secret_env and variables, in all (1 MiB).
pub const MAX_ENV_BYTES: usize = 1 << 20;

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

/// The concrete launch: a file to write (if any), the argv, the working directory, and the
/// input files of the reference contract (mode 0600) with the variables that name them.
#[derive(Debug, Clone)]
pub struct Launch {
    pub script: Option<(PathBuf, Vec<u8>, u32)>,
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    pub inputs: Vec<(PathBuf, Vec<u8>)>,
    pub env: Vec<(String, String)>,
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
    // The reference gives shell and Python scripts their params and variables as files
    // (v1.12), or positionally (legacy); other programs get the files when they have inputs.
    let mut inputs = Vec::new();
    let mut env = Vec::new();
    let scripted = matches!(p.kind, ProgramKind::Shell | ProgramKind::Python);
    if scripted || p.params.is_some() || !p.variables.is_empty() {
        let params = Value::Object(p.params.clone().unwrap_or_default()).to_string();
        let vars = serde_json::to_string(&p.variables)
            .map_err(|e| ProgramError::new(format!("variables: {e}")))?;
        let (args_file, vars_file) = (file("args.json"), file("variables.json"));
        env.push(("ETASK_ARGS_FILE".into(), args_file.display().to_string()));
        env.push((
            "ETASK_VARIABLES_FILE".into(),
            vars_file.display().to_string(),
        ));
        inputs.push((args_file, params.clone().into_bytes()));
        inputs.push((vars_file, vars.clone().into_bytes()));
        let mut positional = Vec::new();
        if p.kind == ProgramKind::Shell {
            let env_file = file("variables.env");
            env.push((
                "ETASK_SHELL_ENV_FILE".into(),
                env_file.display().to_string(),
            ));
            positional = vec![params, env_file.display().to_string()];
            inputs.push((env_file, shell_env_file(p).into_bytes()));
        } else if p.kind == ProgramKind::Python {
            positional = vec![params, vars];
        }
        if p.argv_style == ArgvStyle::Legacy {
            argv.extend(positional);
        }
    }
    argv.extend(p.args.iter().cloned());
    Ok(Launch {
        script,
        argv,
        cwd,
        inputs,
        env,
    })
}

/// `KEY=VALUE` lines a shell can `source`: values quoted only when they need it, so simple
/// values read the same as the reference's unquoted lines and no value can run code.
fn shell_env_file(p: &Program) -> String {
    let safe = |v: &str| {
        !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_./:@%+,-=".contains(&b))
    };
    let mut out = String::new();
    for (k, v) in p.variable_env() {
        if safe(v) {
            out.push_str(&format!("{k}={v}\n"));
        } else {
            out.push_str(&format!("{k}='{}'\n", v.replace('\'', "'\\''")));
        }
    }
    out
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
    fn variables_are_checked_like_env_names() {
        let var = |k: &str| Variable {
            key: k.into(),
            value: "v".into(),
            secret: false,
        };
        let mut p = Program::shell("x");
        p.variables = vec![var("OK_1")];
        assert!(p.validate().is_ok());
        p.variables = vec![var("1BAD")];
        assert!(p.validate().unwrap_err().0.contains("variables: invalid"));
        p.variables = vec![var("ETASK_ARGS_FILE")];
        assert!(p.validate().unwrap_err().0.contains("reserved"));
        p.variables = vec![var("K")];
        p.env.insert("K".into(), "x".into());
        assert!(p.validate().unwrap_err().0.contains("give it once"));
        let mut p = Program::exec(vec!["true".into()]);
        p.argv_style = ArgvStyle::Legacy;
        assert!(p.validate().unwrap_err().0.contains("shell and python"));
        let json = r#"{"kind":"shell","code":"x","params":[1]}"#;
        assert!(serde_json::from_str::<Program>(json).is_err());
    }

    #[test]
    fn legacy_argv_carries_params_and_the_variables_file() {
        let mut p = Program::shell("x");
        p.params = serde_json::from_str(r#"{"a": 1}"#).unwrap();
        p.argv_style = ArgvStyle::Legacy;
        p.variables = vec![Variable {
            key: "S".into(),
            value: "it's $x".into(),
            secret: true,
        }];
        let l = launch(&p, Path::new("/w"), &Interpreters::default()).unwrap();
        assert_eq!(
            l.argv,
            [
                "/bin/sh",
                "/w/.etask-script.sh",
                r#"{"a":1}"#,
                "/w/.etask-variables.env"
            ]
        );
        let env_file = &l
            .inputs
            .iter()
            .find(|(p, _)| p.ends_with(".etask-variables.env"))
            .unwrap()
            .1;
        assert_eq!(String::from_utf8_lossy(env_file), "S='it'\\''s $x'\n");
        assert!(p.secret_values().any(|v| v == "it's $x"));
        assert_eq!(p.redacted().variables[0].value, "******");
    }

    #[test]
    fn redacted_hides_secret_values() {
        let mut p = Program::shell("x");
        p.secret_env.insert("TOKEN".into(), "s3cr3t".into());
        assert_eq!(p.redacted().secret_env["TOKEN"], "******");
    }
}
