//! The worker's GPU stage. Processing threads decode on the CPU and hand frames to one thread
//! that owns the device; it gathers what arrives into a batch (up to `batch` frames, waiting at
//! most `batch_wait` after the first), submits it, and while that batch computes gathers and
//! submits the next one — two batches in flight at most, one per buffer set. Each frame's
//! result goes back to the thread that sent it, which encodes and publishes as before, so
//! ordering per camera and the exactly-once release are untouched.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded};

use super::{Gpu, GpuOutput, Runner, Ticket};
use crate::ops::{Img, Pipeline};

type Reply = Sender<Result<GpuOutput, String>>;

struct Request {
    img: Img,
    reply: Reply,
}

/// Counters of the stage (exported as metrics).
#[derive(Default)]
pub struct StageStats {
    pub batches: prometheus_client::metrics::counter::Counter,
    pub frames: prometheus_client::metrics::counter::Counter,
    /// Frames whose batch failed (processed on the CPU instead).
    pub errors: prometheus_client::metrics::counter::Counter,
}

/// A processing thread's handle on the GPU stage.
#[derive(Clone)]
pub struct GpuClient {
    tx: Sender<Request>,
}

impl GpuClient {
    /// Runs the pipeline on `img` on the GPU; `Err` says why it could not (the caller falls
    /// back to the CPU for this frame).
    pub fn process(&self, img: Img) -> Result<GpuOutput, String> {
        let (reply, rx) = bounded(1);
        self.tx.send(Request { img, reply }).map_err(|_| "the GPU stage has stopped".to_owned())?;
        rx.recv().map_err(|_| "the GPU stage has stopped".to_owned())?
    }
}

/// Starts the stage's thread; it ends when every [`GpuClient`] is dropped.
pub fn spawn(gpu: Arc<Gpu>, pipeline: Pipeline, motion: bool, batch: usize, batch_wait: Duration, stats: Arc<StageStats>) -> std::io::Result<GpuClient> {
    let (tx, rx) = bounded::<Request>(batch.max(1) * 2);
    std::thread::Builder::new().name("gpu".into()).spawn(move || {
        let runner = Runner::new(gpu, pipeline, motion, batch);
        Stage { runner, rx, batch: batch.max(1), batch_wait, stats, inflight: VecDeque::new() }.run()
    })?;
    Ok(GpuClient { tx })
}

struct Stage {
    runner: Runner,
    rx: Receiver<Request>,
    batch: usize,
    batch_wait: Duration,
    stats: Arc<StageStats>,
    inflight: VecDeque<(Ticket, Vec<Reply>)>,
}

impl Stage {
    fn run(mut self) {
        loop {
            // With a batch on the GPU, take only what is already queued (its senders are
            // waiting for results, so nothing more may come); otherwise wait for work.
            let first = if self.inflight.is_empty() {
                match self.rx.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                }
            } else {
                match self.rx.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty) => {
                        self.finish_oldest();
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => {
                        while !self.inflight.is_empty() {
                            self.finish_oldest();
                        }
                        return;
                    }
                }
            };
            let mut reqs = vec![first];
            let deadline = Instant::now() + self.batch_wait;
            while reqs.len() < self.batch {
                match self.rx.recv_deadline(deadline) {
                    Ok(r) => reqs.push(r),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
            self.submit(reqs);
        }
    }

    fn submit(&mut self, reqs: Vec<Request>) {
        let mut groups: HashMap<(u32, u32, u8), Vec<Request>> = HashMap::new();
        for r in reqs {
            groups.entry((r.img.width, r.img.height, r.img.channels)).or_default().push(r);
        }
        for (size, mut group) in groups {
            let cap = match self.runner.capacity(size) {
                Ok(c) => c,
                Err(e) => {
                    self.fail(group.into_iter().map(|r| r.reply), &e.to_string());
                    continue;
                }
            };
            while !group.is_empty() {
                let rest = group.split_off(cap.min(group.len()));
                let chunk = std::mem::replace(&mut group, rest);
                // Two buffer sets per size: never more than two batches on the GPU.
                while self.inflight.len() >= 2 {
                    self.finish_oldest();
                }
                let frames: Vec<&Img> = chunk.iter().map(|r| &r.img).collect();
                let submitted = self.runner.submit(&frames);
                let replies: Vec<Reply> = chunk.into_iter().map(|r| r.reply).collect();
                match submitted {
                    Ok(t) => self.inflight.push_back((t, replies)),
                    Err(e) => self.fail(replies.into_iter(), &e.to_string()),
                }
            }
        }
    }

    fn finish_oldest(&mut self) {
        let Some((ticket, replies)) = self.inflight.pop_front() else { return };
        match self.runner.finish(ticket) {
            Ok(outs) => {
                self.stats.batches.inc();
                self.stats.frames.inc_by(outs.len() as u64);
                for (reply, out) in replies.into_iter().zip(outs) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(e) => self.fail(replies.into_iter(), &e.to_string()),
        }
    }

    fn fail(&self, replies: impl Iterator<Item = Reply>, why: &str) {
        tracing::warn!(error = why, "GPU batch failed; its frames are processed on the CPU");
        for r in replies {
            self.stats.errors.inc();
            let _ = r.send(Err(why.to_owned()));
        }
    }
}
