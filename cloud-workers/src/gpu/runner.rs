//! Runs a pipeline over batches of same-sized frames on a [`Gpu`]: per input size, the passes,
//! their parameters and tables, made once, and sets of buffers and bind groups ("slots", made
//! as batches need them, up to [`MAX_SLOTS`]), each reused batch after batch.
//!
//! A batch is filled in a slot's mapped upload buffer: [`Runner::open`] hands out the mapped
//! memory as one [`Region`] per frame, which whoever decodes the frame writes (the processing
//! threads write their frames there themselves, the GPU stage copies nothing), and
//! [`Runner::submit_open`] sends it once every region is written.
//!
//! Results are read the same way: [`Runner::finish_mapped`] hands out each frame's part of the
//! mapped read-back buffer as a [`Mapped`], which the thread waiting for that frame copies out
//! ([`Mapped::copy_out`]); the slot is used again once every one of them is dropped. So the
//! stage thread copies nothing out either (at 1080p, 3 MB a frame at 4:2:0: serial copies that
//! one thread would have to make for every frame the GPU processes).

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::plan::{Pass, Size, plan};
use super::{Gpu, GpuError};
use crate::ops::{Img, Pipeline};

/// One frame's result.
#[derive(Debug)]
pub struct GpuOutput {
    pub img: Img,
    /// Motion detection's small luma image and its box factor (when motion is on).
    pub small: Option<(Img, u32)>,
}

/// A submitted batch; hand it back to [`Runner::finish`].
#[must_use]
pub struct Ticket {
    size: Size,
    slot: usize,
    n: usize,
    submission: wgpu::SubmissionIndex,
    /// The mapped part of the read-back buffer.
    range: std::ops::Range<u64>,
    /// 0 pending, 1 mapped, 2 failed.
    mapped: Arc<AtomicU8>,
}

impl Ticket {
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// Where a runner's time went (host side), summed over batches.
#[derive(Clone, Copy, Debug, Default)]
pub struct Times {
    pub batches: u64,
    pub frames: u64,
    /// Copying frames into the upload buffer (including waiting for it to be mapped).
    pub upload: Duration,
    /// Recording and submitting the commands.
    pub submit: Duration,
    /// Waiting for the GPU (transfers and compute).
    pub wait: Duration,
    /// Copying results out of the read-back buffer ([`Runner::finish`]; the GPU stage's
    /// threads copy their own, and it counts nothing here).
    pub readback: Duration,
}

/// Buffer sets per input size at most: batches being filled, submitted or read back at once.
pub const MAX_SLOTS: usize = 8;

/// What a slot is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// Its upload buffer is mapped (or being mapped again) and no batch holds it.
    Free,
    /// A batch is being written into its upload buffer ([`Open`]).
    Open,
    /// Submitted; [`Runner::finish`] frees it.
    InFlight,
    /// Read back, its results still being copied out ([`Mapped`]); free once all are dropped.
    Reading,
    /// Its batch failed while on the GPU (its buffers may still be mapping): never used again.
    Lost,
}

/// A batch being filled in a slot's mapped upload buffer; submit it with
/// [`Runner::submit_open`] or give it back with [`Runner::release`] (nothing then runs).
#[must_use]
pub(super) struct Open {
    size: Size,
    slot: usize,
    /// The mapping, kept until the batch is submitted or released.
    view: wgpu::BufferViewMut,
    buffer: wgpu::Buffer,
    base: NonNull<u8>,
    /// Bytes from one frame to the next, bytes of one input frame.
    stride: usize,
    frame_bytes: usize,
    capacity: usize,
}

impl Open {
    /// Frames it holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Frame `z`'s part of the mapped memory (`z` below [`Open::capacity`]).
    ///
    /// # Safety
    /// At most one region per `z` is handed out, and every region is written only before the
    /// batch is submitted or released (the GPU stage hands each place out once and submits a
    /// batch only when all of them were given back).
    pub(super) unsafe fn region(&self, z: usize) -> Region {
        assert!(z < self.capacity, "frame {z} of a batch of {}", self.capacity);
        // SAFETY: z * stride + frame_bytes is within the mapped upload buffer (capacity frames
        // of stride bytes).
        let ptr = unsafe { self.base.add(z * self.stride) };
        Region { ptr, len: self.frame_bytes, _buffer: self.buffer.clone() }
    }
}

