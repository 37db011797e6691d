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
    Server(ServerCmd),
    Migrate(MigrateCmd),
    Config(ConfigCmd),
    Submit(SubmitCmd),
    Get(GetCmd),
    Logs(LogsCmd),
    Cancel(CancelCmd),
    Tasks(TasksCmd),
    Nodes(NodesCmd),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "nodes")]
/// list the live nodes the scheduler knows (from etcd, or its built-in node).
struct NodesCmd {
    /// scheduler URL (default $ETASK_SERVER or http://127.0.0.1:8765)
    #[argh(option)]
    server: Option<String>,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "server")]
/// run a server role: scheduler (HTTP + gRPC intake, store, routing, retries, callbacks), all
/// (scheduler with a built-in node; needs no external service), executor (gRPC node, push or
/// pull), agent (Kafka consumer; opens no port).
struct ServerCmd {
    /// scheduler | agent | executor | all
    #[argh(option)]
    mode: String,
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
}

#[derive(FromArgs)]
#[argh(subcommand, name = "migrate")]
/// apply the schema migrations (sql/) to a store; safe to run while schedulers start.
struct MigrateCmd {
    /// store URL: sqlite:PATH or mysql://user:pass@host:port/db
    #[argh(option)]
    store: String,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "config")]
/// print the commented default configuration, or check a config file.
struct ConfigCmd {
    /// print the default config file with every key documented
    #[argh(switch)]
    print_default: bool,
    /// parse and validate this file
    #[argh(option)]
    check: Option<PathBuf>,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "submit")]
