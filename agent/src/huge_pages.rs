//! Keeping the agent's memory small on kernels that back every large anonymous mapping with
//! transparent huge pages (`/sys/kernel/mm/transparent_hugepage/enabled` = `always`: the
//! default of Debian's arm64 and amd64 kernels).
//!
//! The agent allocates some large zeroed buffers that it touches only here and there — sled's
//! ~40 statistics histograms of 512 KiB each, which it writes a few counters into — and with
//! huge pages every first write makes a whole 2 MiB page resident instead of 4 KiB. Measured on
//! the aarch64 agent at 1080p in an arm64 Debian guest (bench/footprint_vm.py): 36–41 MiB
//! median (44–47 peak), growing as more histograms get touched; 16.7–19.9 MiB median (peak
//! 20.0) with huge pages off for the agent. So by
//! default the agent asks the kernel not to use them for it (`prctl(PR_SET_THP_DISABLE)`, Linux
//! 3.15+, for the whole process); `device.huge_pages = true` leaves the system's setting.

/// Turns transparent huge pages off for this process. An error (a kernel without the
/// option) is returned for the caller to log: the agent runs the same, with more memory.
#[cfg(target_os = "linux")]
pub fn disable() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only and changes a flag of
    // this process's memory map.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Whether transparent huge pages are off for this process (`None`: not known here).
#[cfg(target_os = "linux")]
pub fn disabled() -> Option<bool> {
    // SAFETY: as above; PR_GET_THP_DISABLE only reads the flag.
    let rc = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    // (Linux 6.18 added modes that read as other non-zero values.)
    (rc >= 0).then_some(rc != 0)
}

#[cfg(not(target_os = "linux"))]
pub fn disable() -> std::io::Result<()> {
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn disabled() -> Option<bool> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The flag is set by `disable` and read back by the kernel's own query; the test process's
    /// flag is cleared again after.
    #[test]
    fn disable_sets_the_processs_no_huge_pages_flag() {
        let before = super::disabled();
        if before != Some(false) {
            // Inherited from whoever started the tests, or a kernel without the option.
            eprintln!("transparent huge pages already off for this process or not known ({before:?}): nothing to check");
            return;
        }
        super::disable().unwrap();
        let after = super::disabled();
        // SAFETY: as in `disable`, clearing the flag.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
        assert_eq!(after, Some(true));
    }
}