/// One frame's part of a batch's mapped upload buffer (its input bytes: width × height ×
/// channels), written by one thread while the batch is open. The batch's owner must not submit
/// or release it before that thread says it is done (the GPU stage's protocol: a region is
/// given back, written or not, before its batch goes); the buffer itself stays alive while a
/// region exists.
pub(super) struct Region {
    ptr: NonNull<u8>,
    len: usize,
    _buffer: wgpu::Buffer,
}

// SAFETY: the region is plain mapped memory that only its holder writes (see above); the
// buffer handle is Send and Sync.
unsafe impl Send for Region {}

impl Region {
    pub fn len(&self) -> usize {
        self.len
    }
    /// Where to write (e.g. a decoder's output plane): `len` bytes. Mapped memory may be
    /// write-combined: write it, do not read it back.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Copies `data` (at most `len` bytes) to the start of the region.
    pub fn write(&mut self, data: &[u8]) {
        assert!(data.len() <= self.len, "{} bytes into a region of {}", data.len(), self.len);
        // SAFETY: within the region, which nothing else reads or writes while it is held.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr(), data.len()) }
    }
}

/// One frame's result in a batch's mapped read-back buffer, for the thread that waits for it:
/// copy it out ([`Mapped::copy_out`]) or drop it. The batch's buffer set is used again only
/// once every [`Mapped`] of it is gone, and the buffer stays alive while one exists.
#[must_use]
pub struct Mapped {
    img: (NonNull<u8>, usize, Size),
    /// Motion detection's small luma image, its size and box factor.
    small: Option<(NonNull<u8>, usize, Size, u32)>,
    /// The results of the batch still held; the last one out lets the slot be reused.
    left: Arc<AtomicUsize>,
    _buffer: wgpu::Buffer,
}

// SAFETY: read-only views of mapped memory that nothing writes, unmaps or reuses until every
// `Mapped` of the batch is dropped (`left`, Release here, Acquire in `Runner::reclaim_all`); the
// buffer handle is Send and Sync.
unsafe impl Send for Mapped {}

impl Mapped {
    /// The result, copied into memory of its own.
    pub fn copy_out(self) -> GpuOutput {
        let (ptr, len, size) = self.img;
        // SAFETY: `len` bytes of the mapped read-back buffer, unchanged while `self` lives.
        let data = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len) }.to_vec();
        let img = Img::new(size.w, size.h, size.ch as u8, data);
        let small = self.small.map(|(ptr, len, size, f)| {
            // SAFETY: as above.
            let data = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len) }.to_vec();
            (Img::new(size.w, size.h, 1, data), f)
        });
        GpuOutput { img, small }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        self.left.fetch_sub(1, Ordering::Release);
    }
}

/// A slot's read-back buffer while its results are being copied out.
struct Reading {
    /// The mapping the [`Mapped`] point into, kept until all are dropped.
    _view: wgpu::BufferView,
    left: Arc<AtomicUsize>,
}

struct Slot {
    used: Use,
    /// The mapped read-back buffer while [`Use::Reading`].
    reading: Option<Reading>,
    /// Persistent staging for uploads (mapped for writing between uses): wgpu's
    /// `Queue::write_buffer` allocates fresh staging memory on every call, which at batch
    /// sizes of many megabytes costs more than the transfer itself.
    upload: wgpu::Buffer,
    /// 0 = being mapped, 1 = mapped, 2 = mapping failed.
    upload_ready: Arc<AtomicU8>,
    /// Ping-pong buffers; the input is copied into `a`.
    a: wgpu::Buffer,
    b: wgpu::Buffer,
    small: Option<wgpu::Buffer>,
    readback: wgpu::Buffer,
    binds: Vec<wgpu::BindGroup>,
    motion_bind: Option<wgpu::BindGroup>,
}

/// Everything for one input size.
struct SizePlan {
    passes: Vec<Pass>,
    motion: Option<Pass>,
    out: Size,
    /// Words per frame in the ping-pong buffers (the largest image along the way).
    stride: u64,
    small_words: u64,
    capacity: usize,
    slots: Vec<Slot>,
    /// Workgroups (x, y) per pass, and for the motion pass.
    groups: Vec<(u32, u32)>,
    motion_groups: (u32, u32),
    /// The passes' tables and parameters (bound by every slot).
    aux: wgpu::Buffer,
    params: Vec<wgpu::Buffer>,
}

