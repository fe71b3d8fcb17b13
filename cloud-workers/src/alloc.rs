//! Keeps freed frame buffers in the process instead of handing them back to the kernel.
//! Called first thing by `framelink-worker`.
//!
//! The worker allocates and frees several multi-megabyte buffers per frame (decoded image, op
//! results, GPU read-back), at frame rate, from several threads. glibc's defaults return such
//! memory to the kernel as soon as the free top of a heap passes the trim threshold (or serve
//! it with mmap outright), so every new frame touches fresh pages: 1500 page faults per 1080p
//! RGB buffer. Measured on the H200 host (`framelink-worker bench`, GPU backend, 1080p
//! blur:1.5): copying results out of the read-back buffer took 3.5 ms per frame at batch 4+
//! against 0.55 ms at batch 1, all of it first-touch faults on the destination `Vec`s.
//! On the 2-core VM, one thread, decode -> op -> encode: 1.6–1.9x with the thresholds raised
//! (`scripts/bench-worker`). Raising them keeps freed frames for reuse: what is retained is
//! bounded by the process's own peak, not by the thresholds.
//!
//! Not applied to the agent: its edge bench (`cargo bench -p framelink-agent --bench
//! edge_pipeline`) showed no gain (agent / raw encode 0.89 and 0.86 tuned vs 0.87 default) and a
//! higher peak RSS (121–141 vs 111 MiB), which matters more on a small edge device.

/// Applies the tuning (glibc only; other allocators are left alone). Set
/// `FRAMELINK_MALLOC_DEFAULTS=1` to keep glibc's defaults (for comparison).
pub fn tune_for_frames() {
    if std::env::var_os("FRAMELINK_MALLOC_DEFAULTS").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before the worker's threads.
    unsafe {
        // The largest mmap threshold glibc accepts: 32 MiB on 64-bit (a 4K RGB frame fits),
        // 16 MiB on 32-bit ARM.
        let max = (4 << 20) * std::mem::size_of::<libc::c_long>();
        libc::mallopt(libc::M_MMAP_THRESHOLD, max as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}
