//! Fault injection for tests: `FRAMELINK_TEST_FATAL_ERROR_AFTER=N` makes librdkafka raise a
//! fatal producer error (as an idempotence sequence error after a leader change would) once a
//! component has had N outputs acknowledged. Read by both binaries.
//! `FRAMELINK_TEST_HANG_SEND_OFFSETS_AFTER=N` (the worker, exactly-once) makes the call that
//! sends the offsets of the transaction after the N-th committed one block for good, as
//! librdkafka's `send_offsets_to_transaction` does when it waits for a dead group coordinator
//! (confluentinc/librdkafka#5456). `FRAMELINK_TEST_LEADERLESS_FILE=PATH` (the worker) records a
//! leaderless partition report, as librdkafka's "new leader-1 not found in cache" log line does
//! (confluentinc/librdkafka#5430), once PATH exists. Never set any of them in production.

use rdkafka::ClientContext;
use rdkafka::client::Client;

/// The variable's value, when set to a number.
pub fn fatal_error_after() -> Option<u64> {
    std::env::var("FRAMELINK_TEST_FATAL_ERROR_AFTER").ok().and_then(|v| v.parse().ok())
}

/// `FRAMELINK_TEST_HANG_SEND_OFFSETS_AFTER`, when set to a number.
pub fn hang_send_offsets_after() -> Option<u64> {
    std::env::var("FRAMELINK_TEST_HANG_SEND_OFFSETS_AFTER").ok().and_then(|v| v.parse().ok())
}

/// `FRAMELINK_TEST_LEADERLESS_FILE`, when set.
pub fn leaderless_file() -> Option<std::path::PathBuf> {
    std::env::var_os("FRAMELINK_TEST_LEADERLESS_FILE").map(Into::into)
}

/// Blocks the calling thread for good (a librdkafka call that never returns).
pub fn hang(what: &str) -> ! {
    tracing::warn!(call = what, "FRAMELINK_TEST_HANG_SEND_OFFSETS_AFTER: this call now blocks for good.");
    loop {
        std::thread::park();
    }
}

/// Raises a fatal error on `client` (`rd_kafka_test_fatal_error`).
pub fn inject_fatal_error<C: ClientContext>(client: &Client<C>) {
    tracing::warn!("FRAMELINK_TEST_FATAL_ERROR_AFTER: injecting a fatal producer error.");
    let reason = c"injected by FRAMELINK_TEST_FATAL_ERROR_AFTER";
    // SAFETY: a live client handle and a NUL-terminated string; librdkafka copies the reason.
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(client.native_ptr(), rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER, reason.as_ptr());
    }
}
