-- Overlap policy of cron tasks: fires skipped because the previous execution had not ended
-- (forbid, or queue with one already waiting), and executions that wait for the task's
-- earlier ones to end before they may be claimed (queue).
ALTER TABLE tasks ADD COLUMN skipped_fires INTEGER NOT NULL DEFAULT 0;
ALTER TABLE executions ADD COLUMN serial INTEGER NOT NULL DEFAULT 0;
