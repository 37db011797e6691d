-- ETask schema v1 (MySQL / MariaDB, InnoDB, utf8mb4). Times are unix milliseconds. Applied by
-- `etask migrate` and at scheduler start under GET_LOCK('etask_migrate'); statements are
-- separated by a semicolon at the end of a line.
CREATE TABLE tasks (
    id           BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name         VARCHAR(255) NOT NULL,
    request_id   VARCHAR(255) NULL UNIQUE,
    spec         MEDIUMTEXT   NOT NULL,
    cron_expr    VARCHAR(255) NULL,
    next_fire_at BIGINT       NULL,
    paused       TINYINT      NOT NULL DEFAULT 0,
    deleted      TINYINT      NOT NULL DEFAULT 0,
    created_at   BIGINT       NOT NULL,
    KEY tasks_fire (next_fire_at),
    KEY tasks_name (name, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE executions (
    id           BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    task_id      BIGINT       NOT NULL,
    attempt      INT          NOT NULL DEFAULT 1,
    status       VARCHAR(16)  NOT NULL,
    node         VARCHAR(255) NULL,
    due_at       BIGINT       NOT NULL,
    timeout_ms   BIGINT       NULL,
    deadline_at  BIGINT       NULL,
    heartbeat_at BIGINT       NULL,
    exit_code    INT          NULL,
    `signal`     INT          NULL,
    result       MEDIUMTEXT   NULL,
    result_error TEXT         NULL,
    error        TEXT         NULL,
    created_at   BIGINT       NOT NULL,
    started_at   BIGINT       NULL,
    finished_at  BIGINT       NULL,
    updated_at   BIGINT       NOT NULL,
    KEY executions_due (status, due_at),
    KEY executions_task (task_id, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE attempts (
    execution_id BIGINT       NOT NULL,
    attempt      INT          NOT NULL,
    status       VARCHAR(16)  NOT NULL,
    node         VARCHAR(255) NULL,
    exit_code    INT          NULL,
    `signal`     INT          NULL,
    error        TEXT         NULL,
    started_at   BIGINT       NULL,
    finished_at  BIGINT       NULL,
    PRIMARY KEY (execution_id, attempt)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE log_chunks (
    id           BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    execution_id BIGINT       NOT NULL,
    attempt      INT          NOT NULL,
    run_seq      BIGINT       NOT NULL,
    stream       VARCHAR(8)   NOT NULL,
    data         MEDIUMTEXT   NOT NULL,
    created_at   BIGINT       NOT NULL,
    UNIQUE KEY log_chunks_run (execution_id, attempt, run_seq)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE outbox (
    id           BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    execution_id BIGINT       NOT NULL,
    url          TEXT         NOT NULL,
    attempts     INT          NOT NULL DEFAULT 0,
    next_at      BIGINT       NOT NULL,
    done         TINYINT      NOT NULL DEFAULT 0,
    last_error   TEXT         NULL,
    created_at   BIGINT       NOT NULL,
    KEY outbox_due (done, next_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
