//! The `etask` command line: one binary for every role (see `etask --help`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use argh::FromArgs;
use etask::model::ExecutionId;
use etask::runner::{
    Ending, Outcome, Pool, PoolConfig, Program, RunEvent, RunRequest, ShellKind, Stream,
};

#[derive(FromArgs)]
/// ETask: distributed execution of ops scripts (scheduler, executors, agents, local runs).
struct Cli {
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Run(RunCmd),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
/// run one script locally through the process pool, exactly as a node runs it. Trailing
/// arguments are passed to the script; with --exec they are the command line itself
/// (`etask run --exec -- ls -l /`). Exit status: 0 on success, the script's exit code,
/// 124 timed out, 128+N killed by signal N, 127 could not start, 130 interrupted.
struct RunCmd {
    /// shell script file, run with /bin/sh (or bash with --bash)
    #[argh(option)]
    shell: Option<PathBuf>,
    /// run the --shell file with bash instead of /bin/sh
    #[argh(switch)]
    bash: bool,
    /// python script file, run with python3
    #[argh(option)]
    python: Option<PathBuf>,
    /// run the trailing arguments as a command line
    #[argh(switch)]
    exec: bool,
    /// timeout in seconds (fractions allowed); the whole process tree is killed
    #[argh(option)]
    timeout: Option<f64>,
    /// seconds between SIGTERM and SIGKILL when stopping the script (default 5)
    #[argh(option, default = "5.0")]
    grace: f64,
    /// extra environment variable K=V (repeatable)
    #[argh(option)]
    env: Vec<String>,
    /// secret environment variable K=V, masked in the logs (repeatable)
    #[argh(option)]
    secret_env: Vec<String>,
    /// file whose content is fed to the script's stdin
    #[argh(option)]
    stdin: Option<PathBuf>,
    /// print only the outcome as one JSON object (logs are not printed)
    #[argh(switch)]
    json: bool,
    /// script arguments, or the command line with --exec
    #[argh(positional, greedy)]
    args: Vec<String>,
}

fn main() -> ExitCode {
    etask::logging::init(log::LevelFilter::Warn);
    let cli: Cli = argh::from_env();
    let res = match cli.cmd {
        Cmd::Run(c) => cmd_run(c),
    };
    match res {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("etask: {msg}");
            ExitCode::from(2)
        }
    }
}

fn parse_kv(items: &[String], flag: &str) -> Result<Vec<(String, String)>, String> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(format!("{flag} takes K=V, got {kv:?}")),
        })
        .collect()
}

fn read_file(p: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

fn seconds(v: f64, flag: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("{flag} takes a positive number of seconds, got {v}"))
}

fn cmd_run(c: RunCmd) -> Result<ExitCode, String> {
    let chosen = [c.shell.is_some(), c.python.is_some(), c.exec]
        .iter()
        .filter(|b| **b)
        .count();
    if chosen != 1 {
        return Err("give exactly one of --shell FILE, --python FILE or --exec -- ARGV...".into());
    }
    let mut program = if let Some(f) = &c.shell {
        let mut p = Program::shell(read_file(f)?);
        if c.bash {
            p.shell = Some(ShellKind::Bash);
        }
        p.args = c.args.clone();
        p
    } else if let Some(f) = &c.python {
        let mut p = Program::python(read_file(f)?);
        p.args = c.args.clone();
        p
    } else {
        if c.args.is_empty() {
            return Err("--exec needs a command line after --".into());
        }
        Program::exec(c.args.clone())
    };
    program.env = parse_kv(&c.env, "--env")?.into_iter().collect();
    program.secret_env = parse_kv(&c.secret_env, "--secret-env")?
        .into_iter()
        .collect();
    if let Some(f) = &c.stdin {
        program.stdin = Some(read_file(f)?);
    }
    program.validate().map_err(|e| e.to_string())?;

    let signals =
        etask::signals::termination().map_err(|e| format!("cannot set up signal handling: {e}"))?;
    let cfg = PoolConfig {
        max_concurrent: 1,
        queue_capacity: 1,
        kill_grace: seconds(c.grace, "--grace")?,
        ..PoolConfig::default()
    };
    let pool = Pool::start(cfg).map_err(|e| format!("cannot start the process pool: {e}"))?;
    let mut req = RunRequest::new(ExecutionId(0), program);
    req.timeout = c.timeout.map(|t| seconds(t, "--timeout")).transpose()?;
    let key = req.key();
    let (tx, rx) = crossbeam_channel::bounded(256);
    pool.submit(req, tx).map_err(|e| e.to_string())?;
    let outcome = loop {
        crossbeam_channel::select! {
            recv(rx) -> ev => match ev {
                Ok(RunEvent::Log { chunk, .. }) if !c.json => print_chunk(chunk.stream, &chunk.data),
                Ok(RunEvent::Finished { outcome, .. }) => break outcome,
                Ok(_) => {}
                Err(_) => return Err("the process pool stopped unexpectedly".into()),
            },
            recv(signals) -> _ => pool.cancel(key),
        }
    };
    pool.shutdown();
    if c.json {
        println!("{}", outcome.to_json());
    } else {
        print_summary(&outcome);
    }
    Ok(exit_code(&outcome))
}

fn print_chunk(stream: Stream, data: &str) {
    use std::io::Write;
    match stream {
        Stream::Stdout => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data.as_bytes());
            let _ = out.flush();
        }
        Stream::Stderr => {
            let mut err = std::io::stderr().lock();
            for line in data.split_inclusive('\n') {
                let _ = write!(err, "[stderr] {line}");
            }
            if !data.ends_with('\n') {
                let _ = writeln!(err);
            }
        }
    }
}

fn print_summary(o: &Outcome) {
    let how = match &o.ending {
        Ending::Exited(c) => format!("exit code {c}"),
        Ending::Signaled(s) => format!("killed by signal {s}"),
        Ending::TimedOut => "timed out".into(),
        Ending::Cancelled => "cancelled".into(),
        Ending::SpawnFailed(r) => format!("could not start: {r}"),
    };
    eprintln!(
        "== {} ({how}) in {} ms, {} log bytes{}",
        o.status(),
        o.duration.as_millis(),
        o.log_bytes,
        if o.log_truncated { " (truncated)" } else { "" }
    );
    if let Some(r) = &o.result {
        eprintln!("== result: {}", serde_json::Value::Object(r.clone()));
    }
    if let Some(e) = &o.result_error {
        eprintln!("== result_error: {e}");
    }
}

fn exit_code(o: &Outcome) -> ExitCode {
    let code = match &o.ending {
        Ending::Exited(c) => *c,
        Ending::Signaled(s) => 128 + s,
        Ending::TimedOut => 124,
        Ending::Cancelled => 130,
        Ending::SpawnFailed(_) => 127,
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
