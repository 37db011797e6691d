//! The `etask` command line: one binary for every role (see `etask --help`). Flags are parsed
//! by argh; every failure becomes one `Fail` whose exit status follows one scheme across all
//! subcommands (README "Exit status", and `--help`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use argh::FromArgs;
use etask::client::ClientError;
use etask::model::{DeliveryPath, ExecutionId};
use etask::runner::{
    Ending, Outcome, Pool, PoolConfig, Program, RunEvent, RunRequest, ShellKind, Stream,
};

/// ETask's own exit statuses, the sysexits(3) codes: a script can exit with 64-78 too, so
/// `run` and `submit --wait` report such a script code as 1 (and print the real one), and a
/// caller can always tell ETask's failures from the script's.
mod exit {
    /// Bad command line: unknown, missing or conflicting options, or a bad value.
    pub const USAGE: u8 = 64;
    /// The scheduler refused the request as invalid (HTTP 400, 405, 409, 413).
    pub const DATAERR: u8 = 65;
    /// A file named on the command line cannot be read, or no such task or execution (404).
    pub const NOINPUT: u8 = 66;
    /// The scheduler (or, for `server` and `migrate`, the store, broker, etcd or a listen
    /// address) is unavailable.
    pub const UNAVAILABLE: u8 = 69;
    /// An answer ETask does not understand, or a bug.
    pub const SOFTWARE: u8 = 70;
    /// The local system refused something: signal handling, threads.
    pub const OSERR: u8 = 71;
    /// Missing or wrong token (HTTP 401).
    pub const NOPERM: u8 = 77;
    /// The configuration is invalid.
    pub const CONFIG: u8 = 78;
    /// The first and last of the reserved codes.
    pub const RESERVED: std::ops::RangeInclusive<i64> = 64..=78;
}

/// Declares a subcommand with the exit statuses every command shares in its `--help` (the
/// same text as README "Exit status"; a test keeps them in step).
macro_rules! command {
    ($(#[$m:meta])* struct $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[argh(
            error_code(64, "bad command line: unknown, missing or conflicting options, or a bad value"),
            error_code(65, "the scheduler refused the request as invalid (HTTP 400, 405, 409, 413)"),
            error_code(66, "a file named on the command line cannot be read, or no such task or execution"),
            error_code(69, "unavailable: the scheduler, or the store, broker, etcd or a listen address"),
            error_code(70, "internal error: an answer etask does not understand, or a bug"),
            error_code(71, "the local system refused: signal handling, threads, output that cannot be written"),
            error_code(77, "missing or wrong token (HTTP 401)"),
            error_code(78, "invalid configuration"),
            error_code(141, "the reader of the output went away (e.g. `head` closed it), as SIGPIPE ends any writer: `run` cancels its script first; `logs -f` and `submit --wait` just stop following (the execution goes on)"),
        )]
        struct $name { $($body)* }
    };
}

command! {
#[derive(FromArgs)]
/// ETask: distributed execution of ops scripts (scheduler, executors, agents, local runs).
/// `etask --version` prints the version and the git commit it was built from.
#[argh(
    note = "Exit status 0 is success. run and submit --wait exit like the script: its own code,",
    note = "124 timed out, 127 could not start, 128+N killed by signal N, 130 cancelled or",
    note = "interrupted; a script code in 64-78 is reported as 1 (the real one is printed).",
    note = "The codes below are etask's own, the same in every command."
)]
struct Cli {
    #[argh(subcommand)]
    cmd: Cmd,
}
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Run(RunCmd),
    Server(ServerCmd),
    Migrate(MigrateCmd),
    Config(ConfigCmd),
    Submit(SubmitCmd),
    Get(GetCmd),
    Logs(LogsCmd),
    Cancel(CancelCmd),
    Tasks(TasksCmd),
    Nodes(NodesCmd),
    Keygen(KeygenCmd),
}

command! {
#[derive(FromArgs)]
#[argh(subcommand, name = "keygen")]
/// make a key pair: the scheduler's dispatch signing pair (dispatch.key 0600, dispatch.pub
/// 0644; Ed25519), or with --pool a pool's sealing pair (pool-NAME.key, pool-NAME.pub; X25519).
/// Existing files are never overwritten.
struct KeygenCmd {
    /// directory to write the two files to (created if missing)
    #[argh(option)]
    out: PathBuf,
    /// make the sealing key pair of this pool instead
    #[argh(option)]
    pool: Option<String>,
}
}

command! {
#[derive(FromArgs)]
#[argh(subcommand, name = "nodes")]
/// list the live nodes the scheduler knows (from etcd, or its built-in node).
struct NodesCmd {
    /// scheduler URL (default $ETASK_SERVER or http://127.0.0.1:8765)
    #[argh(option)]
    server: Option<String>,
}
}

