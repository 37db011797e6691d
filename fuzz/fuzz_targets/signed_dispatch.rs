//! Signature and sealed-value text from the wire: any string is refused or accepted by the
//! verifier and the opener without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let p = etask::runner::Program::shell("true");
    let f = etask::trust::DispatchFields {
        execution_id: 1,
        attempt: 1,
        task_id: 1,
        pool: None,
        node: None,
        program: &p,
        timeout_ms: None,
        shard_index: 0,
        shard_total: 1,
        issued_at: 0,
        expires_at: i64::MAX,
    };
    let me = etask::trust::NodeIdentity {
        pool: None,
        node: "n".into(),
    };
    if let Ok(v) = etask::trust::Verifier::trusting(&[[9u8; 32]]) {
        let _ = v.check_dispatch(&f, Some(text), &me, 0);
    }
    let keys = etask::trust::seal::OpenKeys::new(&[[3u8; 32]]);
    let _ = keys.open(text);
});