/// [`Runner::open`] fails for batches of this shape (what a device error or a failed mapping
/// does), for tests of the stage; each test that sets it uses a shape of its own.
#[cfg(test)]
pub(super) static FAIL_OPEN_OF: std::sync::Mutex<Option<(u32, u32, u8)>> = std::sync::Mutex::new(None);

pub struct Runner {
    gpu: Arc<Gpu>,
    pipeline: Pipeline,
    motion: bool,
    max_batch: usize,
    plans: HashMap<Size, SizePlan>,
    times: Times,
}

fn groups_for(out: Size) -> (u32, u32) {
    let wg = out.words().div_ceil(256).max(1);
    let x = wg.min(65535);
    (x as u32, wg.div_ceil(x) as u32)
}

impl Runner {
    /// `max_batch` frames at most per submission (fewer if the adapter's buffer limit says so).
    pub fn new(gpu: Arc<Gpu>, pipeline: Pipeline, motion: bool, max_batch: usize) -> Self {
        Self { gpu, pipeline, motion, max_batch: max_batch.max(1), plans: HashMap::new(), times: Times::default() }
    }

    /// Time spent so far, and resets the sums.
    pub fn take_times(&mut self) -> Times {
        std::mem::take(&mut self.times)
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// How many frames of `size` one submission takes.
    pub fn capacity(&mut self, size: (u32, u32, u8)) -> Result<usize, GpuError> {
        let s = Size { w: size.0, h: size.1, ch: size.2 as u32 };
        Ok(self.plan_for(s)?.capacity)
    }

    fn plan_for(&mut self, input: Size) -> Result<&mut SizePlan, GpuError> {
        if !self.plans.contains_key(&input) {
            let p = self.build(input)?;
            self.plans.insert(input, p);
        }
        Ok(self.plans.get_mut(&input).unwrap())
    }

    fn build(&self, input: Size) -> Result<SizePlan, GpuError> {
        let (passes, motion) = plan(&self.pipeline, input, self.motion)?;
        let out = passes.last().map_or(input, |p| p.output);
        let stride = passes.iter().map(|p| p.output.words()).chain([input.words()]).max().unwrap_or(1).max(1);
        let small_words = motion.as_ref().map_or(0, |m| m.output.words());
        let frame_bytes = stride * 4;
        let capacity = ((self.gpu.max_binding / frame_bytes) as usize).min(self.max_batch);
        if capacity == 0 {
            return Err(GpuError::Runtime(format!(
                "a {}x{}x{} frame needs {} MiB per buffer, above this adapter's {} MiB binding limit",
                input.w,
                input.h,
                input.ch,
                frame_bytes >> 20,
                self.gpu.max_binding >> 20
            )));
        }
        let dev = &self.gpu.device;
        use wgpu::BufferUsages as U;

        // Tables of all passes in one buffer; each pass's params point at its part.
        let mut aux: Vec<i32> = Vec::new();
        let mut params = Vec::new();
        let all: Vec<&Pass> = passes.iter().chain(motion.as_ref()).collect();
        for (k, p) in all.iter().enumerate() {
            let is_motion = motion.is_some() && k == all.len() - 1;
            let (gx, _) = groups_for(p.output);
            let out_stride = if is_motion { small_words } else { stride };
            let words: [u32; 16] = [
                p.input.w,
                p.input.h,
                p.input.ch,
                stride as u32,
                p.output.w,
                p.output.h,
                p.output.ch,
                out_stride as u32,
                p.args[0],
                p.args[1],
                p.args[2],
                p.args[3],
                aux.len() as u32,
                gx,
                0,
                0,
            ];
            aux.extend_from_slice(&p.table);
            let buf = dev.create_buffer(&wgpu::BufferDescriptor { label: Some(p.entry), size: 64, usage: U::UNIFORM | U::COPY_DST, mapped_at_creation: false });
            self.gpu.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&words));
            params.push(buf);
        }
        if aux.is_empty() {
            aux.push(0);
        }
        let aux_buf = dev.create_buffer(&wgpu::BufferDescriptor { label: Some("tables"), size: aux.len() as u64 * 4, usage: U::STORAGE | U::COPY_DST, mapped_at_creation: false });
        self.gpu.queue.write_buffer(&aux_buf, 0, bytemuck::cast_slice(&aux));

