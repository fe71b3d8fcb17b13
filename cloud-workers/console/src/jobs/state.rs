//! The jobs the console holds: their records, which tiles came back, the stitched images.
//! Pure of Kafka and HTTP (both drive it), so it is tested with plain values.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use framelink_common::tile_wire::{JobRecord, JobStatus, TileResultMeta};
use framelink_common::tiling::Rect;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::json;

use framelink_common::metrics::Labels;

/// Tile failures listed in a job's status (all are counted).
const ERRORS_LISTED: usize = 20;

/// Counters of what the results reader saw (registered in the console's metrics).
#[derive(Clone, Default)]
pub struct JobCounters {
    /// Tile results stitched.
    pub stitched: Counter,
    /// Tile results seen before (at-least-once redelivery), ignored.
    pub duplicates: Counter,
    /// Tile results ignored, by reason (unknown_job, job_over, bad_result).
    pub ignored: Family<Labels, Counter>,
    /// Tiles reported failed by a worker.
    pub failed: Counter,
    /// Job records Kafka did not take (the state in memory is right; a restart would read the
    /// job's previous record).
    pub record_writes_failed: Counter,
    /// Job records read back at start that do not parse or cannot be right (those jobs are
    /// not restored).
    pub records_ignored: Counter,
}

impl JobCounters {
    fn ignore(&self, reason: &str) {
        self.ignored.get_or_create(&vec![("reason", reason.to_owned())]).inc();
    }
}

pub struct Job {
    pub record: JobRecord,
    received: Vec<bool>,
    pub done: u32,
    /// Failed tiles: index → (reason, detail, worker).
    pub failed: BTreeMap<u32, (String, String, String)>,
    pub duplicates: u64,
    /// Tiles queued so far (while `queuing`).
    pub queued: u32,
    output: std::sync::Arc<Vec<u8>>,
    /// Encoded results, by format, made on the first download.
    pub encoded: HashMap<&'static str, Bytes>,
}

impl Job {
    pub fn new(record: JobRecord) -> Self {
        let bytes = record.out_width as usize * record.out_height as usize * record.out_channels as usize;
        Job { received: vec![false; record.tiles as usize], done: 0, failed: BTreeMap::new(), duplicates: 0, queued: 0, output: std::sync::Arc::new(vec![0; bytes]), encoded: HashMap::new(), record }
    }

    /// Memory held: the stitched image and its encoded downloads.
    pub fn bytes(&self) -> u64 {
        self.output.len() as u64 + self.encoded.values().map(|b| b.len() as u64).sum::<u64>()
    }

    fn cols(&self) -> u32 {
        self.record.out_width.div_ceil(self.record.tile)
    }

    /// The core tile `index` covers in the output.
    fn core_of(&self, index: u32) -> Rect {
        let (t, cols) = (self.record.tile, self.cols());
        let (x, y) = ((index % cols) * t, (index / cols) * t);
        Rect::new(x, y, t.min(self.record.out_width - x), t.min(self.record.out_height - y))
    }

    /// Every tile came back (processed or failed).
    pub fn complete(&self) -> bool {
        self.done + self.failed.len() as u32 == self.record.tiles
    }

    /// The stitched image (rows packed, `out_channels` per pixel), once complete.
    pub fn output(&self) -> &std::sync::Arc<Vec<u8>> {
        &self.output
    }

    pub fn seconds(&self, now_ms: u64) -> f64 {
        (self.record.finished_ms.unwrap_or(now_ms).saturating_sub(self.record.created_ms)) as f64 / 1000.0
    }

