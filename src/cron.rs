//! The cron dialect of the reference Go ETask (robfig/cron v3 with a mandatory seconds field)
//! and the instants a schedule fires at in an IANA time zone, DST included. Pure: parsing,
//! matching and the DST rules, no I/O; the cron ticker stores and fires what
//! `Schedule::next_after` computes. README "Cron" documents the dialect field by field.
//!
//! Why no crate: `cron` (0.15) ANDs day-of-month with day-of-week, numbers Sunday 1 (the
//! reference: 0) and silently skips times in a DST gap; `croner` reads another dialect (5 fields,
//! L/W/#, 7 = Sunday) with DST rules of its own. Either would need this parser in front of it to
//! refuse what the reference refuses, so the dialect lives here, tested against an independent
//! Python oracle (tests/cron.rs).

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, Offset, SecondsFormat, TimeDelta,
    TimeZone, Timelike,
};
use chrono_tz::Tz;

/// An expression (or zone name) this dialect refuses; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CronError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, CronError> {
    Err(CronError(m.into()))
}

/// A parsed expression and the zone its wall-clock times are read in.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    kind: Kind,
    tz: Tz,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Fields(Fields),
    /// `@every <duration>`: a constant delay in whole seconds, the same in every zone.
    Every(i64),
}

/// One bit per allowed value. `*_star`: the field was `*` or `?` (robfig's "star bit"), which
/// decides whether day-of-month and day-of-week are ANDed or ORed.
#[derive(Debug, Clone, PartialEq)]
struct Fields {
    sec: u64,
    min: u64,
    hour: u64,
    dom: u64,
    month: u64,
    dow: u64,
    dom_star: bool,
    dow_star: bool,
    /// The optional seventh field (an ETask extension; the reference has no year field).
    years: Option<Vec<i32>>,
}

const ALL_HOURS: u64 = (1 << 24) - 1;

/// Parses an IANA zone name (`Asia/Shanghai`, `UTC`) from the zone database built into the
/// binary (no `/usr/share/zoneinfo` needed).
pub fn zone(name: &str) -> Result<Tz, CronError> {
    name.parse::<Tz>().map_err(|_| {
        CronError(format!(
            "unknown time zone {name:?}: use an IANA name such as \"Asia/Shanghai\", \
             \"Europe/Berlin\" or \"UTC\" (names are case-sensitive)"
        ))
    })
}

/// `ms` as an RFC 3339 local time with its offset in `tz`, e.g. `2026-12-04T20:00:00+08:00`.
pub fn local_rfc3339(ms: i64, tz: Tz) -> Option<String> {
    let t = DateTime::from_timestamp_millis(ms)?.with_timezone(&tz);
    Some(t.to_rfc3339_opts(SecondsFormat::Secs, false))
}

/// An expression as written: its schedule and the zone of a `CRON_TZ=`/`TZ=` prefix, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    kind: Kind,
    pub prefix_zone: Option<Tz>,
}

impl Parsed {
    /// The schedule read in `tz` (the prefix's zone, when there is one, is the caller's choice).
    pub fn in_zone(self, tz: Tz) -> Schedule {
        Schedule {
            kind: self.kind,
            tz,
        }
    }
}

/// Parses an expression of the reference dialect: `[CRON_TZ=Zone ]sec min hour dom month dow`,
/// an optional seventh year field, or a descriptor (`@daily`, `@every 90s`, ...).
///
/// # Errors
/// Anything the reference refuses, and what it would read differently from POSIX cron in a way
/// a user cannot see (5-field lines, `L`/`W`/`#`, day-of-week 7): refused with the reason.
pub fn parse(expr: &str) -> Result<Parsed, CronError> {
    let mut spec = expr.trim();
    if spec.is_empty() {
        return err("empty cron expression");
    }
    let mut prefix_zone = None;
    for p in ["CRON_TZ=", "TZ="] {
        if let Some(rest) = spec.strip_prefix(p) {
            let Some((name, rest)) = rest.split_once(char::is_whitespace) else {
                return err(format!("{p}ZONE must be followed by the schedule, e.g. \"{p}Asia/Shanghai 0 0 9 * * *\""));
            };
            prefix_zone = Some(zone(name)?);
            spec = rest.trim();
            break;
        }
    }
    let kind = if spec.starts_with('@') {
        descriptor(spec)?
    } else {
        Kind::Fields(fields(spec)?)
    };
    Ok(Parsed { kind, prefix_zone })
}

