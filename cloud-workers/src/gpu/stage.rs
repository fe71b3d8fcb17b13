//! The worker's GPU stage. Processing threads decode on the CPU and hand frames to one thread
//! that owns the device; it gathers what arrives into a batch (up to `batch` frames, waiting at
//! most `batch_wait` after the first), submits it, and while that batch computes gathers and
//! submits the next one — two batches in flight at most, one per buffer set. Each frame's
//! result goes back to the thread that sent it, which encodes and publishes as before, so
//! ordering per camera and the exactly-once release are untouched.
//!
//! A 4:2:0 frame whose pipeline has a definition on the YUV planes ([`crate::plane_ops`]) is
//! sent as its three planes instead of RGB — half the bytes up and down — on two more lanes:
//! the luma plane through the luma pipeline, both chroma planes through the chroma pipeline
//! ([`crate::plane_ops::plane_pipelines`]). Each lane has its own [`Runner`]; a batch holds
//! images of one lane and one size.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded};

use super::{Gpu, GpuOutput, Runner, Ticket};
use crate::ops::{Img, Pipeline};

type Reply = Sender<Result<GpuOutput, String>>;
/// Width, height, channels.
type Shape = (u32, u32, u8);

/// Which runner an image goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Lane {
    /// A whole decoded frame (RGB or luma) through the pipeline.
    Frame = 0,
    /// A 4:2:0 frame's Y plane through the luma pipeline.
    Luma = 1,
    /// One of its chroma planes through the chroma pipeline.
    Chroma = 2,
}

struct Request {
    lane: Lane,
    img: Img,
    reply: Reply,
}

/// Counters of the stage (exported as metrics).
#[derive(Default)]
pub struct StageStats {
    /// Batches submitted (a frame sent as planes is in a luma and, most often, a chroma batch).
    pub batches: prometheus_client::metrics::counter::Counter,
    pub frames: prometheus_client::metrics::counter::Counter,
    /// Frames whose batch failed (processed on the CPU instead).
    pub errors: prometheus_client::metrics::counter::Counter,
}

/// A processing thread's handle on the GPU stage.
#[derive(Clone)]
pub struct GpuClient {
    tx: Sender<Request>,
    /// Whether the pipeline has plane definitions, and whether its chroma pipeline is empty
    /// (`sharpen` alone: the chroma planes need no round trip).
    planes: Option<bool>,
    stats: Arc<StageStats>,
}

impl GpuClient {
    /// Runs the pipeline on `img` on the GPU; `Err` says why it could not (the caller falls
    /// back to the CPU for this frame).
    pub fn process(&self, img: Img) -> Result<GpuOutput, String> {
        let rx = self.send(Lane::Frame, img)?;
        rx.recv().map_err(|_| stopped())?
    }

    /// Runs the pipeline's plane definitions on a 4:2:0 frame's planes (Y, Cb, Cr; see
    /// [`crate::plane_ops`]) and returns them in that order; `Err` as for [`Self::process`].
    /// A frame counts once in `gpu_frames` or `gpu_fallbacks`, whichever lane failed.
    pub fn process_planes(&self, planes: Vec<Img>) -> Result<Vec<Img>, String> {
        let r = self.planes_on_lanes(planes);
        match &r {
            Ok(_) => self.stats.frames.inc(),
            Err(_) => self.stats.errors.inc(),
        };
        r
    }

    fn planes_on_lanes(&self, planes: Vec<Img>) -> Result<Vec<Img>, String> {
        let chroma_unchanged = self.planes.ok_or("the pipeline has no definition on the YUV planes")?;
        if planes.len() != 3 {
            return Err(format!("{} planes, not Y, Cb and Cr", planes.len()));
        }
        // All are queued before waiting, so they can share batches with other frames'.
        let pending = planes
            .into_iter()
            .enumerate()
            .map(|(k, img)| match k {
                0 => self.send(Lane::Luma, img).map(Plane::Sent),
                _ if chroma_unchanged => Ok(Plane::Kept(img)),
                _ => self.send(Lane::Chroma, img).map(Plane::Sent),
            })
            .collect::<Result<Vec<_>, _>>()?;
        pending
            .into_iter()
            .map(|p| match p {
                Plane::Kept(img) => Ok(img),
                Plane::Sent(rx) => Ok(rx.recv().map_err(|_| stopped())??.img),
            })
            .collect()
    }

    fn send(&self, lane: Lane, img: Img) -> Result<Receiver<Result<GpuOutput, String>>, String> {
        let (reply, rx) = bounded(1);
        self.tx.send(Request { lane, img, reply }).map_err(|_| stopped())?;
        Ok(rx)
    }
}