    pub fn json(&self, now_ms: u64) -> serde_json::Value {
        let r = &self.record;
        let errors: Vec<_> = self.failed.iter().take(ERRORS_LISTED).map(|(i, (reason, detail, worker))| json!({"tile": i, "reason": reason, "detail": detail, "worker": worker})).collect();
        json!({
            "job_id": r.id,
            "name": r.name,
            "status": r.status.as_str(),
            "reason": r.reason,
            "pipeline": r.pipeline,
            "width": r.width, "height": r.height, "channels": r.channels,
            "out_width": r.out_width, "out_height": r.out_height, "out_channels": r.out_channels,
            "tile": r.tile,
            "tiles": r.tiles,
            "total": r.tiles,
            "queued": if r.status == JobStatus::Queuing { self.queued } else { r.tiles },
            "done": self.done,
            "failed": self.failed.len(),
            "duplicates": self.duplicates,
            "errors": errors,
            "created_ms": r.created_ms,
            "finished_ms": r.finished_ms,
            "seconds": self.seconds(now_ms),
            "result": (r.status == JobStatus::Done).then(|| format!("/api/jobs/{}/result", r.id)),
        })
    }
}

/// What a tile result did.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Stitched,
    Failed,
    Duplicate,
    Ignored(&'static str),
    /// The job is now complete: its record (done or failed) is to be written.
    Finished(JobRecord),
}

#[derive(Default)]
pub struct Jobs {
    jobs: BTreeMap<String, Job>,
    pub counters: JobCounters,
    /// False until the jobs were read back from Kafka at start.
    pub restored: bool,
}

impl Jobs {
    pub fn new(counters: JobCounters) -> Self {
        Jobs { counters, ..Default::default() }
    }

    pub fn held_bytes(&self) -> u64 {
        self.jobs.values().map(Job::bytes).sum()
    }

