//! The fd-3 result a script writes: any bytes, in any chunking, give a result or a
//! `result_error`, within the cap, never a panic.
#![no_main]

use etask::runner::result::ResultSink;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose where the pipe read splits and how small the cap is.
    let (split, cap, body) = match data {
        [a, b, rest @ ..] => (usize::from(*a), 64 + usize::from(*b) * 64, rest),
        _ => (0, 64, data),
    };
    let mut s = ResultSink::new(cap);
    let at = split.min(body.len());
    s.push(&body[..at]);
    s.push(&body[at..]);
    let _ = s.finish();
    let _ = etask::runner::result::parse_objects(body);
});