fn descriptor(d: &str) -> Result<Kind, CronError> {
    let f = |e: &str| fields(e).map(Kind::Fields);
    match d {
        "@yearly" | "@annually" => f("0 0 0 1 1 *"),
        "@monthly" => f("0 0 0 1 * *"),
        "@weekly" => f("0 0 0 * * 0"),
        "@daily" | "@midnight" => f("0 0 0 * * *"),
        "@hourly" => f("0 0 * * * *"),
        _ => match d.strip_prefix("@every") {
            Some(dur) if dur.starts_with(char::is_whitespace) => {
                let secs = go_duration_secs(dur.trim())?;
                if secs < 1 {
                    return err(format!(
                        "{d:?}: @every needs at least 1s (the reference rounds shorter delays up to 1s)"
                    ));
                }
                Ok(Kind::Every(secs))
            }
            _ => err(format!(
                "unknown descriptor {d:?}: use @yearly, @annually, @monthly, @weekly, @daily, \
                 @midnight, @hourly or @every <duration> (e.g. @every 1h30m)"
            )),
        },
    }
}

/// A Go `time.ParseDuration` string (`1h30m`, `1.5h`, `90s`, `500ms`) in whole seconds, cut
/// down to the second like the reference's `@every`.
fn go_duration_secs(s: &str) -> Result<i64, CronError> {
    let bad = || {
        CronError(format!(
            "@every {s:?} is not a duration: use numbers with units h, m, s, ms, us, ns, e.g. 1h30m or 90s"
        ))
    };
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(bad());
    }
    let s2 = s.strip_prefix('+').unwrap_or(s);
    let mut nanos: f64 = 0.0;
    let mut rest = s2;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let num: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3.6e12,
            "m" => 6e10,
            "s" => 1e9,
            "ms" => 1e6,
            "us" | "µs" | "μs" => 1e3,
            "ns" => 1.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        nanos += num * scale;
    }
    if nanos > 1e18 {
        return Err(bad());
    }
    Ok((nanos / 1e9).floor() as i64)
}

/// Allowed values of one field: bounds and, for months and weekdays, the three-letter names.
struct Bounds {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    hint: &'static str,
}

const SECONDS: Bounds = Bounds {
    name: "second",
    min: 0,
    max: 59,
    names: &[],
    hint: "",
};
const MINUTES: Bounds = Bounds {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
    hint: "",
};
const HOURS: Bounds = Bounds {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
    hint: "",
};
const DOM: Bounds = Bounds {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
    hint: "",
};
const MONTHS: Bounds = Bounds {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
    hint: "",
};
const DOW: Bounds = Bounds {
    name: "day-of-week",
    min: 0,
    max: 6,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    hint: " (0 or SUN is Sunday; 7 is not accepted)",
};
const YEARS: Bounds = Bounds {
    name: "year",
    min: 1970,
    max: 2099,
    names: &[],
    hint: "",
};

