//! A model's stage: one thread owns the model's ONNX Runtime session; processing threads
//! prepare their frame's input themselves (in parallel), hand it over and wait for the
//! outputs, then decode them themselves. The stage gathers what arrives into a batch — frames
//! from every camera, of one input size, up to `inference.batch`, waiting at most
//! `inference.batch_wait_ms` after the first — and runs it as one call, as the GPU stage does.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};

use super::model::{Detection, Model, Output, Spec};
use super::tensor::Input;
use crate::ops::Img;

/// What one frame's run gave.
pub struct Ran {
    pub outputs: Vec<Output>,
    /// The run's wall time (the whole batch's).
    pub took: Duration,
    /// Frames in that run.
    pub batch: usize,
}

type Reply = Sender<Result<Ran, String>>;

struct Request {
    input: Input,
    reply: Reply,
}

/// A model's result for one frame.
#[derive(Clone, Debug)]
pub struct ModelResult {
    pub detections: Vec<Detection>,
    pub took: Duration,
    pub batch: usize,
}

/// A processing thread's handle on a model.
#[derive(Clone)]
pub struct ModelClient {
    pub spec: Arc<Spec>,
    tx: Sender<Request>,
    observer: Arc<dyn StageObserver>,
}

impl ModelClient {
    /// Runs the model on `img`: detections in `img`'s pixels. Every frame that fails — its
    /// input, the run, or its outputs — is counted as failed once, here.
    pub fn detect(&self, img: &Img) -> Result<ModelResult, String> {
        let r = self.detect_once(img);
        if let Err(why) = &r {
            self.observer.failed(1, why);
        }
        r
    }

    fn detect_once(&self, img: &Img) -> Result<ModelResult, String> {
        let input = self.spec.prepare(img)?;
        let at = input.placement;
        let (reply, rx) = bounded(1);
        self.tx.send(Request { input, reply }).map_err(|_| format!("model {}: its stage has stopped", self.spec.name))?;
        let ran = rx.recv().map_err(|_| format!("model {}: its stage has stopped", self.spec.name))??;
        let detections = self.spec.finish(&at, &ran.outputs)?;
        Ok(ModelResult { detections, took: ran.took, batch: ran.batch })
    }
}

/// Per-model counters (exported as metrics by the caller): runs by the stage, failed frames by
/// the clients.
pub trait StageObserver: Send + Sync + 'static {
    fn ran(&self, frames: usize, took: Duration);
    fn failed(&self, frames: usize, why: &str);
}

/// Starts the model's thread; it ends when every [`ModelClient`] is dropped.
pub fn spawn(model: Model, batch: usize, batch_wait: Duration, observer: impl StageObserver) -> std::io::Result<ModelClient> {
    let batch = if model.spec.batchable { batch.max(1) } else { 1 };
    let (tx, rx) = bounded::<Request>(batch * 2);
    let spec = model.spec.clone();
    let observer: Arc<dyn StageObserver> = Arc::new(observer);
    let o = observer.clone();
    std::thread::Builder::new().name(format!("model-{}", spec.name)).spawn(move || run(model, rx, batch, batch_wait, o))?;
    Ok(ModelClient { spec, tx, observer })
}

fn run(mut model: Model, rx: Receiver<Request>, batch: usize, batch_wait: Duration, observer: Arc<dyn StageObserver>) {
    // Requests of another input size wait here for the next batch.
    let mut held: VecDeque<Request> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(r) => r,
            None => match rx.recv() {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        let size = (first.input.width, first.input.height);
        let mut reqs = vec![first];
        // Held requests of this size first, then new ones until full or the wait is over.
        let mut i = 0;
        while i < held.len() && reqs.len() < batch {
            if (held[i].input.width, held[i].input.height) == size {
                reqs.push(held.remove(i).expect("index in range"));
            } else {
                i += 1;
            }
        }
        let deadline = Instant::now() + batch_wait;
        while reqs.len() < batch {
            match rx.recv_deadline(deadline) {
                Ok(r) if (r.input.width, r.input.height) == size => reqs.push(r),
                Ok(r) => held.push_back(r),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        // One frame: its input moves into the tensor as it is; a batch is laid out end to end.
        let (w, h) = (size.0 as usize, size.1 as usize);
        let data = if reqs.len() == 1 {
            std::mem::take(&mut reqs[0].input.data)
        } else {
            reqs.iter().flat_map(|r| r.input.data.iter().copied()).collect()
        };
        let n = reqs.len();
        // A panic in the runtime fails this batch's frames, not the stage (which would fail
        // every later frame of the model).
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.run_batch(n, w, h, data))).unwrap_or_else(|p| Err(format!("model {} panicked: {}", model.spec.name, panic_text(&p))));
        match ran {
            Ok((outs, took)) => {
                observer.ran(reqs.len(), took);
                let n = reqs.len();
                for (r, outputs) in reqs.into_iter().zip(outs) {
                    let _ = r.reply.send(Ok(Ran { outputs, took, batch: n }));
                }
            }
            // Counted per frame by the clients that get the error.
            Err(why) => {
                for r in reqs {
                    let _ = r.reply.send(Err(why.clone()));
                }
            }
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".into())
}
