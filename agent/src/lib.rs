//! framelink-agent as a library: the stages the binary wires together (sources, encoder,
//! spool, forwarder) and their config, so tests and benchmarks can drive them directly.

pub mod config;
pub mod encoder;
pub mod frame;
pub mod sequence;
pub mod source;
pub mod spool;