command! {
#[derive(FromArgs)]
#[argh(subcommand, name = "server")]
/// run a server role: scheduler (HTTP + gRPC intake, store, routing, retries, callbacks), all
/// (scheduler with a built-in node; needs no external service), executor (gRPC node, push or
/// pull), agent (Kafka consumer; opens no port).
struct ServerCmd {
    /// scheduler | agent | executor | all
    #[argh(option)]
    mode: etask::server::Mode,
    /// TOML config file (see `etask config --print-default`)
    #[argh(option)]
    config: Option<PathBuf>,
    /// HTTP listen address (default 127.0.0.1:8765; port 0 picks a free one)
    #[argh(option)]
    listen: Option<String>,
    /// data directory for the embedded store and workspaces (default ./etask-data)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// store URL: sqlite:PATH or mysql://user:pass@host:port/db
    #[argh(option)]
    store: Option<String>,
    /// gRPC listen address (scheduler default 127.0.0.1:9090, executor 127.0.0.1:9091)
    #[argh(option)]
    grpc_listen: Option<String>,
    /// etcd URL of the node registry, e.g. http://127.0.0.1:2379
    #[argh(option)]
    etcd: Option<String>,
    /// executor: the scheduler's gRPC URL, e.g. http://10.0.0.5:9090
    #[argh(option)]
    scheduler: Option<String>,
    /// executor/agent: the pool it serves (default "default")
    #[argh(option)]
    pool: Option<String>,
    /// kafka bootstrap brokers HOST:PORT[,HOST:PORT] (scheduler: enables the agent path)
    #[argh(option)]
    kafka: Option<String>,
    /// executor: push (the scheduler calls it) or pull (it long-polls the scheduler)
    #[argh(option)]
    path: Option<String>,
    /// executor/agent: node id (default <hostname>-<pid>)
    #[argh(option)]
    node_id: Option<String>,
    /// scripts run at once on this node (default 64)
    #[argh(option)]
    max_concurrent: Option<usize>,
    /// where nodes create the scripts' private workspaces (default <data-dir>/work); the
    /// packaged units put them on tmpfs under /run/etask
    #[argh(option)]
    workspace_root: Option<String>,
}
}

command! {
#[derive(FromArgs)]
#[argh(subcommand, name = "migrate")]
/// apply the schema migrations (sql/) to a store; safe to run while schedulers start.
struct MigrateCmd {
    /// store URL: sqlite:PATH or mysql://user:pass@host:port/db
    #[argh(option)]
    store: String,
}
}

command! {
#[derive(FromArgs)]
#[argh(subcommand, name = "config")]
/// print the commented default configuration, or check a config file exactly as `etask server`
/// checks it before it starts (with $ETASK_TOKEN, and relative paths against this directory).
struct ConfigCmd {
    /// print the default config file with every key documented
    #[argh(switch)]
    print_default: bool,
    /// check this file; exit 0 and print "ok" when the server would start with it
    #[argh(option)]
    check: Option<PathBuf>,
    /// with --check: also what this mode needs (executor: a registry; agent: Kafka)
    #[argh(option)]
    mode: Option<etask::server::Mode>,
}
}

command! {
#[derive(FromArgs)]
#[argh(subcommand, name = "submit")]
/// submit a script as a task (runs once now, or on --cron); --wait follows it to the end and
/// exits like `etask run`.
#[argh(
    note = "Exit status with --wait: 0 succeeded; the script's own exit code when it failed (a",
    note = "code in 64-78 is reported as 1, the real one is printed; 1 also when it ended",
    note = "without one, e.g. its node was lost); 124 timed out; 127 could not start; 128+N",
    note = "killed by signal N; 130 cancelled. The codes below are etask's own."
)]
struct SubmitCmd {
    /// shell script file
    #[argh(option)]
    shell: Option<PathBuf>,
    /// python script file
    #[argh(option)]
    python: Option<PathBuf>,
    /// task name (default: the file name)
    #[argh(option)]
    name: Option<String>,
    /// cron expression with seconds first, e.g. "0 */5 * * * *"
    #[argh(option)]
    cron: Option<String>,
    /// IANA time zone of --cron, e.g. Asia/Shanghai (default: the scheduler's)
    #[argh(option)]
    timezone: Option<String>,
    /// what a --cron fire does while the previous run has not ended: forbid (default),
    /// allow, queue or replace
    #[argh(option)]
    overlap: Option<String>,
    /// timeout in seconds
    #[argh(option)]
    timeout: Option<f64>,
    /// attempts in all (retry on failure, timeout, node loss)
    #[argh(option)]
    max_attempts: Option<u32>,
    /// extra environment variable K=V (repeatable)
    #[argh(option)]
    env: Vec<String>,
    /// idempotency key: the same key returns the first submission's ids
    #[argh(option)]
    request_id: Option<String>,
    /// where it runs: local (the built-in node of --mode all, the default), push, pull or agent
    #[argh(option)]
    path: Option<String>,
    /// the node pool of --path push, pull or agent (default "default")
    #[argh(option)]
    pool: Option<String>,
    /// print logs live and the final result; exit status mirrors the outcome; Ctrl-C cancels
    /// the execution
    #[argh(switch)]
    wait: bool,
    /// scheduler URL (default $ETASK_SERVER or http://127.0.0.1:8765)
    #[argh(option)]
    server: Option<String>,
    /// script arguments
    #[argh(positional, greedy)]
    args: Vec<String>,
}
}

command! {
#[derive(FromArgs)]
#[argh(subcommand, name = "get")]
/// show an execution as JSON.
struct GetCmd {
    #[argh(positional)]
    id: i64,
    /// scheduler URL (default $ETASK_SERVER or http://127.0.0.1:8765)
    #[argh(option)]
    server: Option<String>,
}
}

command! {
#[derive(FromArgs)]
#[argh(subcommand, name = "logs")]
/// print an execution's logs; -f follows them until it ends.
struct LogsCmd {
    #[argh(positional)]
    id: i64,
    /// follow until the execution ends
    #[argh(switch, short = 'f')]
    follow: bool,
    /// scheduler URL (default $ETASK_SERVER or http://127.0.0.1:8765)
    #[argh(option)]
    server: Option<String>,
}
}

command! {
#[derive(FromArgs)]
#[argh(subcommand, name = "cancel")]
/// cancel an execution (its whole process tree is stopped).
struct CancelCmd {
    #[argh(positional)]
    id: i64,
    /// scheduler URL (default $ETASK_SERVER or http://127.0.0.1:8765)
    #[argh(option)]
    server: Option<String>,
}
}

command! {
#[derive(FromArgs)]
#[argh(subcommand, name = "tasks")]
/// list tasks, newest first.
struct TasksCmd {
    /// only tasks with this name
    #[argh(option)]
    name: Option<String>,
    /// how many (default 50)
    #[argh(option, default = "50")]
    limit: u32,
    /// scheduler URL (default $ETASK_SERVER or http://127.0.0.1:8765)
    #[argh(option)]
    server: Option<String>,
}
}

