//! Cron expressions as tasks carry them: parse, and for what parses, the next fire times in
//! a zone with DST, never a panic or an endless search.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(expr) = std::str::from_utf8(data) else {
        return;
    };
    let _ = etask::cron::parse(expr);
    let Ok(zone) = etask::cron::zone("Europe/Berlin") else {
        return;
    };
    if let Ok(s) = etask::cron::Schedule::new(expr, zone) {
        let mut t = 1_700_000_000_000;
        for _ in 0..3 {
            match s.next_after(t) {
                Some(n) => t = n,
                None => break,
            }
        }
    }
});
