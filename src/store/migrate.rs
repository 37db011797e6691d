//! Schema migrations: the SQL files of each back end (`sql/<backend>/NNNN_*.sql`, compiled in)
//! and how a file is split into statements. Applying them (under a lock, recording versions) is
//! each back end's `Backend::migrate`; `etask migrate` and the scheduler's start call it.

/// Migrations of one back end, in order: (version, sql).
pub fn migrations(dir: &str) -> Vec<(u32, &'static str)> {
    match dir {
        "sqlite" => vec![
            (1, include_str!("../../sql/sqlite/0001_init.sql")),
            (2, include_str!("../../sql/sqlite/0002_target_path.sql")),
            (3, include_str!("../../sql/sqlite/0003_target_pool.sql")),
            (4, include_str!("../../sql/sqlite/0004_broadcast.sql")),
            (5, include_str!("../../sql/sqlite/0005_cron_overlap.sql")),
            (6, include_str!("../../sql/sqlite/0006_run_resources.sql")),
        ],
        _ => vec![
            (1, include_str!("../../sql/mysql/0001_init.sql")),
            (2, include_str!("../../sql/mysql/0002_target_path.sql")),
            (3, include_str!("../../sql/mysql/0003_target_pool.sql")),
            (4, include_str!("../../sql/mysql/0004_broadcast.sql")),
            (5, include_str!("../../sql/mysql/0005_cron_overlap.sql")),
            (6, include_str!("../../sql/mysql/0006_run_resources.sql")),
        ],
    }
}

/// Splits a migration file into statements (a `;` at the end of a line ends one).
pub fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in sql.lines() {
        let t = line.trim();
        if t.starts_with("--") || t.is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        if t.ends_with(';') {
            out.push(cur.trim().trim_end_matches(';').to_owned());
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_at_line_end_semicolons() {
        let s = statements("-- c\nCREATE TABLE a (x INT);\n\nCREATE TABLE b (\n y INT\n);\n");
        assert_eq!(
            s,
            vec![
                "CREATE TABLE a (x INT)".to_string(),
                "CREATE TABLE b (\n y INT\n)".to_string()
            ]
        );
    }
}