/// A plane of a frame on its way: kept as it is (an empty chroma pipeline) or on a lane.
enum Plane {
    Kept(Img),
    Sent(Receiver<Result<GpuOutput, String>>),
}

fn stopped() -> String {
    "the GPU stage has stopped".to_owned()
}

/// Starts the stage's thread; it ends when every [`GpuClient`] is dropped.
pub fn spawn(gpu: Arc<Gpu>, pipeline: Pipeline, motion: bool, batch: usize, batch_wait: Duration, stats: Arc<StageStats>) -> std::io::Result<GpuClient> {
    // A frame is up to three requests (its planes).
    let (tx, rx) = bounded::<Request>(batch.max(1) * 6);
    let plane_pipelines = crate::plane_ops::plane_pipelines(&pipeline);
    let planes = plane_pipelines.as_ref().map(|(_, chroma)| chroma.0.is_empty());
    let client = GpuClient { tx, planes, stats: stats.clone() };
    std::thread::Builder::new().name("gpu".into()).spawn(move || {
        // Runners make nothing on the device before their first frame: unused lanes cost nothing
        // (without plane definitions the client sends nothing to theirs).
        let (luma, chroma) = plane_pipelines.unwrap_or_default();
        let runners = [Runner::new(gpu.clone(), pipeline, motion, batch), Runner::new(gpu.clone(), luma, false, batch), Runner::new(gpu, chroma, false, batch * 2)];
        Stage { runners, rx, batch: batch.max(1), batch_wait, stats, inflight: VecDeque::new() }.run()
    })?;
    Ok(client)
}

struct Stage {
    /// One per [`Lane`], indexed by it.
    runners: [Runner; 3],
    rx: Receiver<Request>,
    batch: usize,
    batch_wait: Duration,
    stats: Arc<StageStats>,
    inflight: VecDeque<(Lane, Ticket, Vec<Reply>)>,
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
            // `batch` frames: a frame sent as planes is three requests.
            while reqs.len() < self.batch * if reqs[0].lane == Lane::Frame { 1 } else { 3 } {
                match self.rx.recv_deadline(deadline) {
                    Ok(r) => reqs.push(r),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
            self.submit(reqs);
        }
    }

    fn submit(&mut self, reqs: Vec<Request>) {
        let mut groups: HashMap<(Lane, Shape), Vec<Request>> = HashMap::new();
        for r in reqs {
            groups.entry((r.lane, (r.img.width, r.img.height, r.img.channels))).or_default().push(r);
        }
        // Luma before chroma: a frame's planes come back in the order its thread waits for them.
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by_key(|((lane, _), _)| *lane as u8);
        for ((lane, size), mut group) in groups {
            let cap = match self.runners[lane as usize].capacity(size) {
                Ok(c) => c,
                Err(e) => {
                    self.fail(lane, group.into_iter().map(|r| r.reply), &e.to_string());
                    continue;
                }
            };
            while !group.is_empty() {
                let rest = group.split_off(cap.min(group.len()));
                let chunk = std::mem::replace(&mut group, rest);
                // Two buffer sets per size: never more than two batches of a lane on the GPU.
                while self.inflight.iter().filter(|(l, _, _)| *l == lane).count() >= 2 {
                    self.finish_oldest();
                }
                let frames: Vec<&Img> = chunk.iter().map(|r| &r.img).collect();
                let submitted = self.runners[lane as usize].submit(&frames);
                let replies: Vec<Reply> = chunk.into_iter().map(|r| r.reply).collect();
                match submitted {
                    Ok(t) => self.inflight.push_back((lane, t, replies)),
                    Err(e) => self.fail(lane, replies.into_iter(), &e.to_string()),
                }
            }
        }
    }

    fn finish_oldest(&mut self) {
        let Some((lane, ticket, replies)) = self.inflight.pop_front() else { return };
        match self.runners[lane as usize].finish(ticket) {
            Ok(outs) => {
                self.stats.batches.inc();
                // A frame sent as planes is counted once, by its client.
                if lane == Lane::Frame {
                    self.stats.frames.inc_by(outs.len() as u64);
                }
                for (reply, out) in replies.into_iter().zip(outs) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(e) => self.fail(lane, replies.into_iter(), &e.to_string()),
        }
    }

    fn fail(&self, lane: Lane, replies: impl Iterator<Item = Reply>, why: &str) {
        tracing::warn!(error = why, "GPU batch failed; its frames are processed on the CPU");
        for r in replies {
            if lane == Lane::Frame {
                self.stats.errors.inc();
            }
            let _ = r.send(Err(why.to_owned()));
        }
    }
}
