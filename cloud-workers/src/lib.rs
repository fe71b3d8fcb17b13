//! framelink-worker as a library: config, image operations (CPU backend).

pub mod config;
pub mod ops;
