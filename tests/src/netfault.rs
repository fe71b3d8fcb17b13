//! Network faults on loopback that are not a stopped process: packets to and from a port
//! silently dropped (no reset, no refusal: the peer's TCP just retransmits), a share of them
//! dropped at random, or the two alternating (a flapping link).
//!
//! Made with nftables (the kernel's own packet filter, driven by the `nft` command; Debian's
//! `nftables` package), so the clients under test see real TCP behaviour: retransmission
//! timers, stalled sockets, librdkafka's request timeouts. Rules hook `input`, where a dropped
//! packet leaves no trace for the sender (a drop in `output` would make the sender's
//! `connect` fail with EPERM, which is not what a dead network looks like). Each [`NetFault`]
//! owns one nftables table named after the process and an id, and deletes it when dropped, so
//! a panicking test leaves no rule behind. Needs root (CAP_NET_ADMIN).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A set of loopback ports whose packets this fault may drop.
pub struct NetFault {
    table: String,
    ports: Vec<u16>,
}

/// Runs an nftables script (`nft -f -`); its error names the script and nft's complaint.
pub(crate) fn nft(script: &str) -> Result<()> {
    let out = Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().and_then(|mut c| {
        use std::io::Write;
        c.stdin.take().expect("stdin").write_all(script.as_bytes())?;
        c.wait_with_output()
    });
    let out = out.context("running `nft` (Debian package nftables; scripts/bootstrap installs it)")?;
    if !out.status.success() {
        bail!("nft refused:\n{script}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl NetFault {
    /// A fault on these ports (both directions), inactive until [`NetFault::blackhole`] or
    /// [`NetFault::lossy`].
    pub fn on_ports(ports: &[u16]) -> Result<Self> {
        let table = format!("framelink_fault_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let f = Self { table, ports: ports.to_vec() };
        f.apply(None)?;
        Ok(f)
    }

    fn ports_set(&self) -> String {
        self.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
    }

    /// Replaces the table's rules: `None` lets everything through; `Some(p)` drops each packet
    /// to or from the ports with probability `p` percent (100: all of them).
    fn apply(&self, drop_percent: Option<u32>) -> Result<()> {
        let t = &self.table;
        let rule = match drop_percent {
            None => String::new(),
            Some(p) if p >= 100 => format!("tcp dport {{ {0} }} drop\n    tcp sport {{ {0} }} drop", self.ports_set()),
            Some(p) => format!("tcp dport {{ {0} }} numgen random mod 100 < {p} drop\n    tcp sport {{ {0} }} numgen random mod 100 < {p} drop", self.ports_set()),
        };
        // Deleting and re-creating in one transaction: the switch is atomic.
        nft(&format!("table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n  chain input {{\n    type filter hook input priority -10; policy accept;\n    {rule}\n  }}\n}}\n"))
    }

    /// Every packet to or from the ports vanishes, silently.
    pub fn blackhole(&self) -> Result<()> {
        self.apply(Some(100))
    }

    /// Each packet to or from the ports is dropped with probability `percent` %.
    pub fn lossy(&self, percent: u32) -> Result<()> {
        self.apply(Some(percent))
    }

    /// Packets flow again.
    pub fn heal(&self) -> Result<()> {
        self.apply(None)
    }
}

impl Drop for NetFault {
    fn drop(&mut self) {
        let _ = nft(&format!("table inet {0}\ndelete table inet {0}\n", self.table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// A blackholed port neither answers nor refuses: a connect times out; healed, it connects.
    #[test]
    fn a_blackhole_is_silent_and_heals() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = NetFault::on_ports(&[addr.port()]).unwrap();
        fault.blackhole().unwrap();
        let e = TcpStream::connect_timeout(&addr, Duration::from_millis(700)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "no refusal, no reset: {e}");
        fault.heal().unwrap();
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        c.write_all(b"ok").unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");
        drop(fault);
        // The table is gone with the fault.
        let out = Command::new("nft").args(["list", "tables"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&out.stdout).contains(&format!("framelink_fault_{}_", std::process::id())));
    }
}
