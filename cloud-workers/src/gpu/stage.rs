//! The worker's GPU stage. Processing threads decode on the CPU and one thread owns the device:
//! it gathers frames into batches (up to `batch` frames, closing a batch `batch_wait` after its
//! first frame), submits each batch, and reads the results back; each frame's result goes back
//! to the thread that sent it, which encodes and publishes as before, so ordering per camera and
//! the exactly-once release are untouched.
//!
//! Frames are written straight into the mapped upload buffer of their batch, by their own
//! thread: a thread first asks for a place in a batch ([`GpuClient::reserve_planes`], a
//! [`Lease`]), decodes the frame's planes into it (libjpeg-turbo writes them there,
//! [`crate::decode_into`]), and gives the lease back; a batch goes once its deadline has passed
//! (or it is full) and every place in it was given back. A frame that fails to decode leaves a
//! hole: the GPU computes whatever was there and the result is dropped. So the stage thread
//! copies nothing in — the copies that limited it to about 2 000 1080p frames/s (docs/gpu.md)
//! are spread over the processing threads, and the planes' decode writes them anyway. Frames
//! that come decoded already (RGB, or planes of odd sizes) are copied into their place by their
//! thread ([`GpuClient::process`], [`GpuClient::process_planes`]). Results come back the same
//! way: each thread gets its frame's part of the mapped read-back buffer and copies it out
//! itself ([`super::runner::Mapped`]); the buffer set is used again once all have.
//!
//! A 4:2:0 frame whose pipeline has a definition on the YUV planes ([`crate::plane_ops`]) goes
//! as its three planes instead of RGB — half the bytes up and down — on two more lanes: the
//! luma plane through the luma pipeline, both chroma planes through the chroma pipeline
//! ([`crate::plane_ops::plane_pipelines`]). Each lane has its own [`Runner`]; a batch holds
//! images of one lane and one size, in one of the runner's buffer sets (up to
//! [`super::runner::MAX_SLOTS`] per size: batches being written, on the GPU, or read back).
//!
//! The protocol never waits in a circle: a thread holds places only between getting them (all
//! of a frame's at once, or none) and giving them back, and waits for nothing from the stage in
//! between; the stage waits only for the GPU, so every batch it has submitted finishes, and a
//! thread copies its results out as soon as it has them (waiting for nothing), so every buffer
//! set read back comes free. When no buffer set of a size is free, a request for a place waits
//! (in order of arrival) until one is: its batch written, submitted, finished and copied out.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};

use super::runner::{Mapped, Open, Region};
use super::{Gpu, GpuOutput, Runner, Ticket};
use crate::ops::{Img, Pipeline};

/// Width, height, channels.
type Shape = (u32, u32, u8);
/// How often the stage looks whether the GPU is done with a batch while none of its threads
/// asks for anything.
const POLL_EVERY: Duration = Duration::from_micros(200);
/// How long a batch may stay on the GPU before the stage stops polling and waits for it (up to
/// as long again, [`Runner::finish_mapped`]) — a device that hangs without saying it is lost
/// fails its batches (their frames go to the CPU) instead of holding their threads for ever.
const GPU_PATIENCE: Duration = Duration::from_secs(60);
/// A frame's results: which of its parts, and the part's result (in the read-back buffer).
type Results = Sender<(usize, Result<Mapped, String>)>;
/// Where a place's result goes: its frame's channel and which part of the frame it is.
type Target = (Results, usize);

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

enum Msg {
    /// Places for a frame's parts (each on a lane, of a shape): all of them, or an error.
    Reserve(Reserve),
    /// A place is written (`written`) or given back as it was (a hole).
    Done { batch: u64, z: usize, written: bool },
}

struct Reserve {
    parts: Vec<(Lane, Shape)>,
    reply: Sender<Result<Vec<Place>, String>>,
    results: Results,
}

/// A place in a batch: frame `z` of batch `batch`, and its memory.
struct Place {
    batch: u64,
    z: usize,
    region: Region,
}

/// Counters of the stage (exported as metrics).
#[derive(Default)]
pub struct StageStats {
    /// Batches submitted (a frame sent as planes is in a luma and, most often, a chroma batch).
    pub batches: prometheus_client::metrics::counter::Counter,
    pub frames: prometheus_client::metrics::counter::Counter,
    /// Frames whose batch failed (processed on the CPU instead).
    pub errors: prometheus_client::metrics::counter::Counter,
    /// Frames whose planes were decoded straight into the upload buffer (of `frames`).
    pub in_place: prometheus_client::metrics::counter::Counter,
}

