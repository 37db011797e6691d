//! Bodies of `POST /api/v1/tasks` (and the gRPC SubmitTask JSON): any bytes are a task spec
//! or a 4xx error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = etask::scheduler::api::TaskSpec::parse(data, etask::model::DeliveryPath::ALL);
});