command! {
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
/// run one script locally through the process pool, exactly as a node runs it. Trailing
/// arguments are passed to the script; with --exec they are the command line itself
/// (`etask run --exec -- ls -l /`).
#[argh(
    note = "Exit status: 0 succeeded; the script's own exit code when it failed (a code in",
    note = "64-78 is reported as 1, the real one is printed); 124 timed out; 127 could not",
    note = "start; 128+N killed by signal N; 130 interrupted. The codes below are etask's own."
)]
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
}

fn main() -> ExitCode {
    // argh has no version flag of its own; `etask --version` is answered before parsing.
    if std::env::args().nth(1).as_deref() == Some("--version") {
        return print_or_fail(&format!("etask {}", etask::VERSION));
    }
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    // Daemons log their events; one-shot commands only what went wrong.
    let level = if matches!(cli.cmd, Cmd::Server(_)) {
        log::LevelFilter::Info
    } else {
        log::LevelFilter::Warn
    };
    etask::logging::init(level);
    // Client commands end quietly when their reader goes away (`etask tasks | head`), like
    // every Unix filter, instead of panicking in println!. Not `server` and `run`: they write
    // to sockets and to scripts' pipes, where a closed reader is an error to handle.
    if !matches!(cli.cmd, Cmd::Server(_) | Cmd::Run(_)) {
        // SAFETY: resetting a signal disposition before any thread of ours runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        // Output that cannot be written (a full disk, `>/dev/full`) is the OS's failure
        // (exit 71), said in one line, not a panic with a backtrace (exit 101).
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if msg.starts_with("failed printing to std") {
                eprintln!("etask: cannot write the output: {msg}");
                std::process::exit(i32::from(exit::OSERR));
            }
            default_hook(info);
        }));
    }
    let res = match cli.cmd {
        Cmd::Run(c) => cmd_run(c),
        Cmd::Server(c) => cmd_server(c),
        Cmd::Migrate(c) => cmd_migrate(c),
        Cmd::Config(c) => cmd_config(c),
        Cmd::Submit(c) => cmd_submit(c),
        Cmd::Get(c) => client(&c.server).and_then(|cl| {
            cl.get(&format!("/api/v1/executions/{}", c.id))
                .map(print_json)
                .map_err(Fail::from)
        }),
        Cmd::Logs(c) => cmd_logs(c),
        Cmd::Cancel(c) => client(&c.server).and_then(|cl| {
            cl.post(
                &format!("/api/v1/executions/{}/cancel", c.id),
                &serde_json::json!({}),
            )
            .map(print_json)
            .map_err(Fail::from)
        }),
        Cmd::Tasks(c) => cmd_tasks(c),
        Cmd::Nodes(c) => cmd_nodes(c),
        Cmd::Keygen(c) => cmd_keygen(c),
    };
    // Every line logged so far is written before the process ends (the logger's own thread
    // writes them) and before the failure's own line.
    log::logger().flush();
    match res {
        Ok(code) => code,
        Err(f) => {
            // The exit status carries the failure even when stderr is gone.
            use std::io::Write;
            if !f.msg.is_empty() {
                let _ = writeln!(std::io::stderr(), "etask: {}", f.msg);
            }
            ExitCode::from(f.code)
        }
    }
}

/// Parses the command line like `argh::from_env`, but a bad command line exits with the usage
/// status (argh's own exits 1, which a script's failure could mean too).
fn parse_args() -> Result<Cli, ExitCode> {
    let mut args = Vec::new();
    for a in std::env::args_os() {
        match a.into_string() {
            Ok(a) => args.push(a),
            Err(a) => {
                eprintln!("etask: argument {a:?} is not valid UTF-8");
                return Err(ExitCode::from(exit::USAGE));
            }
        }
    }
    let name = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("etask")
        .to_owned();
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    match Cli::from_args(&[&name], &rest) {
        Ok(cli) => Ok(cli),
        Err(argh::EarlyExit { output, status }) => match status {
            // --help
            Ok(()) => Err(print_or_fail(&output)),
            Err(()) => {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "{output}\nRun {name} --help for more information."
                );
                Err(ExitCode::from(exit::USAGE))
            }
        },
    }
}

/// Prints `text` and a newline (`--help`, `--version`): 0, or 71 with the reason when stdout
/// cannot take it (`>/dev/full`), where `println!` would panic (101).
fn print_or_fail(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "etask: cannot write the output: {e}");
            ExitCode::from(exit::OSERR)
        }
    }
}

/// Why a command failed: its exit status (see `exit`) and one line for the user.
#[derive(Debug)]
struct Fail {
    code: u8,
    msg: String,
}

impl Fail {
    fn new(code: u8, msg: impl Into<String>) -> Fail {
        Fail {
            code,
            msg: msg.into(),
        }
    }
    fn usage(msg: impl Into<String>) -> Fail {
        Fail::new(exit::USAGE, msg)
    }
}

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Fail {
        let code = match &e {
            ClientError::Api { status, .. } => match status {
                401 | 403 => exit::NOPERM,
                404 => exit::NOINPUT,
                400 | 405 | 409 | 413 | 422 => exit::DATAERR,
                502..=504 => exit::UNAVAILABLE,
                _ => exit::SOFTWARE,
            },
            ClientError::Unreachable(_) => exit::UNAVAILABLE,
            _ => exit::SOFTWARE,
        };
        Fail::new(code, e.to_string())
    }
}

type CmdResult = Result<ExitCode, Fail>;

fn parse_kv(items: &[String], flag: &str) -> Result<Vec<(String, String)>, Fail> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(Fail::usage(format!("{flag} takes K=V, got {kv:?}"))),
        })
        .collect()
}