/// submit a script as a task (runs once now, or on --cron); --wait follows it to the end and
/// exits like `etask run`.
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
    /// print logs live and the final result; exit status mirrors the outcome
    #[argh(switch)]
    wait: bool,
    /// scheduler URL (default $ETASK_SERVER or http://127.0.0.1:8765)
    #[argh(option)]
    server: Option<String>,
    /// script arguments
    #[argh(positional, greedy)]
    args: Vec<String>,
}

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
    let cli: Cli = argh::from_env();
    // Daemons log their events; one-shot commands only what went wrong.
    let level = if matches!(cli.cmd, Cmd::Server(_)) {
        log::LevelFilter::Info
    } else {
        log::LevelFilter::Warn
    };
    etask::logging::init(level);
    let res = match cli.cmd {
        Cmd::Run(c) => cmd_run(c),
        Cmd::Server(c) => cmd_server(c).map(|()| ExitCode::SUCCESS),
        Cmd::Migrate(c) => cmd_migrate(c).map(|()| ExitCode::SUCCESS),
        Cmd::Config(c) => cmd_config(c).map(|()| ExitCode::SUCCESS),
        Cmd::Submit(c) => cmd_submit(c),
        Cmd::Get(c) => client(&c.server)
            .get(&format!("/api/v1/executions/{}", c.id))
            .map(print_json),
        Cmd::Logs(c) => cmd_logs(c),
        Cmd::Cancel(c) => client(&c.server)
            .post(
                &format!("/api/v1/executions/{}/cancel", c.id),
                &serde_json::json!({}),
            )
            .map(print_json),
        Cmd::Tasks(c) => cmd_tasks(c),
        Cmd::Nodes(c) => cmd_nodes(c),
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

fn print_json(v: serde_json::Value) -> ExitCode {
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    ExitCode::SUCCESS
}

fn client(server: &Option<String>) -> etask::client::Client {
    let base = server
        .clone()
        .or_else(|| std::env::var("ETASK_SERVER").ok())
        .unwrap_or_else(|| "http://127.0.0.1:8765".into());
    etask::client::Client::new(&base, std::env::var("ETASK_TOKEN").ok())
}

fn cmd_server(c: ServerCmd) -> Result<(), String> {
    let mode: etask::server::Mode = c.mode.parse()?;
    let mut cfg = match &c.config {
        Some(p) => etask::config::Config::load(p)?,
        None => etask::config::Config::default(),
    };
    if let Some(l) = c.listen {
        cfg.server.listen = l;
    }
    if let Some(d) = c.data_dir {
        cfg.server.data_dir = d;
    }
    if let Some(s) = c.store {
        cfg.server.store = s;
    }
    if let Some(g) = c.grpc_listen {
        if mode == etask::server::Mode::Executor {
            cfg.executor.grpc_listen = g;
        } else {
            cfg.server.grpc_listen = g;
        }
    }
    let set = |slot: &mut String, v: Option<String>| {
        if let Some(v) = v {
            *slot = v;
        }
    };
    set(&mut cfg.registry.etcd, c.etcd);
    set(&mut cfg.executor.scheduler, c.scheduler);
    if mode == etask::server::Mode::Agent {
        set(&mut cfg.agent.pool, c.pool);
        set(&mut cfg.agent.node_id, c.node_id);
    } else {
        set(&mut cfg.executor.pool, c.pool);
        set(&mut cfg.executor.node_id, c.node_id);
    }
    set(&mut cfg.executor.path, c.path);
    set(&mut cfg.kafka.brokers, c.kafka);
    if let Some(v) = c.max_concurrent {
        cfg.node.max_concurrent = v;
    }
    let cwd =
        std::env::current_dir().map_err(|e| format!("cannot read the current directory: {e}"))?;
    cfg.resolve_paths(&cwd);
    cfg.validate()?;
    if cfg.server.token.is_empty() {
        if let Ok(t) = std::env::var("ETASK_TOKEN") {
            cfg.server.token = t;
        }
    }
    // Nothing of the node for scripts to read: the token leaves the environment (still single-
    // threaded here, so removing a variable is safe), and the process is not dumpable, so a
    // script of the same uid cannot read /proc/<node>/environ or memory, nor ptrace it.
    etask::signals::scrub_env("ETASK_TOKEN");
    etask::signals::not_dumpable();
    // Block the termination signals before any thread starts, so every thread inherits it.
    let stop =
        etask::signals::termination().map_err(|e| format!("cannot set up signal handling: {e}"))?;
    etask::server::run(mode, cfg, stop)
}

fn cmd_migrate(c: MigrateCmd) -> Result<(), String> {
    let store = etask::store::open(&c.store).map_err(|e| e.to_string())?;
    use etask::store::Store;
    let applied = store.migrate().map_err(|e| e.to_string())?;
    if applied.is_empty() {
        println!("{}: schema up to date", store.describe());
    } else {
        println!("{}: applied migrations {applied:?}", store.describe());
    }
    Ok(())
}

fn cmd_config(c: ConfigCmd) -> Result<(), String> {
    if let Some(p) = c.check {
        etask::config::Config::load(&p)?;
        println!("{}: ok", p.display());
        return Ok(());
    }
    if !c.print_default {
        return Err("use --print-default or --check FILE".into());
    }
    print!("{}", etask::config::DEFAULT_TOML);
    Ok(())
}

fn cmd_submit(c: SubmitCmd) -> Result<ExitCode, String> {
    use serde_json::json;
    let (kind, file) = match (&c.shell, &c.python) {
        (Some(f), None) => ("shell", f),
        (None, Some(f)) => ("python", f),
        _ => return Err("give exactly one of --shell FILE or --python FILE".into()),
    };
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
        return Err("--timezone and --overlap go with --cron".into());
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
    let cl = client(&c.server);
    let created = cl.post("/api/v1/tasks", &body)?;
    let exec = created
        .get("execution_id")
        .and_then(serde_json::Value::as_i64);
    if !c.wait {
        print_json(created);
        return Ok(ExitCode::SUCCESS);
    }
    let Some(exec) = exec else {
        return Err("--wait needs a task that runs now (not --cron)".into());
    };
    eprintln!("== execution {exec}");
    cl.logs(exec, 0, true, print_log_line)?;
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
    Ok(match status.as_str() {
        "succeeded" => ExitCode::SUCCESS,
        "timed_out" => ExitCode::from(124),
        "cancelled" => ExitCode::from(130),
        _ => match e.get("exit_code").and_then(serde_json::Value::as_i64) {
            Some(c) if (1..=255).contains(&c) => ExitCode::from(c as u8),
            _ => ExitCode::from(1),
        },
    })
}

fn cmd_logs(c: LogsCmd) -> Result<ExitCode, String> {
    client(&c.server).logs(c.id, 0, c.follow, print_log_line)?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_tasks(c: TasksCmd) -> Result<ExitCode, String> {
    let mut path = format!("/api/v1/tasks?limit={}", c.limit);
    if let Some(n) = &c.name {
        path.push_str(&format!(
            "&name={}",
            n.replace('%', "%25")
                .replace('&', "%26")
                .replace(' ', "%20")
        ));
    }
    let v = client(&c.server).get(&path)?;
    for t in v
        .get("items")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        let sched = t
            .pointer("/spec/schedule/expr")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("once");
        // The next fire in the task's own zone, as the server computed it.
        let next = match (t["next_fire_local"].as_str(), t["timezone"].as_str()) {
            (Some(at), Some(zone)) => format!("next {at} {zone}"),
            _ => String::new(),
        };
        println!(
            "{:>8}  {:<32}  {:<16}  {:<6}  {}",
            t["id"],
            t["name"].as_str().unwrap_or(""),
            sched,
            if t["paused"].as_bool() == Some(true) {
                "paused"
            } else {
                ""
            },
            next
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_nodes(c: NodesCmd) -> Result<ExitCode, String> {
    let v = client(&c.server).get("/api/v1/nodes")?;
    println!(
        "{:<40}  {:<9}  {:<12}  {:<6}  {:>9}  {:<11}  address",
        "id", "role", "pool", "path", "running", "containment"
    );
    for n in v
        .get("items")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        let s = |k: &str| {
            n.get(k)
                .and_then(serde_json::Value::as_str)
                .unwrap_or("-")
                .to_owned()
        };
        println!(
            "{:<40}  {:<9}  {:<12}  {:<6}  {:>4}/{:<4}  {:<11}  {}",
            s("id"),
            s("role"),
            s("pool"),
            s("path"),
            n["running"],
            n["capacity"],
            s("containment"),
            s("address")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints one log line of the API (`{"stream", "data", ...}`) like `etask run` prints chunks.
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
    print_chunk(stream, data);
}