fn fields(spec: &str) -> Result<Fields, CronError> {
    let f: Vec<&str> = spec.split_whitespace().collect();
    match f.len() {
        6 | 7 => {}
        5 => {
            return err(format!(
                "{spec:?} has 5 fields; this dialect (like the reference ETask) starts with seconds: \
                 second minute hour day-of-month month day-of-week. For the crontab line write \"0 {spec}\""
            ))
        }
        n => {
            return err(format!(
                "{spec:?} has {n} fields; expected 6: second minute hour day-of-month month \
                 day-of-week (e.g. \"0 */5 * * * *\"), or a descriptor such as @daily"
            ))
        }
    }
    let mask = |text: &str, b: &Bounds| -> Result<(u64, bool), CronError> {
        let (vals, star) = field(text, b)?;
        Ok((vals.iter().fold(0u64, |m, v| m | 1 << v), star))
    };
    let (dom, dom_star) = mask(f[3], &DOM)?;
    let (dow, dow_star) = mask(f[5], &DOW)?;
    Ok(Fields {
        sec: mask(f[0], &SECONDS)?.0,
        min: mask(f[1], &MINUTES)?.0,
        hour: mask(f[2], &HOURS)?.0,
        dom,
        month: mask(f[4], &MONTHS)?.0,
        dow,
        dom_star,
        dow_star,
        years: match f.get(6) {
            Some(y) => Some(field(y, &YEARS)?.0.into_iter().map(|v| v as i32).collect()),
            None => None,
        },
    })
}

/// One field: a comma list of `*`/`?`, `N`, `N-M`, each optionally `/step` (`N/step` = from N
/// to the maximum). Returns the sorted values and whether the field counts as `*`.
fn field(text: &str, b: &Bounds) -> Result<(Vec<u32>, bool), CronError> {
    let what = b.name;
    let mut on = vec![false; b.max as usize + 1];
    let mut star = false;
    let mut items = 0;
    // Empty list items are ignored, as the reference does ("1,,2" = "1,2").
    for item in text.split(',').filter(|s| !s.is_empty()) {
        items += 1;
        let (range, step) = match item.split_once('/') {
            Some((_, s)) if s.contains('/') => {
                return err(format!("{what} {item:?}: more than one '/'"))
            }
            Some((r, s)) => (r, Some(number(s, what, "step")?)),
            None => (item, None),
        };
        let (lo, hi, is_star) = if range == "*" || range == "?" {
            (b.min, b.max, true)
        } else {
            match range.split_once('-') {
                Some((_, h)) if h.contains('-') => {
                    return err(format!("{what} {item:?}: more than one '-'"))
                }
                Some((l, h)) => (value(l, b)?, value(h, b)?, false),
                // "N/step" runs from N to the field's maximum.
                None if step.is_some() => (value(range, b)?, b.max, false),
                None => {
                    let v = value(range, b)?;
                    (v, v, false)
                }
            }
        };
        if lo < b.min {
            return err(format!(
                "{what} {item:?}: {lo} is below the minimum {}{}",
                b.min, b.hint
            ));
        }
        if hi > b.max {
            return err(format!(
                "{what} {item:?}: {hi} is above the maximum {}{}",
                b.max, b.hint
            ));
        }
        if lo > hi {
            return err(format!(
                "{what} {item:?}: the range starts after it ends (wrap-around ranges are not supported; \
                 write two ranges, e.g. \"FRI-SAT,SUN-MON\")"
            ));
        }
        let step = step.unwrap_or(1);
        if step == 0 {
            return err(format!("{what} {item:?}: the step must be at least 1"));
        }
        // Like the reference: "*" and "*/1" count as a star, "*/2" does not.
        star |= is_star && step == 1;
        for v in (lo..=hi).step_by(step as usize) {
            on[v as usize] = true;
        }
    }
    if items == 0 {
        return err(format!("{what} field {text:?} is empty"));
    }
    let vals = (b.min..=b.max).filter(|v| on[*v as usize]).collect();
    Ok((vals, star))
}

fn number(s: &str, what: &str, role: &str) -> Result<u32, CronError> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return err(format!("{what}: {role} {s:?} is not a number"));
    }
    s.parse()
        .map_err(|_| CronError(format!("{what}: {role} {s:?} is too large")))
}

fn value(s: &str, b: &Bounds) -> Result<u32, CronError> {
    if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
        return number(s, b.name, "value");
    }
    if let Some(i) = b.names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Ok(b.min + i as u32);
    }
    let names = if b.names.is_empty() {
        String::new()
    } else {
        format!(
            " or a name ({}..{})",
            b.names[0].to_uppercase(),
            b.names[b.names.len() - 1].to_uppercase()
        )
    };
    let quartz = if s.contains(['L', 'W', '#', 'l', 'w']) {
        "; L, W and # (Quartz) are not part of this dialect"
    } else {
        ""
    };
    err(format!("{}: {s:?} is not a number{names}{quartz}", b.name))
}

