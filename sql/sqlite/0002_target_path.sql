-- Which delivery path (local, push, pull, agent) runs a task's executions, so each scheduler
-- delivery claims only its own work.
ALTER TABLE tasks ADD COLUMN path TEXT NOT NULL DEFAULT 'local';
ALTER TABLE executions ADD COLUMN path TEXT NOT NULL DEFAULT 'local';
CREATE INDEX executions_path_due ON executions (path, status, due_at);
