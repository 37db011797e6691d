-- Broadcast: one execution per live node of a pool, pinned to it and told its shard.
ALTER TABLE executions ADD COLUMN pin_node VARCHAR(255) NULL;
ALTER TABLE executions ADD COLUMN shard_index INT NOT NULL DEFAULT 0;
ALTER TABLE executions ADD COLUMN shard_total INT NOT NULL DEFAULT 1;