/// A processing thread's handle on the GPU stage.
#[derive(Clone)]
pub struct GpuClient {
    tx: Sender<Msg>,
    /// Whether the pipeline has plane definitions, and whether its chroma pipeline is empty
    /// (`sharpen` alone: the chroma planes need no round trip).
    planes: Option<bool>,
    stats: Arc<StageStats>,
}

/// Places in batches for one frame's parts, held by the thread that writes them. Give them
/// back with [`Lease::commit`] once written; dropped, they are given back unwritten (holes).
pub struct Lease {
    tx: Sender<Msg>,
    places: Vec<Place>,
    results: Receiver<(usize, Result<Mapped, String>)>,
    given_back: bool,
}

impl Lease {
    /// Part `k`'s memory (in the order the parts were asked for). Kept to this module: a
    /// region must stay with its lease (moved to another, it could be written after its batch
    /// has gone).
    fn region(&mut self, k: usize) -> &mut Region {
        &mut self.places[k].region
    }

    /// Copies `data` into part `k`'s place.
    pub fn write(&mut self, k: usize, data: &[u8]) {
        self.region(k).write(data)
    }

    /// Says every part is written and waits for their results, in the order of the parts.
    /// Each is copied out of the read-back buffer as soon as it comes (the buffer set is free
    /// again once every thread has copied its part).
    pub fn commit(mut self) -> Result<Vec<GpuOutput>, String> {
        self.give_back(true);
        let mut outs: Vec<Option<GpuOutput>> = (0..self.places.len()).map(|_| None).collect();
        for _ in 0..outs.len() {
            let (k, out) = self.results.recv().map_err(|_| stopped())?;
            match out {
                Ok(m) => outs[k] = Some(m.copy_out()),
                Err(e) => {
                    // Results of the frame's other parts already sent would stay in the channel
                    // (keeping their buffer sets) until its last sender is gone: drop them now.
                    self.results.try_iter().for_each(drop);
                    return Err(e);
                }
            }
        }
        Ok(outs.into_iter().map(|o| o.expect("each part answered once")).collect())
    }

