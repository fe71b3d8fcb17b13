//! The worker binary's tools besides `run`: `bench` (frames/s per op, CPU against GPU),
//! `bench-detect` (frames/s of a model) and `tail` (watch the fleet's results and events). They use the library as any client would.

pub mod bench;
pub mod bench_detect;
pub mod tail;
