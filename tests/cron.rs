//! The cron dialect (README "Cron") against an independent oracle: every field's semantics,
//! descriptors, zones and the DST rules are computed both by `etask::cron` and by
//! tests/support/cron_oracle.py (brute force over wall-clock days with Python's zoneinfo), and
//! the fire instants must be the same.

use std::io::Write;
use std::process::{Command, Stdio};

use etask::cron::{zone, Schedule};
use serde_json::{json, Value};

/// 2026-11-29T00:00:00Z (a Sunday), 2027-02-27T23:59:59Z, 2028-02-28T12:00:30Z (leap year),
/// 2026-03-07T23:59:59Z (the day before New York springs forward).
const STARTS: [i64; 4] = [1_795_910_400, 1_803_859_199, 1_835_352_030, 1_772_927_999];

struct Query {
    expr: String,
    zone: &'static str,
    after: i64,
    n: usize,
}

fn ours(q: &Query) -> Vec<i64> {
    let s = Schedule::new(&q.expr, zone(q.zone).unwrap())
        .unwrap_or_else(|e| panic!("{:?} refused: {e}", q.expr));
    let mut t = q.after * 1000;
    let mut out = Vec::new();
    for _ in 0..q.n {
        match s.next_after(t) {
            Some(n) => {
                out.push(n / 1000);
                t = n;
            }
            None => break,
        }
    }
    out
}

fn oracle(qs: &[Query]) -> Vec<Vec<i64>> {
    let input: Vec<Value> = qs
        .iter()
        .map(|q| json!({"expr": q.expr, "zone": q.zone, "after": q.after, "n": q.n}))
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/cron_oracle.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the cron oracle");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(Value::from(input).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "oracle failed");
    serde_json::from_slice(&out.stdout).expect("oracle output")
}