/// The most of a script `--shell`/`--python` reads: far above what a scheduler takes in one
/// request (8 MiB by default), so the scheduler's 413 stays the limit that matters; the bound
/// only keeps `--shell /dev/zero` from filling the memory.
const MAX_SCRIPT_BYTES: u64 = 64 << 20;

fn read_file(p: &Path) -> Result<String, Fail> {
    etask::read_bounded_text(p, MAX_SCRIPT_BYTES, false)
        .map_err(|e| Fail::new(exit::NOINPUT, format!("cannot read {}: {e}", p.display())))
}

/// A duration flag: 0 to ten years (a deadline is `Instant + Duration`; 1e19 s overflowed it
/// and panicked the run's reactor).
fn seconds(v: f64, flag: &str) -> Result<Duration, Fail> {
    const TEN_YEARS: f64 = 10.0 * 365.0 * 86_400.0;
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|_| v <= TEN_YEARS)
        .ok_or_else(|| {
            Fail::usage(format!(
                "{flag} takes a number of seconds from 0 to {TEN_YEARS} (ten years), got {v}"
            ))
        })
}

/// The exit status of a script that ended with `code`: its own, unless that is one of ETask's
/// reserved statuses (then 1, and the caller prints the real code).
fn script_code(code: i64) -> u8 {
    if exit::RESERVED.contains(&code) {
        1
    } else {
        code.clamp(1, 255) as u8
    }
}

fn cmd_run(c: RunCmd) -> CmdResult {
    let chosen = [c.shell.is_some(), c.python.is_some(), c.exec]
        .iter()
        .filter(|b| **b)
        .count();
    if chosen != 1 {
        return Err(Fail::usage(
            "give exactly one of --shell FILE, --python FILE or --exec -- ARGV...",
        ));
    }
    if c.bash && c.shell.is_none() {
        return Err(Fail::usage("--bash goes with --shell FILE"));
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
            return Err(Fail::usage("--exec needs a command line after --"));
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
    program.validate().map_err(|e| Fail::usage(e.to_string()))?;
    let kill_grace = seconds(c.grace, "--grace")?;
    let timeout = match c.timeout.map(|t| seconds(t, "--timeout")).transpose()? {
        Some(t) if t.is_zero() => return Err(Fail::usage("--timeout must be more than 0")),
        t => t,
    };

    let signals = etask::signals::termination()
        .map_err(|e| Fail::new(exit::OSERR, format!("cannot set up signal handling: {e}")))?;
    let cfg = PoolConfig {
        max_concurrent: 1,
        queue_capacity: 1,
        kill_grace,
        ..PoolConfig::default()
    };
    // The pool exists only for this script: if it cannot start (e.g. the workspace root
    // cannot be created), the script could not start.
    let pool = Pool::start(cfg).map_err(|e| {
        Fail::new(
            SPAWN_FAILED,
            format!("could not start: cannot start the process pool: {e}"),
        )
    })?;
    let mut req = RunRequest::new(ExecutionId(0), program);
    req.timeout = timeout;
    let key = req.key();
    let (tx, rx) = crossbeam_channel::bounded(256);
    pool.submit(req, tx)
        .map_err(|e| Fail::new(SPAWN_FAILED, format!("could not start: {e}")))?;
    // Output that cannot be written ends the run like a pipeline's writer: the script is
    // cancelled (an endless one would otherwise run forever behind `| head`), and `run`
    // exits 141 for a reader that has gone (as SIGPIPE would; `run` keeps SIGPIPE ignored
    // because it writes to scripts' pipes) or 71 for any other failure (`>/dev/full`).
    let mut lost_output: Option<std::io::Error> = None;
    let outcome = loop {
        crossbeam_channel::select! {
            recv(rx) -> ev => match ev {
                Ok(RunEvent::Log { chunk, .. }) if !c.json && lost_output.is_none() => {
                    if let Err(e) = print_chunk(chunk.stream, &chunk.data) {
                        pool.cancel(key);
                        lost_output = Some(e);
                    }
                }
                Ok(RunEvent::Finished { outcome, .. }) => break outcome,
                Ok(_) => {}
                Err(_) => return Err(Fail::new(exit::SOFTWARE, "the process pool stopped unexpectedly")),
            },
            recv(signals) -> _ => pool.cancel(key),
            default(READER_CHECK) => {
                if lost_output.is_none() && stdout_reader_gone() {
                    pool.cancel(key);
                    lost_output = Some(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
                }
            }
        }
    };
    pool.shutdown();
    if lost_output.is_none() {
        use std::io::Write;
        let written = if c.json {
            writeln!(std::io::stdout(), "{}", outcome.to_json())
                .and_then(|()| std::io::stdout().flush())
        } else {
            print_summary(&outcome);
            Ok(())
        };
        lost_output = written.err();
    }
    match lost_output {
        None => Ok(exit_code(&outcome)),
        Some(e) => Err(output_failure(&e)),
    }
}

/// The failure of a command whose output could not be written: 141 without a word when the
/// reader has gone (what SIGPIPE makes of a shell pipeline's writer), else 71 and the reason.
fn output_failure(e: &std::io::Error) -> Fail {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Fail::new(128 + libc::SIGPIPE as u8, String::new())
    } else {
        Fail::new(exit::OSERR, format!("cannot write the output: {e}"))
    }
}

/// Script outcomes that are not the script's own exit code (the shell's conventions).
const TIMED_OUT: u8 = 124;
const SPAWN_FAILED: u8 = 127;
const CANCELLED: u8 = 130;

/// Writes a script's output chunk: stdout as it is, stderr lines marked `[stderr] `.
///
/// # Errors
/// The write's own: a reader that has gone (`BrokenPipe`), a full disk.
fn print_chunk(stream: Stream, data: &str) -> std::io::Result<()> {
    use std::io::Write;
    match stream {
        Stream::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(data.as_bytes())?;
            out.flush()
        }
        Stream::Stderr => {
            let mut err = std::io::stderr().lock();
            for line in data.split_inclusive('\n') {
                write!(err, "[stderr] {line}")?;
            }
            if !data.ends_with('\n') {
                writeln!(err)?;
            }
            Ok(())
        }
    }
}