    pub fn get(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Job> {
        self.jobs.get_mut(id)
    }

    pub fn insert(&mut self, job: Job) {
        self.jobs.insert(job.record.id.clone(), job);
    }

    pub fn remove(&mut self, id: &str) -> Option<Job> {
        self.jobs.remove(id)
    }

    pub fn list_ids(&self) -> Vec<String> {
        self.jobs.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Jobs by status.
    pub fn status_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut c: BTreeMap<&'static str, usize> = [JobStatus::Queuing, JobStatus::Running, JobStatus::Done, JobStatus::Failed, JobStatus::Cancelled].iter().map(|s| (s.as_str(), 0)).collect();
        for j in self.jobs.values() {
            *c.entry(j.record.status.as_str()).or_default() += 1;
        }
        c
    }

    /// Newest first.
    pub fn list_json(&self, now_ms: u64) -> serde_json::Value {
        serde_json::Value::Array(self.jobs.values().rev().map(|j| j.json(now_ms)).collect())
    }

    /// Where each job's results begin, per partition: the earliest over the jobs held.
    pub fn results_from(&self) -> BTreeMap<i32, i64> {
        let mut from = BTreeMap::new();
        for j in self.jobs.values() {
            for &(p, o) in &j.record.results_from {
                let e = from.entry(p).or_insert(o);
                *e = (*e).min(o);
            }
        }
        from
    }

    /// A tile result from the tile-results topic.
    pub fn result(&mut self, meta: &TileResultMeta, payload: &[u8], now_ms: u64) -> Outcome {
        let c = self.counters.clone();
        let Some(job) = self.jobs.get_mut(&meta.job) else {
            c.ignore("unknown_job");
            return Outcome::Ignored("unknown_job");
        };
        if matches!(job.record.status, JobStatus::Cancelled) || (job.record.status == JobStatus::Failed && job.record.reason.is_some()) {
            c.ignore("job_over");
            return Outcome::Ignored("job_over");
        }
        if meta.index >= job.record.tiles {
            c.ignore("bad_result");
            return Outcome::Ignored("bad_result");
        }
        let i = meta.index as usize;
        if job.received[i] {
            job.duplicates += 1;
            c.duplicates.inc();
            return Outcome::Duplicate;
        }
        let outcome = match &meta.error {
            Some((reason, detail)) => {
                if job.failed.contains_key(&meta.index) {
                    job.duplicates += 1;
                    c.duplicates.inc();
                    return Outcome::Duplicate;
                }
                c.failed.inc();
                job.failed.insert(meta.index, (reason.clone(), detail.clone(), meta.worker.clone().unwrap_or_default()));
                Outcome::Failed
            }
            None => {
                let core = job.core_of(meta.index);
                let ch = job.record.out_channels as usize;
                if meta.core != core || meta.channels as usize != ch || payload.len() != core.w as usize * core.h as usize * ch {
                    tracing::warn!(job = meta.job, tile = meta.index, core = %meta.core, expected = %core, channels = meta.channels, bytes = payload.len(), "A tile result that does not fit its job; ignored (counted in job_results_ignored{{reason=\"bad_result\"}}).");
                    c.ignore("bad_result");
                    return Outcome::Ignored("bad_result");
                }
                let (ow, row) = (job.record.out_width as usize * ch, core.w as usize * ch);
                let output = std::sync::Arc::make_mut(&mut job.output);
                for y in 0..core.h as usize {
                    let dst = (core.y as usize + y) * ow + core.x as usize * ch;
                    output[dst..dst + row].copy_from_slice(&payload[y * row..y * row + row]);
                }
                // A tile that failed once and then came through (a retry) counts as done.
                job.failed.remove(&meta.index);
                job.received[i] = true;
                job.done += 1;
                c.stitched.inc();
                Outcome::Stitched
            }
        };
        match Self::finish_if_complete(job, now_ms) {
            Some(record) => Outcome::Finished(record),
            None => outcome,
        }
    }

    /// A running job whose tiles all came back is done (or failed, naming its failed tiles); a
    /// job failed by its tiles becomes done when a retried tile came through after all.
    fn finish_if_complete(job: &mut Job, now_ms: u64) -> Option<JobRecord> {
        let open = job.record.status == JobStatus::Running || (job.record.status == JobStatus::Failed && job.record.reason.is_none());
        if !open || !job.complete() {
            return None;
        }
        let status = if job.failed.is_empty() { JobStatus::Done } else { JobStatus::Failed };
        if status == job.record.status {
            return None;
        }
        job.record.status = status;
        job.record.finished_ms = Some(now_ms);
        Some(job.record.clone())
    }

    /// All tiles are queued: the job runs (and may be complete already).
    pub fn running(&mut self, id: &str, now_ms: u64) -> Option<JobRecord> {
        let job = self.jobs.get_mut(id)?;
        if job.record.status != JobStatus::Queuing {
            return None;
        }
        job.record.status = JobStatus::Running;
        Some(Self::finish_if_complete(job, now_ms).unwrap_or_else(|| job.record.clone()))
    }

    /// Ends a job that is not over yet with `status` (cancelled, or failed with `reason`).
    pub fn end(&mut self, id: &str, status: JobStatus, reason: String, now_ms: u64) -> Option<JobRecord> {
        let job = self.jobs.get_mut(id)?;
        if !job.record.status.wants_tiles() {
            return None;
        }
        job.record.status = status;
        job.record.reason = Some(reason);
        job.record.finished_ms = Some(now_ms);
        Some(job.record.clone())
    }

    /// A record read back from the jobs topic at start (`None`: a tombstone).
    pub fn restore(&mut self, id: &str, record: Option<JobRecord>) {
        match record {
            None => {
                self.jobs.remove(id);
            }
            Some(mut r) => {
                if let Err(why) = plausible(&r) {
                    tracing::warn!(job = id, why, "A job record that cannot be right; ignored (counted in job_records_ignored).");
                    self.counters.records_ignored.inc();
                    return;
                }
                // A done job is running again until its results are read back and stitched.
                if r.status == JobStatus::Done {
                    r.status = JobStatus::Running;
                }
                match self.jobs.get_mut(id) {
                    Some(j) => j.record = r,
                    None => self.insert(Job::new(r)),
                }
            }
        }
    }

    /// Jobs created more than `after_ms` ago: removed; their ids returned (for tombstones).
    pub fn expire(&mut self, now_ms: u64, after_ms: u64) -> Vec<String> {
        let old: Vec<String> = self.jobs.values().filter(|j| j.record.created_ms + after_ms <= now_ms).map(|j| j.record.id.clone()).collect();
        for id in &old {
            self.jobs.remove(id);
        }
        old
    }
}

/// A record read back must describe a job this console could have made (a bad one must not
/// crash the console at every start).
fn plausible(r: &JobRecord) -> Result<(), String> {
    if r.tile == 0 || r.tile > 8192 {
        return Err(format!("tile {}", r.tile));
    }
    if r.out_width == 0 || r.out_height == 0 || !matches!(r.out_channels, 1 | 3) {
        return Err(format!("result {}x{}x{}", r.out_width, r.out_height, r.out_channels));
    }
    let tiles = r.out_width.div_ceil(r.tile) as u64 * r.out_height.div_ceil(r.tile) as u64;
    if tiles != r.tiles as u64 || tiles > crate::jobs::api::MAX_TILES {
        return Err(format!("{} tiles for a {}x{} result in tiles of {}", r.tiles, r.out_width, r.out_height, r.tile));
    }
    if r.out_width as u64 * r.out_height as u64 > 1 << 32 {
        return Err("a result over 4 Gpx".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use framelink_common::tile_wire::JOB_RECORD_VERSION;

    fn record(id: &str, w: u32, h: u32, tile: u32) -> JobRecord {
        let tiles = w.div_ceil(tile) * h.div_ceil(tile);
        JobRecord {
            v: JOB_RECORD_VERSION, id: id.into(), status: JobStatus::Queuing, created_ms: 1000, finished_ms: None,
            width: w, height: h, channels: 1, pipeline: "sobel".into(), tile, tiles, out_width: w, out_height: h, out_channels: 1,
            results_from: vec![(0, 5), (1, 7)], reason: None, name: None,
        }
    }

    fn ok(job: &str, index: u32, core: Rect) -> TileResultMeta {
        TileResultMeta { job: job.into(), index, core, channels: 1, error: None, worker: Some("w".into()) }
    }

    #[test]
    fn results_are_stitched_duplicates_counted_and_the_job_finishes() {
        let mut jobs = Jobs::default();
        jobs.insert(Job::new(record("a", 5, 3, 4)));
        // 2x1 tiles: (0,0,4,3) and (4,0,1,3).
        assert_eq!(jobs.result(&ok("a", 1, Rect::new(4, 0, 1, 3)), &[9, 9, 9], 1500), Outcome::Stitched);
        assert_eq!(jobs.result(&ok("a", 1, Rect::new(4, 0, 1, 3)), &[9, 9, 9], 1500), Outcome::Duplicate);
        let first: Vec<u8> = (1..=12).collect();
        assert_eq!(jobs.result(&ok("a", 0, Rect::new(0, 0, 4, 3)), &first, 1600), Outcome::Stitched, "still queuing: not finished");
        let rec = jobs.running("a", 1700).unwrap();
        assert_eq!((rec.status, rec.finished_ms), (JobStatus::Done, Some(1700)));
        let j = jobs.get("a").unwrap();
        assert_eq!(j.output().as_slice(), &[1, 2, 3, 4, 9, 5, 6, 7, 8, 9, 9, 10, 11, 12, 9]);
        assert_eq!((j.done, j.duplicates), (2, 1));
        assert_eq!(jobs.counters.duplicates.get(), 1);
        assert_eq!(j.seconds(99_999), 0.7);
    }

    #[test]
    fn failed_tiles_fail_the_job_naming_them() {
        let mut jobs = Jobs::default();
        jobs.insert(Job::new(record("b", 8, 4, 4)));
        jobs.running("b", 1100);
        let failed = TileResultMeta { job: "b".into(), index: 0, core: Rect::default(), channels: 0, error: Some(("op_failed".into(), "boom".into())), worker: Some("w2".into()) };
        assert_eq!(jobs.result(&failed, &[], 1200), Outcome::Failed);
        let Outcome::Finished(rec) = jobs.result(&ok("b", 1, Rect::new(4, 0, 4, 4)), &[0; 16], 1300) else { panic!("finished") };
        assert_eq!(rec.status, JobStatus::Failed);
        let json = jobs.get("b").unwrap().json(1400);
        assert_eq!((json["done"].as_u64(), json["failed"].as_u64()), (Some(1), Some(1)));
        assert_eq!(json["errors"][0]["reason"], "op_failed");
        assert_eq!(json["errors"][0]["worker"], "w2");
        assert!(json["result"].is_null());
    }

    #[test]
    fn a_retried_tile_turns_a_failed_job_done_and_bad_records_are_not_restored() {
        let mut jobs = Jobs::default();
        jobs.insert(Job::new(record("r", 4, 4, 4)));
        jobs.running("r", 1);
        let failed = TileResultMeta { job: "r".into(), index: 0, core: Rect::default(), channels: 0, error: Some(("panic".into(), "x".into())), worker: None };
        let Outcome::Finished(rec) = jobs.result(&failed, &[], 2) else { panic!("finished") };
        assert_eq!(rec.status, JobStatus::Failed);
        let Outcome::Finished(rec) = jobs.result(&ok("r", 0, Rect::new(0, 0, 4, 4)), &[7; 16], 3) else { panic!("done after the retry") };
        assert_eq!((rec.status, rec.finished_ms), (JobStatus::Done, Some(3)));
        let mut bad = record("bad", 8, 4, 4);
        bad.tile = 0;
        jobs.restore("bad", Some(bad));
        let mut bad = record("bad2", 8, 4, 4);
        bad.tiles = 99;
        jobs.restore("bad2", Some(bad));
        assert!(jobs.get("bad").is_none() && jobs.get("bad2").is_none());
    }

    #[test]
    fn results_that_do_not_fit_are_ignored_and_counted() {
        let mut jobs = Jobs::default();
        jobs.insert(Job::new(record("c", 8, 4, 4)));
        assert_eq!(jobs.result(&ok("zz", 0, Rect::new(0, 0, 4, 4)), &[0; 16], 0), Outcome::Ignored("unknown_job"));
        assert_eq!(jobs.result(&ok("c", 0, Rect::new(0, 0, 4, 3)), &[0; 12], 0), Outcome::Ignored("bad_result"), "wrong core");
        assert_eq!(jobs.result(&ok("c", 0, Rect::new(0, 0, 4, 4)), &[0; 15], 0), Outcome::Ignored("bad_result"), "wrong length");
        assert_eq!(jobs.result(&ok("c", 7, Rect::new(0, 0, 4, 4)), &[0; 16], 0), Outcome::Ignored("bad_result"), "no such tile");
        jobs.end("c", JobStatus::Cancelled, "cancelled by a user".into(), 5);
        assert_eq!(jobs.result(&ok("c", 0, Rect::new(0, 0, 4, 4)), &[0; 16], 0), Outcome::Ignored("job_over"));
        assert_eq!(jobs.counters.ignored.get_or_create(&vec![("reason", "bad_result".to_owned())]).get(), 3);
        assert!(jobs.end("c", JobStatus::Failed, "x".into(), 6).is_none(), "a job that is over stays over");
    }

    #[test]
    fn restore_expire_and_where_results_begin() {
        let mut jobs = Jobs::default();
        let mut done = record("d", 8, 4, 4);
        done.status = JobStatus::Done;
        jobs.restore("d", Some(done));
        assert_eq!(jobs.get("d").unwrap().record.status, JobStatus::Running, "done again once its results are read back");
        let mut e = record("e", 8, 4, 4);
        e.results_from = vec![(0, 3), (2, 9)];
        e.created_ms = 5000;
        jobs.restore("e", Some(e));
        assert_eq!(jobs.results_from(), BTreeMap::from([(0, 3), (1, 7), (2, 9)]));
        jobs.restore("gone", None);
        assert_eq!(jobs.held_bytes(), 64);
        assert_eq!(jobs.expire(4000, 3000), vec!["d".to_owned()]);
        assert_eq!(jobs.len(), 1);
    }
}
