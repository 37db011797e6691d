-- ETask schema v1 (SQLite). Times are unix milliseconds. Applied by `etask migrate` and at
-- scheduler start; statements are separated by a semicolon at the end of a line.
CREATE TABLE tasks (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL,
    request_id   TEXT    UNIQUE,
    spec         TEXT    NOT NULL,
    cron_expr    TEXT,
    next_fire_at INTEGER,
    paused       INTEGER NOT NULL DEFAULT 0,
    deleted      INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL
);
CREATE INDEX tasks_fire ON tasks (next_fire_at);
CREATE INDEX tasks_name ON tasks (name, id);
CREATE TABLE executions (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id      INTEGER NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 1,
    status       TEXT    NOT NULL,
    node         TEXT,
    due_at       INTEGER NOT NULL,
    timeout_ms   INTEGER,
    deadline_at  INTEGER,
    heartbeat_at INTEGER,
    exit_code    INTEGER,
    signal       INTEGER,
    result       TEXT,
    result_error TEXT,
    error        TEXT,
    created_at   INTEGER NOT NULL,
    started_at   INTEGER,
    finished_at  INTEGER,
    updated_at   INTEGER NOT NULL
);
CREATE INDEX executions_due ON executions (status, due_at);
CREATE INDEX executions_task ON executions (task_id, id);
CREATE TABLE attempts (
    execution_id INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,
    status       TEXT    NOT NULL,
    node         TEXT,
    exit_code    INTEGER,
    signal       INTEGER,
    error        TEXT,
    started_at   INTEGER,
    finished_at  INTEGER,
    PRIMARY KEY (execution_id, attempt)
);
CREATE TABLE log_chunks (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    execution_id INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,
    run_seq      INTEGER NOT NULL,
    stream       TEXT    NOT NULL,
    data         TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    UNIQUE (execution_id, attempt, run_seq)
);
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    execution_id INTEGER NOT NULL,
    url          TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      INTEGER NOT NULL,
    done         INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    created_at   INTEGER NOT NULL
);
CREATE INDEX outbox_due ON outbox (done, next_at);