fn print_summary(o: &Outcome) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let how = &o.ending;
    let _ = writeln!(
        err,
        "== {} ({how}) in {} ms, {} log bytes{}",
        o.status(),
        o.duration.as_millis(),
        o.log_bytes,
        if o.log_truncated { " (truncated)" } else { "" }
    );
    if let Some(r) = &o.result {
        let _ = writeln!(err, "== result: {}", serde_json::Value::Object(r.clone()));
    }
    if let Some(e) = &o.result_error {
        let _ = writeln!(err, "== result_error: {e}");
    }
}

fn exit_code(o: &Outcome) -> ExitCode {
    ExitCode::from(match &o.ending {
        Ending::Exited(0) => 0,
        Ending::Exited(c) => script_code(i64::from(*c)),
        Ending::Signaled(s) => (128 + s).clamp(129, 255) as u8,
        Ending::TimedOut => TIMED_OUT,
        Ending::Cancelled => CANCELLED,
        Ending::SpawnFailed(_) => SPAWN_FAILED,
    })
}

fn print_json(v: serde_json::Value) -> ExitCode {
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    ExitCode::SUCCESS
}

/// The client of the scheduler at `--server`, `$ETASK_SERVER` or the default. A value that
/// is not a scheduler's base URL (`http://` or `https://`, a host, no path) is a bad command
/// line (64), found before anything is sent: it used to be tried and reported as an
/// unreachable scheduler (69), or sent below a path and answered 400.
fn client(server: &Option<String>) -> Result<etask::client::Client, Fail> {
    let (base, from) = match (server, std::env::var("ETASK_SERVER").ok()) {
        (Some(s), _) => (s.clone(), "--server"),
        (None, Some(s)) => (s, "$ETASK_SERVER"),
        (None, None) => ("http://127.0.0.1:8765".to_owned(), "the default server"),
    };
    let bad = |why: &str| {
        Fail::usage(format!(
            "{from} {base:?} {why}: give the scheduler's base URL, e.g. http://127.0.0.1:8765"
        ))
    };
    let u = url::Url::parse(&base).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if !u.username().is_empty() || u.password().is_some() {
        // Credentials in a URL end up in messages and process lists: the token is the way.
        return Err(Fail::usage(format!(
            "{from} carries a user or password: give the token in $ETASK_TOKEN instead"
        )));
    }
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(bad("is not an http:// or https:// URL with a host"));
    }
    if !u.path().trim_end_matches('/').is_empty() || u.query().is_some() || u.fragment().is_some() {
        return Err(bad("has a path, query or fragment"));
    }
    let token = std::env::var("ETASK_TOKEN").ok();
    if token
        .as_deref()
        .is_some_and(|t| !t.chars().all(|c| c.is_ascii_graphic()))
    {
        // Never echoed: it is a secret, and it may hold control characters.
        return Err(Fail::usage(
            "$ETASK_TOKEN holds characters a header cannot carry (only visible ASCII, no \
             spaces): it could never match",
        ));
    }
    Ok(etask::client::Client::new(&base, token))
}

/// The configuration of `etask server` (and of `config --check`: the same function).
fn server_config(
    mode: Option<etask::server::Mode>,
    file: Option<&Path>,
    flags: &etask::config::Overrides,
) -> Result<etask::config::Config, Fail> {
    use etask::config::{Config, ConfigError};
    let cwd = std::env::current_dir().map_err(|e| {
        Fail::new(
            exit::OSERR,
            format!("cannot read the current directory: {e}"),
        )
    })?;
    let token = std::env::var("ETASK_TOKEN").ok();
    Config::for_server(mode, file, flags, token, &cwd).map_err(|e| match e {
        ConfigError::Unreadable(m) => Fail::new(exit::NOINPUT, m),
        e => Fail::new(exit::CONFIG, e.to_string()),
    })
}

