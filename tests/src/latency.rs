//! A slow link on loopback: every byte to and from a port arrives a set delay late, in order,
//! on connections that stay up — what a satellite or congested cellular uplink looks like to
//! TCP, as opposed to [`crate::netfault`]'s lost packets.
//!
//! The kernel's own delay (`tc qdisc … netem`) needs the `sch_netem` module, which this kind of
//! machine (a container) does not have; so the delay is a proxy in the test process. An
//! nftables `nat output` rule redirects every new local connection to `127.0.0.1:port` to the
//! proxy — clients under test keep the broker's address, and Kafka's metadata (which names the
//! broker's own port) needs no change — and the proxy connects on to the real port from
//! `127.0.0.2`, a source address the rule lets through. Each chunk read is written on after
//! the delay in force when it was read. Connections open before [`SlowLink::on_port`] are not
//! redirected: install it before the client starts, with no delay, and set one later. Needs
//! root (CAP_NET_ADMIN).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::netfault::nft;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The source address of the proxy's own connections to the real port (not redirected).
const PROXY_SOURCE: &str = "127.0.0.2";

/// Connections to one loopback port, delayed both ways; undone when dropped.
pub struct SlowLink {
    table: String,
    /// The one-way delay, in microseconds.
    delay_us: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SlowLink {
    /// From now on, new connections to `127.0.0.1:port` go through the proxy (no delay yet).
    pub fn on_port(port: u16) -> Result<Self> {
        let delay_us = Arc::new(AtomicU64::new(0));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        listener.set_nonblocking(true)?;
        let proxy_port = listener.local_addr()?.port();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let target: SocketAddr = ([127, 0, 0, 1], port).into();
        let d = delay_us.clone();
        let thread = std::thread::Builder::new().name(format!("slow-link-{port}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("proxy listener");
                tokio::select! {
                    _ = stopped => {}
                    _ = accept_loop(listener, target, d) => {}
                }
            });
        })?;
        let table = format!("framelink_slow_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let link = Self { table, delay_us, stop: Some(stop), thread: Some(thread) };
        let t = &link.table;
        nft(&format!(
            "table ip {t}\ndelete table ip {t}\ntable ip {t} {{\n  chain out {{\n    type nat hook output priority -100; policy accept;\n    ip saddr != {PROXY_SOURCE} ip daddr 127.0.0.1 tcp dport {port} redirect to :{proxy_port}\n  }}\n}}\n"
        ))?;
        Ok(link)
    }

    /// Every byte read from now on, either way, is written on `one_way` later.
    pub fn set_delay(&self, one_way: Duration) {
        self.delay_us.store(one_way.as_micros() as u64, Ordering::Relaxed);
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        let _ = nft(&format!("table ip {0}\ndelete table ip {0}\n", self.table));
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, delay_us: Arc<AtomicU64>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        let delay_us = delay_us.clone();
        tokio::spawn(async move {
            let Ok(server) = connect_from_proxy_source(target).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pump(cr, sw, delay_us.clone()), pump(sr, cw, delay_us));
        });
    }
}

async fn connect_from_proxy_source(target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{PROXY_SOURCE}:0").parse().expect("address"))?;
    socket.connect(target).await
}

/// Copies `from` to `to`, each chunk held until the delay in force when it was read has passed.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay_us: Arc<AtomicU64>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 || tx.send((Instant::now() + Duration::from_micros(delay_us.load(Ordering::Relaxed)), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A round trip through the slow link takes twice the one-way delay; the bytes arrive
    /// whole and in order; the client dials the real port; once dropped, connections go
    /// straight to the server again.
    #[test]
    fn a_round_trip_takes_twice_the_delay_and_keeps_the_bytes() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let echo = std::thread::spawn(move || {
            let (mut s, peer) = server.accept().unwrap();
            let mut buf = vec![0u8; 100_000];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
            let (_, direct) = server.accept().unwrap();
            (peer.ip().to_string(), direct.ip().to_string())
        });
        let link = SlowLink::on_port(port).unwrap();
        link.set_delay(Duration::from_millis(300));
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let t0 = std::time::Instant::now();
        c.write_all(&sent).unwrap();
        let mut got = vec![0u8; sent.len()];
        c.read_exact(&mut got).unwrap();
        let rtt = t0.elapsed();
        assert!(got == sent, "the bytes come back whole and in order");
        assert!(rtt >= Duration::from_millis(600), "two delays of 300 ms: {rtt:?}");
        drop(link);
        let _direct = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (proxied_from, direct_from) = echo.join().unwrap();
        assert_eq!(proxied_from, PROXY_SOURCE, "through the link, the server sees the proxy");
        assert_eq!(direct_from, "127.0.0.1", "after the drop, no redirect");
    }
}