        let groups = passes.iter().map(|p| groups_for(p.output)).collect();
        let motion_groups = motion.as_ref().map_or((0, 0), |m| groups_for(m.output));
        self.gpu.check()?;
        Ok(SizePlan { passes, motion, out, stride, small_words, capacity, slots: Vec::new(), groups, motion_groups, aux: aux_buf, params })
    }

    /// A new set of buffers and bind groups for `p`'s batches, its upload buffer mapped.
    fn make_slot(gpu: &Gpu, p: &SizePlan) -> Slot {
        let dev = &gpu.device;
        use wgpu::BufferUsages as U;
        let bind = |src: &wgpu::Buffer, dst: &wgpu::Buffer, params: &wgpu::Buffer| {
            dev.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &gpu.layout,
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: src.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: dst.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 2, resource: p.aux.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 3, resource: params.as_entire_binding() },
                ],
            })
        };
        let big = p.capacity as u64 * p.stride * 4;
        let storage = |label| dev.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size: big, usage: U::STORAGE | U::COPY_DST | U::COPY_SRC, mapped_at_creation: false });
        let (a, b) = (storage("frames a"), storage("frames b"));
        let upload = dev.create_buffer(&wgpu::BufferDescriptor { label: Some("upload"), size: big, usage: U::MAP_WRITE | U::COPY_SRC, mapped_at_creation: true });
        let upload_ready = Arc::new(AtomicU8::new(1));
        let small = p.motion.as_ref().map(|_| {
            dev.create_buffer(&wgpu::BufferDescriptor { label: Some("small luma"), size: p.capacity as u64 * p.small_words * 4, usage: U::STORAGE | U::COPY_SRC, mapped_at_creation: false })
        });
        let readback = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: p.capacity as u64 * (p.out.words() + p.small_words) * 4,
            usage: U::MAP_READ | U::COPY_DST,
            mapped_at_creation: false,
        });
        let n = p.passes.len();
        let binds = (0..n).map(|k| if k % 2 == 0 { bind(&a, &b, &p.params[k]) } else { bind(&b, &a, &p.params[k]) }).collect();
        let last = if n % 2 == 0 { &a } else { &b };
        let motion_bind = small.as_ref().map(|s| bind(last, s, &p.params[n]));
        Slot { used: Use::Free, reading: None, upload, upload_ready, a, b, small, readback, binds, motion_bind }
    }

    /// A batch of frames of `size` to fill: a free slot's upload buffer, mapped (a new slot if
    /// none is free and there are fewer than [`MAX_SLOTS`]); `Ok(None)` when every slot is busy
    /// (finish or submit one first).
    pub(super) fn open(&mut self, size: (u32, u32, u8)) -> Result<Option<Open>, GpuError> {
        #[cfg(test)]
        if *FAIL_OPEN_OF.lock().unwrap() == Some(size) {
            return Err(GpuError::Runtime(format!("opening a {size:?} batch failed (injected by a test)")));
        }
        let size = Size { w: size.0, h: size.1, ch: size.2 as u32 };
        let gpu = self.gpu.clone();
        // A device that reported an error is not to be trusted (nor its slots to be freed).
        gpu.check()?;
        self.reclaim_all();
        let p = self.plan_for(size)?;
        let ix = match p.slots.iter().position(|s| s.used == Use::Free) {
            Some(ix) => ix,
            None if p.slots.len() < MAX_SLOTS => {
                let slot = Self::make_slot(&gpu, p);
                gpu.check()?;
                p.slots.push(slot);
                p.slots.len() - 1
            }
            None => return Ok(None),
        };
        let slot = &mut p.slots[ix];
        let started = Instant::now();
        // A freed slot's upload buffer is mapped again once its batch was read back; the GPU is
        // done with it, so the mapping completes at the next poll.
        while slot.upload_ready.load(Ordering::Acquire) == 0 {
            gpu.device.poll(wgpu::PollType::Poll).map_err(|e| GpuError::Runtime(format!("polling: {e}")))?;
            if started.elapsed() > Duration::from_secs(60) {
                return Err(GpuError::Runtime("the upload buffer was not mapped within 60 s".into()));
            }
            if slot.upload_ready.load(Ordering::Acquire) == 0 {
                std::thread::yield_now();
            }
        }
        if slot.upload_ready.load(Ordering::Acquire) != 1 {
            // Map it again for the next try; this batch fails.
            slot.upload_ready.store(0, Ordering::Release);
            let ready = slot.upload_ready.clone();
            slot.upload.map_async(wgpu::MapMode::Write, .., move |r| ready.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release));
            return Err(GpuError::Runtime("mapping the upload buffer failed".into()));
        }
        let mut view = slot.upload.get_mapped_range_mut(..).map_err(|e| GpuError::Runtime(format!("writing a batch: {e}")))?;
        let base = view.slice(..).as_raw_element_ptr();
        slot.used = Use::Open;
        let open = Open { size, slot: ix, view, buffer: slot.upload.clone(), base, stride: p.stride as usize * 4, frame_bytes: size.bytes() as usize, capacity: p.capacity };
        self.times.upload += started.elapsed();
        Ok(Some(open))
    }

    /// Gives back a batch without running it (none of its frames was written); the slot stays
    /// mapped for the next one.
    pub(super) fn release(&mut self, open: Open) {
        drop(open.view);
        if let Some(s) = self.plans.get_mut(&open.size).and_then(|p| p.slots.get_mut(open.slot)) {
            s.used = Use::Free;
        }
    }

    /// Uploads `frames` (all the same size, at most [`Runner::capacity`]), runs the pipeline
    /// and queues the read-back; returns without waiting for the GPU. (Copies the frames on
    /// this thread: the GPU stage has its frames written where [`Runner::open`] says instead.)
    pub fn submit(&mut self, frames: &[&Img]) -> Result<Ticket, GpuError> {
        let first = frames.first().ok_or_else(|| GpuError::Runtime("empty batch".into()))?;
        let size = (first.width, first.height, first.channels);
        if let Some(f) = frames.iter().find(|f| (f.width, f.height, f.channels) != size) {
            return Err(GpuError::Runtime(format!("batch mixes {}x{} and {}x{} frames", size.0, size.1, f.width, f.height)));
        }
        let open = self.open(size)?.ok_or_else(|| GpuError::Runtime(format!("all {MAX_SLOTS} buffer sets are busy")))?;
        if frames.len() > open.capacity {
            let cap = open.capacity;
            self.release(open);
            return Err(GpuError::Runtime(format!("batch of {} above the capacity of {cap}", frames.len())));
        }
        let started = Instant::now();
        for (z, f) in frames.iter().enumerate() {
            // SAFETY: one region per frame, written before the batch is submitted below.
            unsafe { open.region(z) }.write(&f.data);
        }
        self.times.upload += started.elapsed();
        self.submit_open(open, frames.len())
    }

    /// Runs the pipeline on the first `n` frames of a filled batch and queues the read-back;
    /// returns without waiting for the GPU. Every region of it must have been given back.
    pub(super) fn submit_open(&mut self, open: Open, n: usize) -> Result<Ticket, GpuError> {
        let gpu = self.gpu.clone();
        let Open { size, slot: slot_ix, view, .. } = open;
        drop(view);
        let p = self.plans.get_mut(&size).ok_or_else(|| GpuError::Runtime("a batch of an unknown plan".into()))?;
        let slot = &mut p.slots[slot_ix];
        slot.upload.unmap();
        slot.upload_ready.store(0, Ordering::Release);
        slot.used = Use::InFlight;
        if n == 0 || n > p.capacity {
            // Nothing to run: map it again and free the slot.
            Self::free(slot);
            return Err(GpuError::Runtime(format!("a batch of {n} frames (capacity {})", p.capacity)));
        }
        let slot = &p.slots[slot_ix];
        let used = n as u64 * p.stride * 4;
        let recording = Instant::now();
        let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("framelink batch") });
        enc.copy_buffer_to_buffer(&slot.upload, 0, &slot.a, 0, Some(used));
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("ops"), timestamp_writes: None });
            for (k, ps) in p.passes.iter().enumerate() {
                pass.set_pipeline(&gpu.pipelines[ps.entry]);
                pass.set_bind_group(0, &slot.binds[k], &[]);
                let (x, y) = p.groups[k];
                pass.dispatch_workgroups(x, y, n as u32);
            }
            if let (Some(m), Some(b)) = (&p.motion, &slot.motion_bind) {
                pass.set_pipeline(&gpu.pipelines[m.entry]);
                pass.set_bind_group(0, b, &[]);
                pass.dispatch_workgroups(p.motion_groups.0, p.motion_groups.1, n as u32);
            }
        }
        let last = if p.passes.len() % 2 == 0 { &slot.a } else { &slot.b };
        let out_bytes = p.out.words() * 4;
        for z in 0..n as u64 {
            enc.copy_buffer_to_buffer(last, z * p.stride * 4, &slot.readback, z * out_bytes, Some(out_bytes));
        }
        let small_at = p.capacity as u64 * out_bytes;
        if let Some(s) = &slot.small {
            enc.copy_buffer_to_buffer(s, 0, &slot.readback, small_at, Some(n as u64 * p.small_words * 4));
        }
        let submission = gpu.queue.submit([enc.finish()]);
        let mapped = Arc::new(AtomicU8::new(0));
        let m2 = mapped.clone();
        let read_end = small_at + n as u64 * p.small_words * 4;
        // Map the whole used range; frames first, then the small images after `small_at`.
        let range = if p.small_words > 0 { 0..read_end } else { 0..n as u64 * out_bytes };
        slot.readback.slice(range.clone()).map_async(wgpu::MapMode::Read, move |r| m2.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release));
        self.times.submit += recording.elapsed();
        Ok(Ticket { size, slot: slot_ix, n, submission, range, mapped })
    }

    /// Waits for a submitted batch and returns its frames in submission order, copied out on
    /// this thread.
    pub fn finish(&mut self, t: Ticket) -> Result<Vec<GpuOutput>, GpuError> {
        let mapped = self.finish_mapped(t)?;
        let copying = Instant::now();
        let outs = mapped.into_iter().map(Mapped::copy_out).collect();
        self.times.readback += copying.elapsed();
        self.reclaim_all();
        Ok(outs)
    }

    /// Waits for a submitted batch and returns its frames in submission order, where they lie
    /// in the mapped read-back buffer: the slot is used again once every one is dropped.
    pub(super) fn finish_mapped(&mut self, t: Ticket) -> Result<Vec<Mapped>, GpuError> {
        let (size, slot) = (t.size, t.slot);
        let r = self.finish_batch(t);
        if r.is_err()
            && let Some(s) = self.plans.get_mut(&size).and_then(|p| p.slots.get_mut(slot))
            && s.used == Use::InFlight
        {
            s.used = Use::Lost;
        }
        r
    }

    /// Slots of `size` a new batch could still have (free ones and ones not made yet), slots
    /// whose results are still being copied out (free soon), and frames per batch.
    pub(super) fn spare(&mut self, size: (u32, u32, u8)) -> Result<(usize, usize, usize), GpuError> {
        self.reclaim_all();
        let p = self.plan_for(Size { w: size.0, h: size.1, ch: size.2 as u32 })?;
        let free = p.slots.iter().filter(|s| s.used == Use::Free).count();
        let reading = p.slots.iter().filter(|s| s.used == Use::Reading).count();
        Ok((free + MAX_SLOTS.saturating_sub(p.slots.len()), reading, p.capacity))
    }

    /// Whether some buffer set is still taken by results handed out: being copied out, or all
    /// copied out and not yet reclaimed ([`Runner::reclaim_all`], which [`Runner::spare`] and
    /// [`Runner::open`] call too). It frees nothing itself: the stage asks it to decide whether
    /// to keep looking, and a set freed here (after the stage last looked for room) would leave
    /// a waiting request unserved while the stage slept until the next message.
    pub(super) fn reading(&self) -> bool {
        self.plans.values().any(|p| p.slots.iter().any(|s| s.used == Use::Reading))
    }

    /// Frees the slots whose results have all been copied out (every size's): the read-back
    /// buffer unmapped.
    pub(super) fn reclaim_all(&mut self) {
        for slot in self.plans.values_mut().flat_map(|p| p.slots.iter_mut()) {
            if slot.used == Use::Reading && slot.reading.as_ref().is_none_or(|r| r.left.load(Ordering::Acquire) == 0) {
                drop(slot.reading.take());
                slot.readback.unmap();
                slot.used = Use::Free;
            }
        }
    }

    /// Whether a submitted batch is read back and ready for [`Runner::finish`] without waiting
    /// (polls the device).
    pub fn is_done(&self, t: &Ticket) -> bool {
        let _ = self.gpu.device.poll(wgpu::PollType::Poll);
        t.mapped.load(Ordering::Acquire) != 0
    }

    fn finish_batch(&mut self, t: Ticket) -> Result<Vec<Mapped>, GpuError> {
        let gpu = self.gpu.clone();
        let waited = Instant::now();
        gpu.device
            .poll(wgpu::PollType::Wait { submission_index: Some(t.submission), timeout: Some(Duration::from_secs(60)) })
            .map_err(|e| GpuError::Runtime(format!("waiting for a batch: {e}")))?;
        gpu.check()?;
        self.times.wait += waited.elapsed();
        // (A batch that fails here loses its slot — the device is most likely lost, and its
        // read-back may still be mapping; its frames go to the CPU.)
        let p = self.plans.get_mut(&t.size).ok_or_else(|| GpuError::Runtime("ticket for an unknown plan".into()))?;
        if t.mapped.load(Ordering::Acquire) == 2 {
            // Not mapped: the slot can be used again.
            Self::free(&mut p.slots[t.slot]);
            return Err(GpuError::Runtime("mapping the read-back buffer failed".into()));
        }
        if t.mapped.load(Ordering::Acquire) != 1 {
            return Err(GpuError::Runtime("the read-back buffer was not mapped after the batch".into()));
        }
        let (out, capacity, small_words) = (p.out, p.capacity, p.small_words as usize);
        let out_bytes = (out.words() * 4) as usize;
        let frame_len = out.bytes() as usize;
        let small_at = capacity * out_bytes;
        // The motion pass's output size and box factor.
        let small_size = p.motion.as_ref().map(|m| (m.output, m.args[0]));
        let slot = &mut p.slots[t.slot];
        let view = slot.readback.slice(t.range.clone()).get_mapped_range().map_err(|e| GpuError::Runtime(format!("reading a batch back: {e}")))?;
        assert!(t.n * out_bytes <= view.len() && small_size.is_none_or(|(s, _)| small_at + (t.n - 1) * small_words * 4 + s.bytes() as usize <= view.len()), "the read-back range holds the batch");
        let base = NonNull::new(view.as_ptr().cast_mut()).expect("a mapped range is not null");
        let left = Arc::new(AtomicUsize::new(t.n));
        let outs = (0..t.n)
            .map(|z| {
                // SAFETY: within the mapped range (asserted above).
                let at = |offset: usize| unsafe { base.add(offset) };
                Mapped {
                    img: (at(z * out_bytes), frame_len, out),
                    small: small_size.map(|(s, f)| (at(small_at + z * small_words * 4), s.bytes() as usize, s, f)),
                    left: left.clone(),
                    _buffer: slot.readback.clone(),
                }
            })
            .collect();
        // The upload buffer is free now (mapped again for the next batch); the read-back buffer
        // once every result is copied out.
        Self::free(slot);
        slot.used = Use::Reading;
        slot.reading = Some(Reading { _view: view, left });
        self.times.batches += 1;
        self.times.frames += t.n as u64;
        Ok(outs)
    }

    /// A slot whose batch is done: its upload buffer mapped again (ready at a later poll).
    fn free(slot: &mut Slot) {
        let ready = slot.upload_ready.clone();
        slot.upload.map_async(wgpu::MapMode::Write, .., move |r| ready.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release));
        slot.used = Use::Free;
    }

    /// Convenience for tests and benches: runs any number of frames (grouped by size, in
    /// batches) and returns results in input order.
    pub fn run(&mut self, frames: &[Img]) -> Result<Vec<GpuOutput>, GpuError> {
        let mut out: Vec<Option<GpuOutput>> = (0..frames.len()).map(|_| None).collect();
        let mut by_size: HashMap<(u32, u32, u8), Vec<usize>> = HashMap::new();
        for (i, f) in frames.iter().enumerate() {
            by_size.entry((f.width, f.height, f.channels)).or_default().push(i);
        }
        for (size, idx) in by_size {
            let cap = self.capacity(size)?;
            for chunk in idx.chunks(cap) {
                let refs: Vec<&Img> = chunk.iter().map(|&i| &frames[i]).collect();
                let t = self.submit(&refs)?;
                for (i, o) in chunk.iter().zip(self.finish(t)?) {
                    out[*i] = Some(o);
                }
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every frame ran")).collect())
    }
}

#[cfg(test)]
mod tests {
    //! On Mesa lavapipe (CI installs it), as the parity tests.
    use super::*;
    use crate::ops::Apply;

    /// A 32x16 RGB frame, different per `seed` — in brightness too, so that motion's small
    /// (box-averaged) images differ from frame to frame (`seed` below 17).
    fn frame(seed: u32) -> Img {
        let data = (0..32 * 16 * 3u32).map(|i| ((i * 13) % 64 + seed * 11) as u8 ^ (i / 96 % 2) as u8).collect();
        Img::new(32, 16, 3, data)
    }

    /// Results held by their threads (not copied out yet) keep their buffer set: no batch
    /// reuses it, so a later batch cannot overwrite them, and it comes free once the last of
    /// them is dropped. Batches of two frames, motion on: every frame's image and small luma
    /// image are read where they lie.
    #[test]
    fn a_buffer_set_is_used_again_only_once_every_result_of_it_is_dropped() {
        let gpu = Gpu::open(crate::gpu::BackendChoice::Software, None).expect("a Vulkan adapter (CI installs mesa-vulkan-drivers for lavapipe)").expect("not the CPU backend");
        let pipeline = Pipeline::parse("blur:1").unwrap();
        let mut runner = Runner::new(Arc::new(gpu), pipeline.clone(), true, 2);
        let size = (32, 16, 3);
        let frames: Vec<Img> = (0..2 * MAX_SLOTS as u32 + 2).map(frame).collect();
        // What each frame gives: the CPU's result and small luma image (the GPU's are equal
        // byte for byte, tests/gpu_parity.rs).
        let want: Vec<GpuOutput> = frames
            .iter()
            .map(|f| {
                let img = pipeline.apply(f.clone()).unwrap();
                GpuOutput { small: Some(crate::motion::small_luma(&img)), img }
            })
            .collect();
        let same = |got: &GpuOutput, want: &GpuOutput| got.img == want.img && got.small == want.small;
        let mut held: Vec<Option<Vec<Mapped>>> = frames[..2 * MAX_SLOTS]
            .chunks(2)
            .map(|pair| {
                let t = runner.submit(&[&pair[0], &pair[1]]).unwrap();
                Some(runner.finish_mapped(t).unwrap())
            })
            .collect();
        assert!(runner.open(size).unwrap().is_none(), "a buffer set whose results are held was handed out");
        assert_eq!(runner.spare(size).unwrap(), (0, MAX_SLOTS, 2));
        assert!(runner.reading());
        // One set's results (not the first set's) copied out on another thread, as the stage's
        // clients do: that set, and no other, runs the last two frames; the results still held
        // are untouched by them.
        let third = held[2].take().unwrap();
        let got = std::thread::spawn(move || third.into_iter().map(Mapped::copy_out).collect::<Vec<_>>()).join().unwrap();
        assert!(same(&got[0], &want[4]) && same(&got[1], &want[5]), "the third set's results");
        assert_eq!(runner.spare(size).unwrap(), (1, MAX_SLOTS - 1, 2));
        let t = runner.submit(&[&frames[2 * MAX_SLOTS], &frames[2 * MAX_SLOTS + 1]]).unwrap();
        let mut last = runner.finish_mapped(t).unwrap();
        let last = [last.remove(0).copy_out(), last.remove(0).copy_out()];
        assert!(same(&last[0], &want[2 * MAX_SLOTS]) && same(&last[1], &want[2 * MAX_SLOTS + 1]), "the last frames' results");
        for (k, h) in held.into_iter().enumerate() {
            let Some(h) = h else { continue };
            let out: Vec<GpuOutput> = h.into_iter().map(Mapped::copy_out).collect();
            assert!(out.len() == 2 && same(&out[0], &want[2 * k]) && same(&out[1], &want[2 * k + 1]), "held results of set {k} were changed");
        }
        // Every result dropped: the sets still count as being read until a request for room
        // reclaims them (the stage keeps looking, and then finds the room).
        assert!(runner.reading(), "sets freed by asking whether any is being read");
        assert_eq!(runner.spare(size).unwrap(), (MAX_SLOTS, 0, 2));
        assert!(!runner.reading());
    }
}