fn bit(mask: u64, v: u32) -> bool {
    mask & (1 << v) != 0
}

/// The smallest allowed value >= `from`, if any.
fn next_bit(mask: u64, from: u32) -> Option<u32> {
    if from >= 64 {
        return None;
    }
    let rest = mask >> from;
    (rest != 0).then(|| from + rest.trailing_zeros())
}

/// Past this many years without a match an expression is taken never to fire (Feb 29 recurs
/// within 8 years).
const HORIZON_YEARS: i32 = 9;

impl Fields {
    fn day_ok(&self, d: NaiveDate) -> bool {
        let dom = bit(self.dom, d.day());
        let dow = bit(self.dow, d.weekday().num_days_from_sunday());
        // The reference's rule (and POSIX cron's): when either day field is `*` or `?`, a day
        // must match both; when both are restricted, either one is enough.
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    fn year_ok(&self, y: i32) -> bool {
        match &self.years {
            Some(ys) => ys.contains(&y),
            None => true,
        }
    }

    fn horizon(&self, from_year: i32) -> i32 {
        match &self.years {
            Some(ys) => ys.last().copied().unwrap_or(0),
            None => from_year + HORIZON_YEARS,
        }
    }

    /// The first (hour, minute, second) >= the given one allowed within a day.
    fn next_in_day(&self, mut h: u32, mut m: u32, mut s: u32) -> Option<(u32, u32, u32)> {
        while h < 24 {
            let hh = next_bit(self.hour, h)?;
            if hh != h {
                (h, m, s) = (hh, 0, 0);
            }
            match next_bit(self.min, m).filter(|mm| *mm < 60) {
                Some(mm) => {
                    if mm != m {
                        (m, s) = (mm, 0);
                    }
                    match next_bit(self.sec, s).filter(|ss| *ss < 60) {
                        Some(ss) => return Some((h, m, ss)),
                        None => (m, s) = (m + 1, 0),
                    }
                    if m >= 60 {
                        (h, m) = (h + 1, 0);
                    }
                }
                None => (h, m, s) = (h + 1, 0, 0),
            }
        }
        None
    }

    /// The first wall-clock time >= `from` that the fields allow (no zone involved).
    fn next_match(&self, from: NaiveDateTime, horizon: i32) -> Option<NaiveDateTime> {
        let mut date = from.date();
        let (mut h, mut m, mut s) = (from.hour(), from.minute(), from.second());
        loop {
            let y = date.year();
            if y > horizon {
                return None;
            }
            if !self.year_ok(y) {
                date = NaiveDate::from_ymd_opt(y + 1, 1, 1)?;
                (h, m, s) = (0, 0, 0);
                continue;
            }
            if !bit(self.month, date.month()) {
                date = match date.month() {
                    12 => NaiveDate::from_ymd_opt(y + 1, 1, 1)?,
                    mo => NaiveDate::from_ymd_opt(y, mo + 1, 1)?,
                };
                (h, m, s) = (0, 0, 0);
                continue;
            }
            if self.day_ok(date) {
                if let Some((hh, mm, ss)) = self.next_in_day(h, m, s) {
                    return date.and_hms_opt(hh, mm, ss);
                }
            }
            date = date.succ_opt()?;
            (h, m, s) = (0, 0, 0);
        }
    }

    /// The first fire instant (unix seconds) strictly after `after`, under the DST rules:
    /// - a wall-clock time that occurs once fires at that instant;
    /// - one inside a spring-forward gap fires at the first instant after the gap (once, however
    ///   many gap times match);
    /// - one that occurs twice (fall-back overlap) fires at its first occurrence only, unless the
    ///   schedule runs every hour (hour field `*`): then at both, since both are real instants
    ///   its wall clock matches.
    fn next_after(&self, tz: Tz, after: i64) -> Option<i64> {
        let la = local(tz, after)?;
        let horizon = self.horizon(la.year());
        // First occurrences (and gap ends) never decrease as the wall-clock time grows, so the
        // first one past `after` is the earliest of them. Wall times of an overlap whose first
        // occurrence already passed are stepped over (at most one overlap's worth).
        let mut first = None;
        let mut from = la + TimeDelta::seconds(1);
        for _ in 0..200_000 {
            let Some(l) = self.next_match(from, horizon) else {
                break;
            };
            let t = first_instant(tz, l)?;
            if t > after {
                first = Some(t);
                break;
            }
            from = l + TimeDelta::seconds(1);
        }
        let second = if self.hour == ALL_HOURS {
            self.second_occurrence_after(tz, after, horizon)
        } else {
            None
        };
        match (first, second) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// For hourly-or-finer schedules: the earliest second occurrence (after a fall-back) of a
    /// matching wall time that is later than `after`. Only an overlap around `after` can hold
    /// one earlier than the next first occurrence; zones change offset at most once a day.
    fn second_occurrence_after(&self, tz: Tz, after: i64, horizon: i32) -> Option<i64> {
        const W: i64 = 26 * 3600;
        let o_cur = offset(tz, after)?;
        let (lo, hi) = if offset(tz, after - W)? > o_cur {
            (after - W, after)
        } else if offset(tz, after + W)? < o_cur {
            (after, after + W)
        } else {
            return None;
        };
        let o_old = offset(tz, lo)?;
        let t = bisect(lo, hi, |x| offset(tz, x) != Some(o_old));
        let o_new = offset(tz, t)?;
        if o_new >= o_old || after >= t + (o_old - o_new) {
            return None;
        }
        // The wall times [t + o_new, t + o_old) occur twice; the second time at L - o_new.
        let start = naive(after.max(t - 1) + 1 + o_new)?;
        let end = naive(t + o_old)?;
        let l = self.next_match(start, horizon)?;
        (l < end).then(|| l.and_utc().timestamp() - o_new)
    }
}

fn naive(secs: i64) -> Option<NaiveDateTime> {
    DateTime::from_timestamp(secs, 0).map(|t| t.naive_utc())
}

fn local(tz: Tz, secs: i64) -> Option<NaiveDateTime> {
    DateTime::from_timestamp(secs, 0).map(|t| t.with_timezone(&tz).naive_local())
}

fn offset(tz: Tz, secs: i64) -> Option<i64> {
    let utc = naive(secs)?;
    Some(i64::from(
        tz.offset_from_utc_datetime(&utc).fix().local_minus_utc(),
    ))
}

/// The smallest `x` in `(lo, hi]` with `pred(x)`, given `!pred(lo)` and `pred(hi)`.
fn bisect(mut lo: i64, mut hi: i64, pred: impl Fn(i64) -> bool) -> i64 {
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// The instant a wall-clock time fires at: itself, its earlier occurrence when it occurs twice,
/// or the first instant after the gap when it does not exist.
fn first_instant(tz: Tz, l: NaiveDateTime) -> Option<i64> {
    match tz.from_local_datetime(&l) {
        LocalResult::Single(t) => Some(t.timestamp()),
        LocalResult::Ambiguous(a, b) => Some(a.timestamp().min(b.timestamp())),
        LocalResult::None => {
            // Offsets lie within -12 h..+14 h: 15 h either side brackets the jump.
            let lu = l.and_utc().timestamp();
            let (lo, hi) = (lu - 15 * 3600, lu + 15 * 3600);
            Some(bisect(lo, hi, |x| local(tz, x).is_some_and(|n| n >= l)))
        }
    }
}

impl Schedule {
    /// Parses `expr` and reads it in `tz`; a `CRON_TZ=` prefix must name the same zone.
    ///
    /// # Errors
    /// The expression is not of the dialect, or its prefix names another zone.
    pub fn new(expr: &str, tz: Tz) -> Result<Schedule, CronError> {
        let p = parse(expr)?;
        if let Some(z) = p.prefix_zone.filter(|z| *z != tz) {
            return err(format!(
                "the expression's CRON_TZ={} and the task's time zone {} disagree; give one",
                z.name(),
                tz.name()
            ));
        }
        Ok(p.in_zone(tz))
    }

    pub fn zone(&self) -> Tz {
        self.tz
    }

    /// The first fire time strictly after `after_ms` (unix ms), in unix ms; `None` when it
    /// never fires again (within nine years, or past its last year).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let after = after_ms.div_euclid(1000);
        match &self.kind {
            Kind::Every(d) => after.checked_add(*d).map(|s| s * 1000),
            Kind::Fields(f) => f.next_after(self.tz, after).map(|s| s * 1000),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    fn fires(expr: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
        let tz = zone(tz).unwrap();
        let s = Schedule::new(expr, tz).unwrap();
        let mut t = ms(from);
        let mut out = Vec::new();
        for _ in 0..n {
            t = s.next_after(t).unwrap();
            out.push(local_rfc3339(t, tz).unwrap());
        }
        out
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_are_restricted() {
        // Issue 10.3: Sunday 2026-11-29; the 13th OR a Friday, as in the reference.
        assert_eq!(
            fires("0 0 12 13 * FRI", "UTC", "2026-11-29T00:00:00Z", 3),
            [
                "2026-12-04T12:00:00+00:00",
                "2026-12-11T12:00:00+00:00",
                "2026-12-13T12:00:00+00:00"
            ]
        );
        // A star in either day field means AND: every Friday, or every 13th.
        assert_eq!(
            fires("0 0 12 ? * FRI", "UTC", "2026-11-29T00:00:00Z", 1),
            ["2026-12-04T12:00:00+00:00"]
        );
        assert_eq!(
            fires("0 0 12 13 * *", "UTC", "2026-11-29T00:00:00Z", 1),
            ["2026-12-13T12:00:00+00:00"]
        );
        // "*/2" is not a star (robfig): OR with Monday.
        assert_eq!(
            fires("0 0 0 */2 * MON", "UTC", "2026-11-29T00:00:00Z", 2),
            ["2026-11-30T00:00:00+00:00", "2026-12-01T00:00:00+00:00"]
        );
    }

    #[test]
    fn zones_read_the_expression_in_local_time() {
        assert_eq!(
            fires(
                "0 0 9 * * MON-FRI",
                "Asia/Shanghai",
                "2026-11-29T00:00:00Z",
                2
            ),
            ["2026-11-30T09:00:00+08:00", "2026-12-01T09:00:00+08:00"]
        );
        assert_eq!(
            fires(
                "CRON_TZ=Asia/Shanghai 0 0 9 * * *",
                "Asia/Shanghai",
                "2026-11-29T00:00:00Z",
                1
            ),
            ["2026-11-29T09:00:00+08:00"]
        );
        let e = Schedule::new("CRON_TZ=Asia/Tokyo 0 0 9 * * *", zone("UTC").unwrap()).unwrap_err();
        assert!(e.0.contains("disagree"), "{e}");
    }

    #[test]
    fn spring_forward_gap_fires_once_at_the_first_instant_after_it() {
        // America/New_York, 2026-03-08: 02:00 EST -> 03:00 EDT.
        assert_eq!(
            fires(
                "0 30 2 * * *",
                "America/New_York",
                "2026-03-07T12:00:00-05:00",
                3
            ),
            [
                "2026-03-08T03:00:00-04:00",
                "2026-03-09T02:30:00-04:00",
                "2026-03-10T02:30:00-04:00"
            ]
        );
        // Every 15 minutes: 02:00..02:45 do not exist and 03:00 does: one fire at 03:00.
        assert_eq!(
            fires(
                "0 */15 * * * *",
                "America/New_York",
                "2026-03-08T01:40:00-05:00",
                3
            ),
            [
                "2026-03-08T01:45:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T03:15:00-04:00"
            ]
        );
    }

    #[test]
    fn fall_back_overlap_fires_fixed_times_once_and_hourly_at_every_instant() {
        // America/New_York, 2026-11-01: 02:00 EDT -> 01:00 EST; 01:xx happens twice.
        assert_eq!(
            fires(
                "0 30 1 * * *",
                "America/New_York",
                "2026-10-31T12:00:00-04:00",
                2
            ),
            ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]
        );
        assert_eq!(
            fires(
                "0 30 * * * *",
                "America/New_York",
                "2026-11-01T00:00:00-04:00",
                4
            ),
            [
                "2026-11-01T00:30:00-04:00",
                "2026-11-01T01:30:00-04:00",
                "2026-11-01T01:30:00-05:00",
                "2026-11-01T02:30:00-05:00"
            ]
        );
        // From inside the repeated hour: the second pass goes on minute by minute.
        assert_eq!(
            fires(
                "0 * * * * *",
                "America/New_York",
                "2026-11-01T01:58:30-04:00",
                4
            ),
            [
                "2026-11-01T01:59:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T01:01:00-05:00",
                "2026-11-01T01:02:00-05:00"
            ]
        );
        assert_eq!(
            fires(
                "0 * * * * *",
                "America/New_York",
                "2026-11-01T01:58:30-05:00",
                2
            ),
            ["2026-11-01T01:59:00-05:00", "2026-11-01T02:00:00-05:00"]
        );
    }

    #[test]
    fn descriptors_names_steps_and_years() {
        assert_eq!(
            fires("@weekly", "UTC", "2026-11-29T00:00:00Z", 1),
            ["2026-12-06T00:00:00+00:00"]
        );
        assert_eq!(
            fires("@every 1h30m", "UTC", "2026-11-29T00:00:00.400Z", 1),
            ["2026-11-29T01:30:00+00:00"]
        );
        assert_eq!(
            fires(
                "10/20 0 0 1 jan-Mar,DEC *",
                "UTC",
                "2026-11-29T00:00:00Z",
                4
            ),
            [
                "2026-12-01T00:00:10+00:00",
                "2026-12-01T00:00:30+00:00",
                "2026-12-01T00:00:50+00:00",
                "2027-01-01T00:00:10+00:00"
            ]
        );
        assert_eq!(
            fires("0 0 0 1 1 * 2030", "UTC", "2026-11-29T00:00:00Z", 1),
            ["2030-01-01T00:00:00+00:00"]
        );
        let s = Schedule::new("0 0 0 1 1 * 2027", zone("UTC").unwrap()).unwrap();
        assert_eq!(s.next_after(ms("2027-01-01T00:00:00Z")), None);
        let s = Schedule::new("0 0 0 30 2 *", zone("UTC").unwrap()).unwrap();
        assert_eq!(s.next_after(0), None);
    }

    #[test]
    fn what_the_reference_refuses_is_refused_with_a_reason() {
        for (expr, why) in [
            ("0 12 * * *", "5 fields"),
            ("0 0 0 * * 7", "above the maximum 6"),
            ("0 0 0 L * *", "Quartz"),
            ("0 0 0 ? * FRI#3", "Quartz"),
            ("0 0 0 * * FRI-MON", "starts after it ends"),
            ("60 * * * * *", "above the maximum 59"),
            ("0 0 0 0 * *", "below the minimum 1"),
            ("*/0 * * * * *", "at least 1"),
            ("0 0 0 * * monday", "not a number"),
            ("@Daily", "unknown descriptor"),
            ("@every 500ms", "at least 1s"),
            ("CRON_TZ=Mars/Olympus 0 0 0 * * *", "unknown time zone"),
            ("CRON_TZ=UTC", "followed by the schedule"),
            ("", "empty"),
            ("1-2-3 * * * * *", "more than one '-'"),
        ] {
            let e = parse(expr).unwrap_err();
            assert!(e.0.contains(why), "{expr:?}: {e}");
        }
        assert!(zone("Local").is_err());
    }
}