fn compare(qs: Vec<Query>) {
    let want = oracle(&qs);
    let mut bad = Vec::new();
    for (q, w) in qs.iter().zip(want) {
        let got = ours(q);
        if got != w {
            bad.push(format!(
                "{:?} in {} after {}: etask {got:?}, oracle {w:?}",
                q.expr, q.zone, q.after
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

fn each_start(exprs: &[&str], zone: &'static str, n: usize) -> Vec<Query> {
    exprs
        .iter()
        .flat_map(|e| {
            STARTS.iter().map(move |&after| Query {
                expr: e.to_string(),
                zone,
                after,
                n,
            })
        })
        .collect()
}

#[test]
fn every_field_matches_the_oracle() {
    compare(each_start(
        &[
            // second
            "*/7 * * * * *",
            "5,10-12,50/4 * * * * *",
            "? ? 3 * * *",
            // minute
            "0 */13 * * * *",
            "30 5-20/5 * * * *",
            "0 10/25 * * * *",
            // hour
            "0 0 */5 * * *",
            "0 0 9-17/2 * * *",
            // day of month
            "0 0 0 31 * *",
            "0 0 6 1,15,28-31 * *",
            // month, with names in any case
            "0 0 0 1 FEB,apr-Jun *",
            "0 0 0 29 2 *",
            "0 0 0 1 */5 *",
            // day of week, with names
            "0 0 8 * * MON-FRI",
            "0 0 8 ? * sun,3",
            "0 0 8 * * 0",
            // day of month OR day of week when both are restricted
            "0 0 12 13 * FRI",
            "0 0 0 1-7 * MON",
            "0 0 0 */2 * */3",
            // AND when either is a star (`*`, `?`, `*/1`)
            "0 0 12 ? * FRI",
            "0 0 0 13 * *",
            "0 0 0 13 * */1",
            "0 0 0 ? * 6",
            // descriptors
            "@yearly",
            "@annually",
            "@monthly",
            "@weekly",
            "@daily",
            "@midnight",
            "@hourly",
            "@every 90s",
            "@every 1h30m",
            // the optional year field
            "0 0 0 1 1 * 2028-2030",
        ],
        "UTC",
        5,
    ));
}

#[test]
fn zones_and_dst_rules_match_the_oracle() {
    let mut qs = Vec::new();
    // New York 2026: spring forward 03-08 02:00 EST, fall back 11-01 02:00 EDT.
    let ny = [
        1_772_900_000,
        1_772_946_000,
        1_793_491_200,
        1_793_505_600,
        1_793_509_100,
        1_793_512_800,
    ];
    // Berlin 2026: 03-29 02:00 CET -> 03:00 CEST, 10-25 03:00 CEST -> 02:00 CET.
    let berlin = [1_774_735_200, 1_774_742_400, 1_792_864_800, 1_792_886_400];
    // Lord Howe shifts by 30 minutes: 2026-04-05 02:00 -> 01:30, 2026-10-04 02:00 -> 02:30.
    let lord_howe = [1_775_300_000, 1_775_311_000, 1_791_040_000, 1_791_045_000];
    let exprs = [
        "0 30 2 * * *",
        "0 30 1 * * *",
        "0 0 2 * * *",
        "0 */15 * * * *",
        "0 30 * * * *",
        "0 * * * * *",
        "*/20 * 1-3 * * *",
        "15 45 * * * *",
        "0 0 0 * * *",
        "@hourly",
    ];
    for (zone, starts) in [
        ("America/New_York", &ny[..]),
        ("Europe/Berlin", &berlin[..]),
        ("Australia/Lord_Howe", &lord_howe[..]),
    ] {
        for e in exprs {
            for &after in starts {
                qs.push(Query {
                    expr: e.into(),
                    zone,
                    after,
                    n: 6,
                });
            }
        }
    }
    for (expr, zone) in [
        ("0 0 9 * * MON-FRI", "Asia/Shanghai"),
        ("CRON_TZ=Asia/Kolkata 0 30 9 * * *", "Asia/Kolkata"),
        ("0 0 12 13 * FRI", "Pacific/Auckland"),
    ] {
        for &after in &STARTS {
            qs.push(Query {
                expr: expr.into(),
                zone,
                after,
                n: 5,
            });
        }
    }
    compare(qs);
}

/// A random expression of the dialect: each field a `*`, `?`, value, range, step or list.
fn random_expr(rng: &mut fastrand::Rng) -> String {
    let bounds = [(0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6)];
    let names: [&[&str]; 6] = [
        &[],
        &[],
        &[],
        &[],
        &[
            "JAN", "feb", "Mar", "apr", "MAY", "jun", "JUL", "aug", "SEP", "oct", "NOV", "dec",
        ],
        &["SUN", "mon", "Tue", "WED", "thu", "FRI", "sat"],
    ];
    let mut fields = Vec::new();
    for (i, (lo, hi)) in bounds.iter().copied().enumerate() {
        let v = |rng: &mut fastrand::Rng, x: u32| -> String {
            if !names[i].is_empty() && rng.bool() {
                names[i][(x - lo) as usize].to_string()
            } else {
                x.to_string()
            }
        };
        let item = |rng: &mut fastrand::Rng| -> String {
            let a = rng.u32(lo..=hi);
            let b = rng.u32(a..=hi);
            match rng.u8(0..6) {
                0 => "*".into(),
                1 => format!("*/{}", rng.u32(1..=(hi - lo + 1).min(13))),
                2 => v(rng, a),
                3 => format!("{}-{}", v(rng, a), v(rng, b)),
                4 => format!("{}-{}/{}", v(rng, a), v(rng, b), rng.u32(1..=7)),
                _ => format!("{}/{}", v(rng, a), rng.u32(1..=9)),
            }
        };
        // Narrow time fields keep the search short; days, months and weekdays roam.
        let f = match (i, rng.u8(0..4)) {
            (0..=2, 0) => "?".to_string(),
            (0..=2, _) => {
                let x = rng.u32(lo..=hi);
                v(rng, x)
            }
            (_, 0) => format!("{},{}", item(rng), item(rng)),
            (_, 1) if i != 4 => "?".into(),
            _ => item(rng),
        };
        fields.push(f);
    }
    fields.join(" ")
}

#[test]
fn random_expressions_match_the_oracle() {
    let mut rng = fastrand::Rng::with_seed(20_261_129);
    let zones = ["UTC", "America/New_York", "Europe/Berlin", "Asia/Shanghai"];
    let mut qs = Vec::new();
    while qs.len() < 300 {
        let expr = random_expr(&mut rng);
        let z = zones[rng.usize(..zones.len())];
        let Ok(s) = Schedule::new(&expr, zone(z).unwrap()) else {
            panic!("generated {expr:?} was refused");
        };
        let after = STARTS[rng.usize(..STARTS.len())] + rng.i64(0..86_400 * 200);
        if s.next_after(after * 1000).is_none() {
            continue; // never fires (e.g. 31 in a February-only schedule)
        }
        qs.push(Query {
            expr,
            zone: z,
            after,
            n: 3,
        });
    }
    compare(qs);
}
