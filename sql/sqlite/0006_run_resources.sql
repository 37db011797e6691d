-- What an attempt used and what bounded it, as its node reported (JSON: containment, limits,
-- unenforced, oom_killed, pids_exhausted, cpu_user_ms, cpu_system_ms, memory_peak_bytes);
-- NULL when the node said nothing (older nodes, runs that never started).
ALTER TABLE executions ADD COLUMN resources TEXT;
