-- The target pool of a task's executions, so a pulling executor claims only its pool's work.
ALTER TABLE tasks ADD COLUMN pool VARCHAR(255) NOT NULL DEFAULT '';
ALTER TABLE executions ADD COLUMN pool VARCHAR(255) NOT NULL DEFAULT '';
