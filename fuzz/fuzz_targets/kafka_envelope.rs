//! Kafka envelopes as agents and schedulers read them from the topics: any bytes parse to a
//! message or a dead-letter reason, never a panic; a dispatch that parses converts, is
//! checked by a verifier, and its canonical encoding is computed.
#![no_main]

use etask::delivery::kafka::wire::{self, ControlMsg, DispatchMsg, EventMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = wire::parse::<DispatchMsg>(Some(data)) {
        let mut d = d.into_dispatch();
        let me = etask::trust::NodeIdentity {
            pool: Some("default".into()),
            node: "n".into(),
        };
        let v = etask::trust::Verifier::trusting(&[[7u8; 32]]).unwrap_or_default();
        let _ = d.verify_and_open(&v, &me, &etask::trust::seal::OpenKeys::default());
        let _ = etask::trust::canonical::dispatch_bytes(&d.fields());
    }
    if let Ok(e) = wire::parse::<EventMsg>(Some(data)) {
        let _ = e.to_run_event();
    }
    let _ = wire::parse::<ControlMsg>(Some(data));
});
