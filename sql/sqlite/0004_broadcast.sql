-- Broadcast: one execution per live node of a pool, pinned to it and told its shard.
ALTER TABLE executions ADD COLUMN pin_node TEXT;
ALTER TABLE executions ADD COLUMN shard_index INTEGER NOT NULL DEFAULT 0;
ALTER TABLE executions ADD COLUMN shard_total INTEGER NOT NULL DEFAULT 1;