    fn give_back(&mut self, written: bool) {
        if !std::mem::replace(&mut self.given_back, true) {
            for p in &self.places {
                // A stage that has stopped no longer needs the place.
                let _ = self.tx.send(Msg::Done { batch: p.batch, z: p.z, written });
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.give_back(false);
    }
}

/// A 4:2:0 frame's places: the Y plane, and both chroma planes — in the upload buffer of the
/// chroma lane, or on the heap where the pipeline leaves chroma as it is.
pub struct PlanesLease {
    lease: Lease,
    /// (width, height) of the Y plane; the chroma planes are half of each.
    size: (u32, u32),
    kept: Option<[Vec<u8>; 2]>,
    stats: Arc<StageStats>,
}

impl PlanesLease {
    /// Where to write Y, Cb and Cr: pointer and length, rows unpadded (the stride is each
    /// plane's width).
    pub fn planes(&mut self) -> [(*mut u8, usize); 3] {
        let mut out = [(std::ptr::null_mut(), 0); 3];
        let y = self.lease.region(0);
        out[0] = (y.as_mut_ptr(), y.len());
        match &mut self.kept {
            Some([cb, cr]) => {
                out[1] = (cb.as_mut_ptr(), cb.len());
                out[2] = (cr.as_mut_ptr(), cr.len());
            }
            None => {
                for k in 1..3 {
                    let r = self.lease.region(k);
                    out[k] = (r.as_mut_ptr(), r.len());
                }
            }
        }
        out
    }

    /// The (width, height) of each plane, Y first.
    pub fn plane_sizes(&self) -> [(u32, u32); 3] {
        let (w, h) = self.size;
        [(w, h), (w / 2, h / 2), (w / 2, h / 2)]
    }

    /// Says the planes are written and waits for the pipeline's planes, Y, Cb, Cr. The frame
    /// counts once in `gpu_frames` (and `gpu_frames_in_place`) or `gpu_fallbacks`.
    pub fn commit(self) -> Result<Vec<Img>, String> {
        let PlanesLease { lease, size: (w, h), kept, stats } = self;
        let r = lease.commit().map(|outs| {
            let mut planes: Vec<Img> = outs.into_iter().map(|o| o.img).collect();
            if let Some([cb, cr]) = kept {
                planes.push(Img::new(w / 2, h / 2, 1, cb));
                planes.push(Img::new(w / 2, h / 2, 1, cr));
            }
            planes
        });
        match &r {
            Ok(_) => {
                stats.frames.inc();
                stats.in_place.inc();
            }
            Err(_) => {
                stats.errors.inc();
            }
        }
        r
    }
}

impl GpuClient {
    /// Runs the pipeline on `img` on the GPU; `Err` says why it could not (the caller falls
    /// back to the CPU for this frame). The frame is copied into its place on this thread.
    pub fn process(&self, img: Img) -> Result<GpuOutput, String> {
        let mut lease = self.reserve(vec![(Lane::Frame, (img.width, img.height, img.channels))]).inspect_err(|_| {
            self.stats.errors.inc();
        })?;
        lease.write(0, &img.data);
        let mut outs = lease.commit()?;
        Ok(outs.remove(0))
    }

    /// Places for a 4:2:0 frame's planes of `width`×`height` (both even) luma pixels, to decode
    /// straight into; `Err` as for [`Self::process`] (counted in `gpu_fallbacks`).
    pub fn reserve_planes(&self, (width, height): (u32, u32)) -> Result<PlanesLease, String> {
        let r = self.reserve_planes_uncounted((width, height));
        if r.is_err() {
            self.stats.errors.inc();
        }
        r
    }

    fn reserve_planes_uncounted(&self, (w, h): (u32, u32)) -> Result<PlanesLease, String> {
        let chroma_unchanged = self.planes.ok_or("the pipeline has no definition on the YUV planes")?;
        if w % 2 != 0 || h % 2 != 0 || w == 0 || h == 0 {
            return Err(format!("{w}x{h} planes are not whole 4:2:0 chroma cells"));
        }
        let chroma = (w / 2, h / 2, 1);
        let mut parts = vec![(Lane::Luma, (w, h, 1))];
        let kept = if chroma_unchanged {
            let len = (w / 2) as usize * (h / 2) as usize;
            Some([vec![0u8; len], vec![0u8; len]])
        } else {
            parts.extend([(Lane::Chroma, chroma), (Lane::Chroma, chroma)]);
            None
        };
        let lease = self.reserve(parts)?;
        Ok(PlanesLease { lease, size: (w, h), kept, stats: self.stats.clone() })
    }

    /// Runs the pipeline's plane definitions on a 4:2:0 frame's planes (Y, Cb, Cr; see
    /// [`crate::plane_ops`]) and returns them in that order; `Err` as for [`Self::process`].
    /// The planes are copied into their places on this thread (a frame decoded elsewhere; see
    /// [`Self::reserve_planes`] to decode into them). A frame counts once in `gpu_frames` or
    /// `gpu_fallbacks`, whichever lane failed.
    pub fn process_planes(&self, planes: Vec<Img>) -> Result<Vec<Img>, String> {
        let r = self.copy_planes(planes);
        match &r {
            Ok(_) => self.stats.frames.inc(),
            Err(_) => self.stats.errors.inc(),
        };
        r
    }

    fn copy_planes(&self, planes: Vec<Img>) -> Result<Vec<Img>, String> {
        let [y, cb, cr] = <[Img; 3]>::try_from(planes).map_err(|p| format!("{} planes, not Y, Cb and Cr", p.len()))?;
        let (w, h) = (y.width, y.height);
        if y.channels != 1 || [&cb, &cr].iter().any(|c| (c.width, c.height, c.channels) != (w.div_ceil(2), h.div_ceil(2), 1)) {
            return Err(format!("planes of {}x{}, {}x{} and {}x{} are not a 4:2:0 frame's", w, h, cb.width, cb.height, cr.width, cr.height));
        }
        // An odd-sized frame: its planes do not make whole chroma cells, so each is its own
        // image (the same as the places of an even frame, sized differently).
        let chroma_unchanged = self.planes.ok_or("the pipeline has no definition on the YUV planes")?;
        let mut parts = vec![(Lane::Luma, (w, h, 1))];
        if !chroma_unchanged {
            parts.extend([(Lane::Chroma, (cb.width, cb.height, 1)); 2]);
        }
        let mut lease = self.reserve(parts)?;
        lease.write(0, &y.data);
        if chroma_unchanged {
            let mut outs = lease.commit()?;
            return Ok(vec![outs.remove(0).img, cb, cr]);
        }
        lease.write(1, &cb.data);
        lease.write(2, &cr.data);
        Ok(lease.commit()?.into_iter().map(|o| o.img).collect())
    }

    fn reserve(&self, parts: Vec<(Lane, Shape)>) -> Result<Lease, String> {
        let (reply, granted) = bounded(1);
        let (results, rx) = bounded(parts.len());
        self.tx.send(Msg::Reserve(Reserve { parts, reply, results })).map_err(|_| stopped())?;
        let places = granted.recv().map_err(|_| stopped())??;
        Ok(Lease { tx: self.tx.clone(), places, results: rx, given_back: false })
    }
}

fn stopped() -> String {
    "the GPU stage has stopped".to_owned()
}

/// Starts the stage's thread; it ends when every [`GpuClient`] and [`Lease`] is dropped.
pub fn spawn(gpu: Arc<Gpu>, pipeline: Pipeline, motion: bool, batch: usize, batch_wait: Duration, stats: Arc<StageStats>) -> std::io::Result<GpuClient> {
    // Unbounded: each processing thread has at most one request and a frame's places in it.
    let (tx, rx) = unbounded::<Msg>();
    let plane_pipelines = crate::plane_ops::plane_pipelines(&pipeline);
    let planes = plane_pipelines.as_ref().map(|(_, chroma)| chroma.0.is_empty());
    let client = GpuClient { tx, planes, stats: stats.clone() };
    std::thread::Builder::new().name("gpu".into()).spawn(move || {
        // Runners make nothing on the device before their first frame: unused lanes cost nothing
        // (without plane definitions the client sends nothing to theirs).
        let (luma, chroma) = plane_pipelines.unwrap_or_default();
        let runners = [Runner::new(gpu.clone(), pipeline, motion, batch), Runner::new(gpu.clone(), luma, false, batch), Runner::new(gpu, chroma, false, batch * 2)];
        Stage { runners, rx, batch_wait, stats, batches: HashMap::new(), filling: HashMap::new(), next_id: 0, inflight: VecDeque::new(), waiting: VecDeque::new() }.run()
    })?;
    Ok(client)
}

/// A batch being written.
struct Batch {
    lane: Lane,
    shape: Shape,
    open: Open,
    /// Per place handed out, where its result goes (`None`: a hole).
    targets: Vec<Option<Target>>,
    /// Places handed out and not given back yet.
    out: usize,
    closes_at: Instant,
    /// Takes no more places (full, or past its deadline).
    closed: bool,
}

/// A batch on the GPU.
struct InFlight {
    lane: Lane,
    shape: Shape,
    ticket: Ticket,
    /// As [`Batch::targets`], less trailing holes.
    targets: Vec<Option<Target>>,
    since: Instant,
}

struct Stage {
    /// One per [`Lane`], indexed by it.
    runners: [Runner; 3],
    rx: Receiver<Msg>,
    batch_wait: Duration,
    stats: Arc<StageStats>,
    batches: HashMap<u64, Batch>,
    /// The batch taking places, per lane and shape.
    filling: HashMap<(Lane, Shape), u64>,
    next_id: u64,
    /// Batches submitted, oldest first.
    inflight: VecDeque<InFlight>,
    /// Requests for places that no buffer set could take yet, in order of arrival.
    waiting: VecDeque<Reserve>,
}

impl Stage {
    fn run(mut self) {
        loop {
            self.close_and_submit(Instant::now());
            self.serve_waiting();
            // With batches on the GPU: finish the oldest once the GPU is done with it (its
            // threads wait for it), meanwhile serve requests — threads ask for a place before
            // they decode, so decoding goes on while the GPU works. Look again shortly while
            // batches are on the GPU, or while a request waits for a buffer set whose results
            // threads are copying out (they say nothing when done); otherwise wait for work or
            // the next deadline.
            if let Some(b) = self.inflight.front()
                && (self.runners[b.lane as usize].is_done(&b.ticket) || b.since.elapsed() > GPU_PATIENCE)
            {
                self.finish_oldest();
                continue;
            }
            // A request that failed after its place closed a batch gave that place back as a
            // hole (serve_waiting): the batch is complete now and goes at once.
            if self.batches.values().any(|b| b.closed && b.out == 0) {
                continue;
            }
            let poll = !self.inflight.is_empty() || (!self.waiting.is_empty() && self.runners.iter().any(|r| r.reading()));
            let next = self.batches.values().filter(|b| !b.closed).map(|b| b.closes_at).min();
            let got = match (poll, next) {
                (true, _) => self.rx.recv_timeout(POLL_EVERY),
                (false, Some(at)) => self.rx.recv_deadline(at),
                (false, None) => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let msg = match got {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match msg {
                Msg::Reserve(r) => self.waiting.push_back(r),
                Msg::Done { batch, z, written } => self.given_back(batch, z, written),
            }
        }
        // Every client and lease is gone: every place was given back.
        for b in self.batches.values_mut() {
            b.closed = true;
        }
        self.close_and_submit(Instant::now());
        while !self.inflight.is_empty() {
            self.finish_oldest();
        }
    }

    fn given_back(&mut self, batch: u64, z: usize, written: bool) {
        let Some(b) = self.batches.get_mut(&batch) else { return };
        b.out = b.out.saturating_sub(1);
        if !written {
            b.targets[z] = None;
        }
    }

    /// Closes the batches whose deadline has passed and submits each closed batch whose places
    /// are all back (one with only holes is given back to its runner unrun).
    fn close_and_submit(&mut self, now: Instant) {
        for b in self.batches.values_mut() {
            if !b.closed && now >= b.closes_at {
                b.closed = true;
            }
        }
        self.filling.retain(|_, id| self.batches.get(id).is_some_and(|b| !b.closed));
        let ready: Vec<u64> = self.batches.iter().filter(|(_, b)| b.closed && b.out == 0).map(|(id, _)| *id).collect();
        let mut ready: Vec<Batch> = ready.into_iter().filter_map(|id| self.batches.remove(&id)).collect();
        // Luma before chroma: a frame's planes come back in the order its thread waits for them
        // (it takes them in any order, but the GPU then returns whole frames sooner).
        ready.sort_by_key(|b| b.lane as u8);
        for b in ready {
            let runner = &mut self.runners[b.lane as usize];
            if b.targets.iter().all(Option::is_none) {
                runner.release(b.open);
                continue;
            }
            // Trailing holes are not run.
            let mut targets = b.targets;
            while targets.last().is_some_and(Option::is_none) {
                targets.pop();
            }
            match runner.submit_open(b.open, targets.len()) {
                Ok(ticket) => self.inflight.push_back(InFlight { lane: b.lane, shape: b.shape, ticket, targets, since: now }),
                Err(e) => self.fail(b.lane, targets, &e.to_string()),
            }
        }
    }

    /// Hands out places to the waiting requests, in order, while there is room for them.
    fn serve_waiting(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        // Sets of every lane whose results are all copied out come free (a lane nobody asks
        // for now would keep its sets counted as being read, and the stage polling).
        for r in &mut self.runners {
            r.reclaim_all();
        }
        while let Some(r) = self.waiting.pop_front() {
            // Room for every part first: a request that got some places and not others would
            // leave holes each time it is tried.
            match self.room_for(&r.parts) {
                Ok(true) => {}
                Ok(false) => {
                    self.waiting.push_front(r);
                    return;
                }
                Err(e) => {
                    let _ = r.reply.send(Err(e));
                    continue;
                }
            }
            let mut places = Vec::with_capacity(r.parts.len());
            let mut outcome = Ok(true);
            for (k, &(lane, shape)) in r.parts.iter().enumerate() {
                match self.place(lane, shape, (r.results.clone(), k)) {
                    Ok(Some(p)) => places.push(p),
                    Ok(None) => {
                        outcome = Ok(false);
                        break;
                    }
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            match outcome {
                Ok(true) => {
                    if let Err(e) = r.reply.send(Ok(places)) {
                        // Its thread is gone: the places come back as holes.
                        if let Ok(places) = e.into_inner() {
                            for p in places {
                                self.given_back(p.batch, p.z, false);
                            }
                        }
                    }
                }
                // No room: the places it got become holes, and it waits for a buffer set.
                Ok(false) => {
                    for p in places {
                        self.given_back(p.batch, p.z, false);
                    }
                    self.waiting.push_front(r);
                    return;
                }
                Err(e) => {
                    for p in places {
                        self.given_back(p.batch, p.z, false);
                    }
                    let _ = r.reply.send(Err(e));
                }
            }
        }
    }

    /// Whether there is room for `parts` now (`Ok(false)`: once a buffer set comes free — its
    /// batch written, computed and copied out). `Err` where there never will be: no batch of a
    /// lane and shape is on its way and none can be made (the device failed and took the
    /// buffer sets with it).
    fn room_for(&mut self, parts: &[(Lane, Shape)]) -> Result<bool, String> {
        let mut need: HashMap<(Lane, Shape), usize> = HashMap::new();
        for &p in parts {
            *need.entry(p).or_default() += 1;
        }
        for ((lane, shape), k) in need {
            let (spare, reading, capacity) = self.runners[lane as usize].spare(shape).map_err(|e| e.to_string())?;
            let filling = self.filling.get(&(lane, shape)).and_then(|id| self.batches.get(id)).map_or(0, |b| capacity - b.targets.len());
            if filling + capacity * spare >= k {
                continue;
            }
            let on_gpu = self.inflight.iter().any(|b| (b.lane, b.shape) == (lane, shape));
            if on_gpu || reading > 0 || self.batches.values().any(|b| (b.lane, b.shape) == (lane, shape)) {
                return Ok(false);
            }
            return Err(format!("no buffer set left for {}x{}x{} images on the GPU", shape.0, shape.1, shape.2));
        }
        Ok(true)
    }

    /// A place for a part on `lane` of `shape`: in the batch taking them, or in a new one;
    /// `Ok(None)` where no buffer set of that size is free ([`Self::room_for`] says first).
    fn place(&mut self, lane: Lane, shape: Shape, target: Target) -> Result<Option<Place>, String> {
        if let Some(&id) = self.filling.get(&(lane, shape)) {
            let b = self.batches.get_mut(&id).expect("a filling batch exists");
            let z = b.targets.len();
            // SAFETY: place z is handed out once (the next one is z + 1), and the batch goes only
            // when it is given back.
            let region = unsafe { b.open.region(z) };
            b.targets.push(Some(target));
            b.out += 1;
            if b.targets.len() == b.open.capacity() {
                b.closed = true;
                self.filling.remove(&(lane, shape));
            }
            return Ok(Some(Place { batch: id, z, region }));
        }
        let Some(open) = self.runners[lane as usize].open(shape).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let id = self.next_id;
        self.next_id += 1;
        // SAFETY: as above, for the first place of a new batch.
        let region = unsafe { open.region(0) };
        let closed = open.capacity() == 1;
        if !closed {
            self.filling.insert((lane, shape), id);
        }
        self.batches.insert(id, Batch { lane, shape, open, targets: vec![Some(target)], out: 1, closes_at: Instant::now() + self.batch_wait, closed });
        Ok(Some(Place { batch: id, z: 0, region }))
    }

    fn finish_oldest(&mut self) {
        let Some(InFlight { lane, ticket, targets, .. }) = self.inflight.pop_front() else { return };
        match self.runners[lane as usize].finish_mapped(ticket) {
            Ok(outs) => {
                self.stats.batches.inc();
                for (target, out) in targets.into_iter().zip(outs) {
                    if let Some((tx, k)) = target {
                        // A frame sent as planes is counted once, by its client.
                        if lane == Lane::Frame {
                            self.stats.frames.inc();
                        }
                        let _ = tx.send((k, Ok(out)));
                    }
                }
            }
            Err(e) => self.fail(lane, targets, &e.to_string()),
        }
    }

    fn fail(&self, lane: Lane, targets: Vec<Option<Target>>, why: &str) {
        tracing::warn!(error = why, "GPU batch failed; its frames are processed on the CPU");
        for (tx, k) in targets.into_iter().flatten() {
            if lane == Lane::Frame {
                self.stats.errors.inc();
            }
            let _ = tx.send((k, Err(why.to_owned())));
        }
    }
}

#[cfg(test)]
mod tests {
    //! On Mesa lavapipe (CI installs it), as the parity tests.
    use super::*;
    use crate::plane_ops::{PlaneOps, Planes};

    fn gpu() -> Arc<Gpu> {
        let gpu = Gpu::open(crate::gpu::BackendChoice::Software, None).expect("a Vulkan adapter (CI installs mesa-vulkan-drivers for lavapipe)").expect("not the CPU backend");
        Arc::new(gpu)
    }

    /// Deterministic planes of a w×h 4:2:0 frame, different per `seed`.
    fn planes(seed: u32, (w, h): (u32, u32)) -> Vec<Img> {
        let plane = |k: u32, pw: u32, ph: u32| {
            let data = (0..pw * ph).map(|i| ((i * 7 + seed * 31 + k * 101) % 251) as u8 ^ ((i / pw) as u8).wrapping_mul(3)).collect();
            Img::new(pw, ph, 1, data)
        };
        vec![plane(0, w, h), plane(1, w / 2, h / 2), plane(2, w / 2, h / 2)]
    }

    fn on_cpu(pipeline: &Pipeline, planes: Vec<Img>) -> Vec<Img> {
        PlaneOps::new(pipeline, 85).unwrap().run(Planes { planes, subsamp: turbojpeg::Subsamp::Sub2x2 }, &mut Vec::new()).planes
    }

    /// Runs `f` on a thread of its own and returns what it does, or fails the test after
    /// `limit` (a stage that lost a wake-up makes its threads wait for ever: a failure, not a
    /// test run that never ends).
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(limit) {
            Ok(t) => t,
            Err(RecvTimeoutError::Timeout) => panic!("still waiting after {limit:?}"),
            // It panicked: its message is printed above.
            Err(RecvTimeoutError::Disconnected) => panic!("the test's thread panicked"),
        }
    }

    fn write(lease: &mut PlanesLease, planes: &[Img]) {
        for ((p, len), img) in lease.planes().into_iter().zip(planes) {
            assert_eq!(len, img.data.len());
            // SAFETY: the lease's place of `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(img.data.as_ptr(), p, len) };
        }
    }

    /// Six threads write frames of two sizes into their places and give some back unwritten
    /// (a frame that failed to decode): every written frame gets its own result (the CPU's
    /// planes), and the holes get nothing and break nothing.
    #[test]
    fn frames_written_in_place_by_many_threads_get_their_own_results_and_holes_are_skipped() {
        within(Duration::from_secs(120), frames_written_in_place_by_many_threads);
    }

    fn frames_written_in_place_by_many_threads() {
        let pipeline = Pipeline::parse("blur:1.5").unwrap();
        let stats = Arc::new(StageStats::default());
        let client = spawn(gpu(), pipeline.clone(), false, 4, Duration::from_millis(3), stats.clone()).unwrap();
        let written = std::thread::scope(|s| {
            let runs: Vec<_> = (0..6u32)
                .map(|t| {
                    let (client, pipeline) = (client.clone(), pipeline.clone());
                    s.spawn(move || {
                        let mut written = 0;
                        for i in 0..12u32 {
                            let size = if (t + i) % 3 == 0 { (48, 32) } else { (64, 40) };
                            let seed = t * 100 + i;
                            let frame = planes(seed, size);
                            let mut lease = client.reserve_planes(size).unwrap();
                            assert_eq!(lease.plane_sizes(), [size, (size.0 / 2, size.1 / 2), (size.0 / 2, size.1 / 2)]);
                            if i % 5 == 4 {
                                drop(lease);
                                continue;
                            }
                            write(&mut lease, &frame);
                            let got = lease.commit().unwrap();
                            assert!(got == on_cpu(&pipeline, frame), "thread {t} frame {i} ({size:?}): not its own result");
                            written += 1;
                        }
                        written
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).sum::<u64>()
        });
        assert_eq!(written, 6 * 10);
        assert_eq!((stats.frames.get(), stats.in_place.get(), stats.errors.get()), (written, written, 0));
        assert!(stats.batches.get() > 0);
    }

    /// When every buffer set of a size holds a batch whose places are still out, a request for
    /// another place waits (it is not handed memory in use, nor an error) and is served once one
    /// of those batches has gone.
    #[test]
    fn a_request_waits_while_every_buffer_set_is_being_written() {
        within(Duration::from_secs(120), a_request_waits_while_every_set_is_written);
    }

    fn a_request_waits_while_every_set_is_written() {
        let pipeline = Pipeline::parse("blur:1").unwrap();
        let stats = Arc::new(StageStats::default());
        // Batch 1: each frame fills a luma batch (and its chroma planes one chroma batch).
        let client = spawn(gpu(), pipeline.clone(), false, 1, Duration::from_millis(1), stats.clone()).unwrap();
        let size = (32, 16);
        let mut held: Vec<PlanesLease> = (0..super::super::runner::MAX_SLOTS).map(|_| client.reserve_planes(size).unwrap()).collect();
        let (tx, rx) = bounded(1);
        let waiter = {
            let (client, pipeline) = (client.clone(), pipeline.clone());
            std::thread::spawn(move || {
                let mut lease = client.reserve_planes(size).unwrap();
                tx.send(()).unwrap();
                let frame = planes(999, size);
                write(&mut lease, &frame);
                assert!(lease.commit().unwrap() == on_cpu(&pipeline, frame), "the waiting frame's result");
            })
        };
        assert!(matches!(rx.recv_timeout(Duration::from_millis(500)), Err(RecvTimeoutError::Timeout)), "a place was handed out while every buffer set was in use");
        let mut first = held.remove(0);
        let frame = planes(0, size);
        write(&mut first, &frame);
        let want = on_cpu(&pipeline, frame);
        // Its batch goes; once it is back, the waiting request gets that buffer set.
        assert!(first.commit().unwrap() == want);
        rx.recv_timeout(Duration::from_secs(30)).expect("the waiting request was served");
        waiter.join().unwrap();
        for (k, mut lease) in held.into_iter().enumerate() {
            let frame = planes(k as u32 + 1, size);
            write(&mut lease, &frame);
            assert!(lease.commit().unwrap() == on_cpu(&pipeline, frame), "held frame {k}");
        }
        assert_eq!((stats.frames.get(), stats.errors.get()), (super::super::runner::MAX_SLOTS as u64 + 1, 0));
    }

    /// A request that fails after one of its places closed a batch (here: no buffer set for
    /// its chroma planes could be opened) gives that place back as a hole; the batch is then
    /// complete and goes at once — the frame already in it gets its result without waiting for
    /// a message or a deadline (the batches' deadline here is an hour).
    #[test]
    fn a_batch_closed_by_a_request_that_then_failed_goes_at_once() {
        within(Duration::from_secs(60), || {
            let pipeline = Pipeline::parse("blur:1").unwrap();
            let stats = Arc::new(StageStats::default());
            // Two luma planes a batch, four chroma planes (two frames').
            let client = spawn(gpu(), pipeline.clone(), false, 2, Duration::from_secs(3600), stats).unwrap();
            // A size no other test uses: opening its chroma batches is made to fail below.
            let size = (46, 18);
            let chroma = (23, 9, 1);
            let parts = vec![(Lane::Luma, (46, 18, 1)), (Lane::Chroma, chroma), (Lane::Chroma, chroma)];
            // Frame A: the luma batch's first place, the chroma batch's first two, written.
            let frame_a = planes(1, size);
            let mut a = client.reserve(parts.clone()).unwrap();
            for (k, p) in frame_a.iter().enumerate() {
                a.write(k, &p.data);
            }
            a.give_back(true);
            // Two more chroma planes fill the chroma batch, which goes.
            let frame_b = planes(2, size);
            let mut b = client.reserve(vec![(Lane::Chroma, chroma); 2]).unwrap();
            b.write(0, &frame_b[1].data);
            b.write(1, &frame_b[2].data);
            let b = b.commit().unwrap();
            let want_b = on_cpu(&pipeline, frame_b);
            assert!(b[0].img == want_b[1] && b[1].img == want_b[2], "the second chroma planes' results");
            // Frame C takes the luma batch's last place (closing it) and then finds no chroma
            // buffer set: it is refused, and its luma place is a hole.
            *super::super::runner::FAIL_OPEN_OF.lock().unwrap() = Some(chroma);
            let c = client.reserve(parts.clone());
            *super::super::runner::FAIL_OPEN_OF.lock().unwrap() = None;
            let Err(e) = c else { panic!("frame C got places though no chroma batch could be opened") };
            assert!(e.contains("injected"), "{e}");
            // Frame A's luma batch went without waiting for its deadline.
            let got: Vec<Img> = a.commit().unwrap().into_iter().map(|o| o.img).collect();
            assert!(got == on_cpu(&pipeline, frame_a), "frame A's results");
        });
    }
}
