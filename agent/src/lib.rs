//! framelink-agent as a library: the stages the binary wires together and their config, so
//! tests and benchmarks can drive them directly.
//!
//! ```text
//! camera threads ──(2 frames, drop when full)──► encoder threads ──► forwarder ──► Kafka
//!                                                                       │  ▲
//!                                                           link bad    ▼  │ drain
//!                                                                      spool (disk)
//! ```

pub mod config;
pub mod defaults;
pub mod drop_reason;
pub mod encoder;
pub mod forwarder;
pub mod frame;
pub mod http;
pub mod huge_pages;
pub mod metrics;
pub mod beat;
pub mod capture;
pub mod run;
pub mod sequence;
pub mod source;
pub mod spool;
