//! framelink-worker as a library: config, decoding, image operations (CPU backend), motion
//! detection, per-frame processing, and the consumer-group loop.

pub mod alloc;
pub mod bench;
pub mod config;
pub mod decode;
pub mod gpu;
pub mod metrics;
pub mod motion;
pub mod ops;
pub mod process;
pub mod publish;
pub mod tail;
pub mod tracker;
pub mod txn;
pub mod worker;
