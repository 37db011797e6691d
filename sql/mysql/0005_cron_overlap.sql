-- Overlap policy of cron tasks: fires skipped because the previous execution had not ended
-- (forbid, or queue with one already waiting), and executions that wait for the task's
-- earlier ones to end before they may be claimed (queue).
ALTER TABLE tasks ADD COLUMN skipped_fires BIGINT NOT NULL DEFAULT 0;
ALTER TABLE executions ADD COLUMN serial TINYINT NOT NULL DEFAULT 0;
