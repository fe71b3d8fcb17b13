//! framelink-worker as a library: config, decoding, image operations (CPU backend), motion
//! detection, per-frame processing, and the consumer-group loop.

pub mod alloc;
pub mod backend;
pub mod beat;
pub mod config;
pub mod consume;
pub mod decode;
pub mod decode_into;
pub mod gpu;
pub mod infer;
pub mod jobs_watch;
pub mod leaderless;
pub mod lossless;
pub mod metrics;
pub mod motion;
pub mod offsets;
pub mod ops;
pub mod poll;
pub mod plane_ops;
pub mod planes;
pub mod pool;
pub mod region;
pub mod requantize;
pub mod process;
pub mod publish;
pub mod run;
pub mod tile;
pub mod topic_partition;
pub mod tracker;
pub mod txn;