fn cmd_server(c: ServerCmd) -> CmdResult {
    let flags = etask::config::Overrides {
        listen: c.listen,
        data_dir: c.data_dir,
        store: c.store,
        grpc_listen: c.grpc_listen,
        etcd: c.etcd,
        scheduler: c.scheduler,
        pool: c.pool,
        kafka: c.kafka,
        path: c.path,
        node_id: c.node_id,
        max_concurrent: c.max_concurrent,
        workspace_root: c.workspace_root,
    };
    let cfg = server_config(Some(c.mode), c.config.as_deref(), &flags)?;
    // Nothing of the node for scripts to read: the token and the Kafka password (both read
    // into `cfg` above) leave the environment (still single-threaded here, so removing a
    // variable is safe), and the process is not dumpable, so a script of the same uid cannot
    // read /proc/<node>/environ or memory, nor ptrace it.
    etask::signals::scrub_env("ETASK_TOKEN");
    etask::signals::scrub_env("ETASK_KAFKA_SASL_PASSWORD");
    etask::signals::not_dumpable();
    // Block the termination signals before any thread starts, so every thread inherits it.
    let stop = etask::signals::termination()
        .map_err(|e| Fail::new(exit::OSERR, format!("cannot set up signal handling: {e}")))?;
    // Everything was validated above: what fails now is a store, broker, etcd or address that
    // is not there.
    etask::server::run(c.mode, cfg, stop).map_err(|m| Fail::new(exit::UNAVAILABLE, m))?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_migrate(c: MigrateCmd) -> CmdResult {
    use etask::store::{Store, StoreError};
    let fail = |e: StoreError| {
        let code = match e {
            StoreError::BadUrl(_) => exit::USAGE,
            StoreError::Unavailable(_) | StoreError::Retry(_) => exit::UNAVAILABLE,
            _ => exit::SOFTWARE,
        };
        Fail::new(code, e.to_string())
    };
    let created = etask::store::create_database(&c.store).map_err(fail)?;
    let store = etask::store::open(&c.store).map_err(fail)?;
    if created {
        println!("{}: database created", store.describe());
    }
    let applied = store.migrate().map_err(fail)?;
    if applied.is_empty() {
        println!("{}: schema up to date", store.describe());
    } else {
        let list: Vec<String> = applied.iter().map(u32::to_string).collect();
        println!(
            "{}: applied migrations {}",
            store.describe(),
            list.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_keygen(c: KeygenCmd) -> CmdResult {
    use etask::trust::keys::KeyError;
    let files = etask::trust::keygen(&c.out, c.pool.as_deref()).map_err(|e| match e {
        KeyError::Format(m) => Fail::usage(m),
        e => Fail::new(exit::NOINPUT, e.to_string()),
    })?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_config(c: ConfigCmd) -> CmdResult {
    match (c.print_default, c.check) {
        (true, None) if c.mode.is_none() => {
            print!("{}", *etask::config::DEFAULT_TOML);
            Ok(ExitCode::SUCCESS)
        }
        (false, Some(p)) => {
            server_config(c.mode, Some(&p), &etask::config::Overrides::default())?;
            println!("{}: ok", p.display());
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(Fail::usage(
            "use --print-default, or --check FILE [--mode MODE]",
        )),
    }
}

fn cmd_submit(c: SubmitCmd) -> CmdResult {
    use serde_json::json;
    // Everything that can be refused locally is refused before the task is created: a retry
    // of a refused command must not leave tasks behind.
    let (kind, file) = match (&c.shell, &c.python) {
        (Some(f), None) => ("shell", f),
        (None, Some(f)) => ("python", f),
        _ => {
            return Err(Fail::usage(
                "give exactly one of --shell FILE or --python FILE",
            ))
        }
    };
    if c.wait && c.cron.is_some() {
        return Err(Fail::usage(
            "--wait follows a task that runs now; a --cron task runs later (drop --wait, then \
             follow its executions with `etask logs ID -f`)",
        ));
    }
    if let Some(t) = c.timeout {
        // NaN is refused too.
        if t.is_nan() || t <= 0.0 {
            return Err(Fail::usage(format!(
                "--timeout takes a positive number of seconds, got {t}"
            )));
        }
    }
    let max = etask::scheduler::api::MAX_ATTEMPTS;
    if let Some(n) = c.max_attempts.filter(|n| !(1..=max).contains(n)) {
        return Err(Fail::usage(format!(
            "--max-attempts must be 1 to {max}, not {n}"
        )));
    }
    if let Some(o) = &c.overlap {
        o.parse::<etask::model::Overlap>()
            .map_err(|e| Fail::usage(format!("--overlap: {e}")))?;
    }
    let path = match c.path.as_deref() {
        None => DeliveryPath::Local,
        Some(p) => DeliveryPath::from_name(p).ok_or_else(|| {
            Fail::usage(format!(
                "--path takes local, push, pull or agent, not {p:?}"
            ))
        })?,
    };
    if path == DeliveryPath::Local && c.pool.is_some() {
        return Err(Fail::usage("--pool goes with --path push, pull or agent"));
    }
    let name = c.name.clone().unwrap_or_else(|| {
        file.file_name()
            .map_or("task".into(), |n| n.to_string_lossy().into_owned())
    });
    let env: serde_json::Map<String, serde_json::Value> = parse_kv(&c.env, "--env")?
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect();
    let mut body = json!({
        "name": name,
        "program": {"kind": kind, "code": read_file(file)?, "args": c.args, "env": env},
    });
    if let Some(e) = &c.cron {
        body["schedule"] = json!({"kind": "cron", "expr": e});
        if let Some(z) = &c.timezone {
            body["schedule"]["timezone"] = json!(z);
        }
        if let Some(o) = &c.overlap {
            body["schedule"]["overlap"] = json!(o);
        }
    } else if c.timezone.is_some() || c.overlap.is_some() {
        return Err(Fail::usage("--timezone and --overlap go with --cron"));
    }
    if let Some(t) = c.timeout {
        body["timeout_seconds"] = json!(t);
    }
    if let Some(n) = c.max_attempts {
        body["retry"] = json!({"max_attempts": n});
    }
    if let Some(r) = &c.request_id {
        body["request_id"] = json!(r);
    }
    if path != DeliveryPath::Local {
        body["target"] = json!({"path": path, "pool": c.pool.as_deref().unwrap_or("default")});
    }
    // Everything the scheduler checks about the request itself, checked here with the same
    // code (`TaskSpec::parse`, every path counted as served: which paths a scheduler serves
    // only it knows): a bad --overlap, --max-attempts, --cron, --timezone, name, ... is a bad
    // command line (64) found before anything is sent, not a refusal by the server (65).
    let all_paths = DeliveryPath::ALL;
    if let Err(e) = etask::scheduler::api::TaskSpec::parse(body.to_string().as_bytes(), all_paths) {
        // A position in JSON the user never wrote says nothing: cut it.
        let m = match e.message.rfind(" at line ") {
            Some(i) if e.message[i..].contains(" column ") => &e.message[..i],
            _ => &e.message,
        };
        return Err(Fail::usage(m));
    }
    // Signals are blocked before any thread starts: Ctrl-C during --wait cancels the execution.
    let signals =
        if c.wait {
            Some(etask::signals::termination().map_err(|e| {
                Fail::new(exit::OSERR, format!("cannot set up signal handling: {e}"))
            })?)
        } else {
            None
        };
    let cl = client(&c.server)?;
    // A large script to a scheduler that will refuse the token: the scheduler answers 401
    // on the head and closes without reading the body, which a sender still writing sees as a
    // broken pipe ("cannot reach the scheduler", 69). Asked first with a small request, the
    // refusal is what it is (77).
    if body.to_string().len() > 1 << 20 {
        cl.get("/api/v1/tasks?limit=1")?;
    }
    let created = cl.post("/api/v1/tasks", &body)?;
    if !c.wait {
        print_json(created);
        return Ok(ExitCode::SUCCESS);
    }
    let exec = created
        .get("execution_id")
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| {
            Fail::new(
                exit::SOFTWARE,
                format!("the scheduler created no execution to wait for: {created}"),
            )
        })?;
    eprintln!("== execution {exec}");
    follow_cancelling_on_signal(&c.server, exec, signals)?;
    let e = cl.get(&format!("/api/v1/executions/{exec}"))?;
    let status = e
        .get("status")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    eprintln!(
        "== {status}{}",
        e.get("error")
            .and_then(serde_json::Value::as_str)
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    );
    if let Some(r) = e.get("result").filter(|r| !r.is_null()) {
        eprintln!("== result: {r}");
    }
    if let Some(r) = e.get("result_error").and_then(serde_json::Value::as_str) {
        eprintln!("== result_error: {r}");
    }
    let num = |k: &str| e.get(k).and_then(serde_json::Value::as_i64);
    let spawn_failed = e
        .get("error")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|m| m.starts_with("spawn failed"));
    Ok(ExitCode::from(match status.as_str() {
        "succeeded" => 0,
        "timed_out" => TIMED_OUT,
        "cancelled" => CANCELLED,
        _ => match (num("exit_code"), num("signal")) {
            (Some(c), _) if c != 0 => script_code(c),
            (_, Some(s)) => (128 + s).clamp(129, 255) as u8,
            _ if spawn_failed => SPAWN_FAILED,
            // Ended without a code of its script: lost node, no node took it.
            _ => 1,
        },
    }))
}

fn cmd_logs(c: LogsCmd) -> CmdResult {
    if !c.follow {
        client(&c.server)?.logs(c.id, 0, false, log_printer())?;
        return Ok(ExitCode::SUCCESS);
    }
    // Following: the stream may stay quiet for hours, so a gone reader (`logs -f | head`) is
    // noticed by watching stdout, not only at the next write.
    let done = spawn_follow(&c.server, c.id)?;
    loop {
        match done.recv_timeout(READER_CHECK) {
            Ok(r) => return r.map(|()| ExitCode::SUCCESS).map_err(Fail::from),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(ExitCode::SUCCESS),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => end_if_stdout_reader_gone(),
        }
    }
}

/// Whether stdout is a pipe or socket whose reader has gone: `poll` reports POLLERR (pipe) or
/// POLLHUP (socket, terminal hang-up) on it without anything being written.
fn stdout_reader_gone() -> bool {
    let mut fd = libc::pollfd {
        fd: 1,
        events: 0,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// How often a follow checks that someone still reads its stdout.
const READER_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Follows an execution's logs on a thread of its own; its result arrives on the channel.
fn spawn_follow(
    server: &Option<String>,
    exec: i64,
) -> Result<crossbeam_channel::Receiver<Result<(), etask::client::ClientError>>, Fail> {
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let follower = client(server)?;
    std::thread::Builder::new()
        .name("follow".into())
        .spawn(move || {
            let _ = done_tx.send(follower.logs(exec, 0, true, log_printer()));
        })
        .map_err(|e| Fail::new(exit::OSERR, format!("cannot start a thread: {e}")))?;
    Ok(done_rx)
}

/// Ends the process the way a write would (SIGPIPE, default disposition for client commands)
/// when stdout is a pipe whose reader has gone: `poll` reports POLLERR on such a pipe.
fn end_if_stdout_reader_gone() {
    if stdout_reader_gone() {
        // SAFETY: raising a signal at ourselves; SIGPIPE is SIG_DFL for client commands, so
        // this ends the process like `head`'s other writers; exit(141) if it were not.
        unsafe { libc::raise(libc::SIGPIPE) };
        std::process::exit(128 + libc::SIGPIPE);
    }
}

/// Follows an execution's logs until it ends. The first termination signal cancels the
/// execution (the follow then ends with it); a second one stops waiting at once.
fn follow_cancelling_on_signal(
    server: &Option<String>,
    exec: i64,
    signals: Option<crossbeam_channel::Receiver<i32>>,
) -> Result<(), Fail> {
    let done_rx = spawn_follow(server, exec)?;
    let never = crossbeam_channel::never();
    let signals = signals.unwrap_or_else(crossbeam_channel::never);
    let mut cancelled = false;
    loop {
        crossbeam_channel::select! {
            recv(done_rx) -> r => return r.unwrap_or(Ok(())).map_err(Fail::from),
            recv(if cancelled { &never } else { &signals }) -> _ => {
                eprintln!("== interrupted: cancelling execution {exec} (again to stop waiting)");
                client(server)?.post(&format!("/api/v1/executions/{exec}/cancel"), &serde_json::json!({}))?;
                cancelled = true;
            }
            recv(if cancelled { &signals } else { &never }) -> _ => {
                return Err(Fail::new(CANCELLED, format!("stopped waiting; execution {exec} was asked to cancel")));
            }
            default(READER_CHECK) => end_if_stdout_reader_gone(),
        }
    }
}

fn cmd_tasks(c: TasksCmd) -> CmdResult {
    let mut query = form_urlencoded::Serializer::new(String::new());
    etask::model::page_limit(Some(c.limit)).map_err(|m| Fail::usage(format!("--{m}")))?;
    query.append_pair("limit", &c.limit.to_string());
    if let Some(n) = &c.name {
        query.append_pair("name", n);
    }
    let cl = client(&c.server)?;
    let v = cl.get(&format!("/api/v1/tasks?{}", query.finish()))?;
    let rows = items(&v)?
        .iter()
        .map(|t| {
            let cron = t
                .pointer("/spec/schedule/expr")
                .and_then(serde_json::Value::as_str);
            let sched = cron.unwrap_or("once");
            // The newest execution: its id is what `get`, `logs` and `cancel` take (task and
            // execution ids drift apart), and a once task's STATE is its status ("-" for
            // none); a cron task's STATE is active or paused.
            let newest = cl.get(&format!("/api/v1/executions?task_id={}&limit=1", t["id"]))?;
            let newest = items(&newest)?.first();
            let last = newest.map_or("-".to_owned(), |e| e["id"].to_string());
            let state = if t["paused"].as_bool() == Some(true) {
                "paused".to_owned()
            } else if cron.is_some() {
                "active".to_owned()
            } else {
                newest
                    .and_then(|e| e["status"].as_str())
                    .unwrap_or("-")
                    .to_owned()
            };
            // The next fire in the task's own zone, as the server computed it (a paused task's
            // STATE says it will not fire then).
            let next = match (t["next_fire_local"].as_str(), t["timezone"].as_str()) {
                (Some(at), Some(zone)) => format!("{at} {zone}"),
                _ => "-".to_owned(),
            };
            Ok(vec![
                t["id"].to_string(),
                t["name"].as_str().unwrap_or("").to_owned(),
                sched.to_owned(),
                state,
                last,
                next,
            ])
        })
        .collect::<Result<Vec<_>, Fail>>()?;
    print_table(
        &[
            "ID",
            "NAME",
            "SCHEDULE",
            "STATE",
            "LAST EXECUTION",
            "NEXT FIRE",
        ],
        &[true],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_nodes(c: NodesCmd) -> CmdResult {
    let v = client(&c.server)?.get("/api/v1/nodes")?;
    let rows = items(&v)?
        .iter()
        .map(|n| {
            let s = |k: &str| {
                n.get(k)
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("-")
                    .to_owned()
            };
            vec![
                s("id"),
                s("role"),
                s("pool"),
                s("path"),
                format!("{}/{}", n["running"], n["capacity"]),
                s("containment"),
                s("address"),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "ROLE",
            "POOL",
            "PATH",
            "RUNNING",
            "CONTAINMENT",
            "ADDRESS",
        ],
        &[false, false, false, false, true],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

/// The `items` of a list answer.
/// The `items` of a list answer, each an object; anything else is an answer etask does not
/// understand (70), not an empty list (a hostile or wrong server's `{"items": 5}` printed an
/// empty table and exited 0).
fn items(v: &serde_json::Value) -> Result<&Vec<serde_json::Value>, Fail> {
    let bad = |why: String| {
        Fail::new(
            exit::SOFTWARE,
            format!("bad response from the scheduler: {why}"),
        )
    };
    let list = v
        .get("items")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| bad(format!("no \"items\" list in {}", etask::client::shape(v))))?;
    match list.iter().find(|i| !i.is_object()) {
        Some(i) => Err(bad(format!(
            "an item is {}, not an object",
            etask::client::shape(i)
        ))),
        None => Ok(list),
    }
}

/// Prints a header and rows in columns as wide as their widest cell (two spaces apart);
/// `right[i]` right-aligns column i (numbers). The last column is not padded.
/// A cell as it may reach a terminal: control and invisible formatting characters (which a
/// hostile or old server could send: `\e]0;…\a`, a right-to-left override) are shown
/// escaped (`\u{1b}`), never written.
fn printable(cell: &str) -> String {
    cell.chars()
        .map(|c| {
            if c.is_control() || etask::scheduler::api::is_invisible_format(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn print_table(header: &[&str], right: &[bool], rows: Vec<Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect();
    let width = |s: &str| s.chars().count();
    let mut widths: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(width(cell));
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            let pad = " ".repeat(widths[i].saturating_sub(width(cell)));
            match (i == last, right.get(i).copied().unwrap_or(false)) {
                (_, true) => out.push_str(&format!("{pad}{cell}")),
                (true, false) => out.push_str(cell),
                (false, false) => out.push_str(&format!("{cell}{pad}")),
            }
            if i != last {
                out.push_str("  ");
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Prints one log line of the API (`{"stream", "data", ...}`) like `etask run` prints chunks.
/// Prints log lines as they come, with a `== attempt N` line where a new attempt begins (a
/// retried execution's logs would read as one run otherwise).
fn log_printer() -> impl FnMut(&serde_json::Value) {
    let mut last_attempt = None;
    move |l| {
        let attempt = l.get("attempt").and_then(serde_json::Value::as_i64);
        if attempt.is_some() && last_attempt.is_some() && attempt != last_attempt {
            eprintln!("== attempt {}", attempt.unwrap_or_default());
        }
        if attempt.is_some() {
            last_attempt = attempt;
        }
        print_log_line(l);
    }
}

fn print_log_line(l: &serde_json::Value) {
    let data = l
        .get("data")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    let stream = if l.get("stream").and_then(serde_json::Value::as_str) == Some("stderr") {
        Stream::Stderr
    } else {
        Stream::Stdout
    };
    // Client commands: a gone reader has ended the process through SIGPIPE already; any other
    // failure (`logs ID >/dev/full`) must not end in exit 0 with the logs cut short.
    if let Err(e) = print_chunk(stream, data) {
        let f = output_failure(&e);
        log::logger().flush();
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "etask: {}", f.msg);
        std::process::exit(i32::from(f.code));
    }
}
