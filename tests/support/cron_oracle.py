#!/usr/bin/env python3
"""Independent reference for ETask's cron dialect and DST rules (README "Cron").

Shares no code with src/cron.rs: it enumerates wall-clock days by brute force and maps each
matching wall time to instants with Python's zoneinfo (the host's tz database, not the one
compiled into etask). Reads a JSON list of {"expr", "zone", "after", "n"} (after in unix
seconds) on stdin and prints, for each, the next n fire instants in unix seconds.
"""
import json
import re
import sys
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()
DAYS = "sun mon tue wed thu fri sat".split()
# (lowest, highest, names) of second, minute, hour, day of month, month, day of week, year
FIELDS = [(0, 59, None), (0, 59, None), (0, 23, None), (1, 31, None), (1, 12, MONTHS),
          (0, 6, DAYS), (1970, 2099, None)]
DESCRIPTORS = {
    "@yearly": "0 0 0 1 1 *", "@annually": "0 0 0 1 1 *", "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0", "@daily": "0 0 0 * * *", "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6, "ns": 1e-9}


def value(tok, lo, names):
    if tok.isdigit():
        return int(tok)
    return names.index(tok.lower()) + lo


def field(text, lo, hi, names):
    """Set of allowed values, and whether the field is a star (decides AND vs OR of days)."""
    values, star = set(), False
    for item in (i for i in text.split(",") if i):
        rng, slash, step = item.partition("/")
        step = int(step) if slash else 1
        if rng in ("*", "?"):
            a, b = lo, hi
            star = star or step == 1
        elif "-" in rng:
            x, y = rng.split("-")
            a, b = value(x, lo, names), value(y, lo, names)
        else:
            a = value(rng, lo, names)
            b = hi if slash else a
        values.update(range(a, b + 1, step))
    return values, star


class Cron:
    def __init__(self, expr, zone):
        expr = expr.strip()
        for prefix in ("CRON_TZ=", "TZ="):
            if expr.startswith(prefix):
                zone, expr = expr[len(prefix):].split(None, 1)
        self.zone = ZoneInfo(zone)
        self.every = None
        if expr.startswith("@every "):
            total = 0.0
            for num, unit in re.findall(r"([0-9.]+)(h|ms|m|s|us|ns)", expr[7:]):
                total += float(num) * UNITS[unit]
            self.every = int(total)
            return
        parts = DESCRIPTORS.get(expr, expr).split()
        f = [field(p, *FIELDS[i]) for i, p in enumerate(parts)]
        self.sec, self.min, self.hour = (sorted(f[i][0]) for i in range(3))
        (self.dom, dom_star), (self.month, _), (self.dow, dow_star) = f[3], f[4], f[5]
        self.both = dom_star or dow_star
        self.years = f[6][0] if len(f) > 6 else None
        self.every_hour = len(self.hour) == 24

    def day_ok(self, d):
        if self.years is not None and d.year not in self.years:
            return False
        if d.month not in self.month:
            return False
        dom, dow = d.day in self.dom, d.isoweekday() % 7 in self.dow
        return (dom and dow) if self.both else (dom or dow)

    def local(self, u):
        return datetime.fromtimestamp(u, self.zone).replace(tzinfo=None)

    def instants(self, wall):
        """The instants a matching wall time fires at, by the README's DST rules."""
        u0 = int(wall.replace(tzinfo=self.zone, fold=0).timestamp())
        u1 = int(wall.replace(tzinfo=self.zone, fold=1).timestamp())
        if self.local(u0) == wall and self.local(u1) == wall:
            if u0 == u1:
                return [u0]
            first, second = min(u0, u1), max(u0, u1)
            return [first, second] if self.every_hour else [first]
        # Not a wall time of this zone (spring forward): the first instant after the gap.
        t = min(u0, u1)
        while self.local(t + 60) < wall:
            t += 60
        while self.local(t) < wall:
            t += 1
        return [t]

    def next_after(self, after):
        if self.every is not None:
            return after + self.every
        # Offsets near `after` bound where a wall time's instants can lie.
        offs = [self.zone.utcoffset(datetime.fromtimestamp(after + h * 3600, timezone.utc)
                                    .replace(tzinfo=None)).total_seconds()
                for h in range(-60, 61)]
        lo_off, hi_off = min(offs), max(offs)
        epoch = datetime(1970, 1, 1)
        start = (self.local(after) - timedelta(days=2)).date()
        best = None
        for n in range(0, 366 * 10):
            d = start + timedelta(days=n)
            day0 = (datetime(d.year, d.month, d.day) - epoch).total_seconds()
            if best is not None and day0 - 14 * 3600 > best:
                break
            if not self.day_ok(d):
                continue
            for h in self.hour:
                for m in self.min:
                    for s in self.sec:
                        wall_s = day0 + h * 3600 + m * 60 + s
                        if wall_s - lo_off <= after:
                            continue  # every instant of this wall time is <= after
                        if best is not None and wall_s - hi_off > best:
                            break
                        wall = datetime(d.year, d.month, d.day, h, m, s)
                        for u in self.instants(wall):
                            if u > after and (best is None or u < best):
                                best = u
        return best


def main():
    out = []
    for q in json.load(sys.stdin):
        c = Cron(q["expr"], q["zone"])
        t, fires = q["after"], []
        for _ in range(q["n"]):
            t = c.next_after(t)
            if t is None:
                break
            fires.append(t)
        out.append(fires)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
