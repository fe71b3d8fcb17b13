//! The wire contract of large-image jobs: a **tile record** (console → tiles topic) carries one
//! tile's input pixels and where they belong; a **tile result** (worker → tile-results topic)
//! carries the processed core, or why the tile failed. Pixels travel raw (8-bit, rows tightly
//! packed, channels interleaved: 1 gray or 3 RGB) so that the stitched image is exact — no
//! lossy codec in between.
//!
//! Both records are keyed `<job>/<index>` (the default partitioner spreads a job's tiles over
//! the partitions) and carry these headers:
//!
//! | header | tile | result | value |
//! | --- | --- | --- | --- |
//! | `content-type` | ✓ | ✓ | `application/x-framelink-pixels` |
//! | `framelink-job` | ✓ | ✓ | job id |
//! | `framelink-tile` | ✓ | ✓ | tile index (row-major in the output grid) |
//! | `framelink-tile-grid` | ✓ | ✓ | `col,row,cols,rows` |
//! | `framelink-image-size` | ✓ | | the whole source image, `WxH` |
//! | `framelink-tile-region` | ✓ | | the source region carried, `x,y,w,h` |
//! | `framelink-tile-halo` | ✓ | | halo on each side, `left,top,right,bottom` |
//! | `framelink-pipeline` | ✓ | | the tile's own pipeline (crops rewritten for the tile) |
//! | `framelink-tile-core` | ✓ | ✓ | where the result goes in the output image, `x,y,w,h` |
//! | `framelink-tile-core-offset` | ✓ | | where the core is in the tile's processed image, `x,y` |
//! | `framelink-channels` | ✓ | ✓ | channels of the payload |
//! | `framelink-worker`, `framelink-processing-us` | | ✓ | who processed it, how long |
//! | `framelink-error`, `framelink-error-detail` | | failed only | the dead-letter reason and detail (empty payload) |

use crate::pipeline::Pipeline;
use crate::tiling::{Plan, Rect, Tile};

pub const CONTENT_TYPE_PIXELS: &str = "application/x-framelink-pixels";

pub mod tile_header {
    pub const JOB: &str = "framelink-job";
    pub const TILE: &str = "framelink-tile";
    pub const GRID: &str = "framelink-tile-grid";
    pub const IMAGE_SIZE: &str = "framelink-image-size";
    pub const REGION: &str = "framelink-tile-region";
    pub const HALO: &str = "framelink-tile-halo";
    pub const CORE: &str = "framelink-tile-core";
    pub const CORE_OFFSET: &str = "framelink-tile-core-offset";
    pub const CHANNELS: &str = "framelink-channels";
    pub const PIPELINE: &str = crate::wire::result_header::PIPELINE;
    pub const CONTENT_TYPE: &str = crate::wire::header::CONTENT_TYPE;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tile header {header}: {reason}")]
pub struct TileHeaderError {
    pub header: &'static str,
    pub reason: String,
}

/// Job ids: 1–64 characters of `[A-Za-z0-9_-]`.
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A tile record's headers, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct TileMeta {
    pub job: String,
    pub index: u32,
    /// `col, row, cols, rows`.
    pub grid: [u32; 4],
    pub image: (u32, u32),
    pub region: Rect,
    pub halo: [u32; 4],
    pub pipeline: String,
    pub core: Rect,
    pub core_offset: (u32, u32),
    pub channels: u8,
}

fn nums<const N: usize>(header: &'static str, v: &str, sep: char) -> Result<[u32; N], TileHeaderError> {
    let bad = || TileHeaderError { header, reason: format!("{v:?} is not {N} numbers separated by {sep:?}") };
    let parts: Vec<u32> = v.split(sep).map(|p| p.trim().parse::<u32>().map_err(|_| bad())).collect::<Result<_, _>>()?;
    parts.try_into().map_err(|_| bad())
}

impl TileMeta {
    pub fn of(job: &str, plan: &Plan, tile: &Tile, channels: u8) -> Self {
        TileMeta {
            job: job.to_owned(),
            index: tile.index,
            grid: [tile.col, tile.row, plan.cols, plan.rows],
            image: (plan.width, plan.height),
            region: tile.region,
            halo: tile.halo,
            pipeline: tile.pipeline.to_string(),
            core: tile.core,
            core_offset: tile.core_offset,
            channels,
        }
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.job, self.index)
    }

    /// Bytes the payload must have.
    pub fn payload_len(&self) -> u64 {
        self.region.w as u64 * self.region.h as u64 * self.channels as u64
    }

    pub fn to_header_pairs(&self) -> Vec<(&'static str, String)> {
        use tile_header::*;
        let [l, t, r, b] = self.halo;
        let [c, w, cs, rs] = self.grid;
        vec![
            (CONTENT_TYPE, CONTENT_TYPE_PIXELS.to_owned()),
            (JOB, self.job.clone()),
            (TILE, self.index.to_string()),
            (GRID, format!("{c},{w},{cs},{rs}")),
            (IMAGE_SIZE, format!("{}x{}", self.image.0, self.image.1)),
            (REGION, self.region.to_string()),
            (HALO, format!("{l},{t},{r},{b}")),
            (PIPELINE, self.pipeline.clone()),
            (CORE, self.core.to_string()),
            (CORE_OFFSET, format!("{},{}", self.core_offset.0, self.core_offset.1)),
            (CHANNELS, self.channels.to_string()),
        ]
    }

    /// Parses and checks a tile record's headers; every error names the header.
    pub fn from_header_pairs<'a>(pairs: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>) -> Result<Self, TileHeaderError> {
        use tile_header::*;
        let mut found: std::collections::HashMap<&str, &str> = Default::default();
        for (k, v) in pairs {
            let Some(v) = v else { continue };
            let v = std::str::from_utf8(v).map_err(|_| TileHeaderError { header: leak(k), reason: "not UTF-8".into() })?;
            if found.insert(k, v).is_some() && [JOB, TILE, GRID, REGION, PIPELINE, CORE, CORE_OFFSET, CHANNELS].contains(&k) {
                return Err(TileHeaderError { header: leak(k), reason: "appears twice".into() });
            }
        }
        let get = |h: &'static str| found.get(h).copied().ok_or(TileHeaderError { header: h, reason: "missing".into() });
        let ct = get(CONTENT_TYPE)?;
        if ct != CONTENT_TYPE_PIXELS {
            return Err(TileHeaderError { header: CONTENT_TYPE, reason: format!("{ct:?}, not {CONTENT_TYPE_PIXELS}") });
        }
        let job = get(JOB)?.to_owned();
        if !valid_job_id(&job) {
            return Err(TileHeaderError { header: JOB, reason: format!("{job:?} is not 1-64 characters of A-Z a-z 0-9 _ -") });
        }
        let index = get(TILE)?.parse().map_err(|_| TileHeaderError { header: TILE, reason: "not a number".into() })?;
        let grid = nums::<4>(GRID, get(GRID)?, ',')?;
        let [iw, ih] = nums::<2>(IMAGE_SIZE, get(IMAGE_SIZE)?, 'x')?;
        let rect = |h: &'static str| get(h)?.parse::<Rect>().map_err(|reason| TileHeaderError { header: h, reason });
        let (region, core) = (rect(REGION)?, rect(CORE)?);
        let halo = nums::<4>(HALO, get(HALO)?, ',')?;
        let [ox, oy] = nums::<2>(CORE_OFFSET, get(CORE_OFFSET)?, ',')?;
        let channels = match get(CHANNELS)? {
            "1" => 1,
            "3" => 3,
            v => return Err(TileHeaderError { header: CHANNELS, reason: format!("{v:?}: 1 or 3") }),
        };
        let pipeline = get(PIPELINE)?.to_owned();
        Pipeline::parse(&pipeline).map_err(|e| TileHeaderError { header: PIPELINE, reason: e.to_string() })?;
        if region.x as u64 + region.w as u64 > iw as u64 || region.y as u64 + region.h as u64 > ih as u64 {
            return Err(TileHeaderError { header: REGION, reason: format!("{region} is outside the {iw}x{ih} image") });
        }
        Ok(TileMeta { job, index, grid, image: (iw, ih), region, halo, pipeline, core, core_offset: (ox, oy), channels })
    }
}

/// Header names are `&'static str` in errors; an unknown one is named generically.
fn leak(k: &str) -> &'static str {
    use tile_header::*;
    [JOB, TILE, GRID, IMAGE_SIZE, REGION, HALO, CORE, CORE_OFFSET, CHANNELS, PIPELINE, CONTENT_TYPE].into_iter().find(|h| *h == k).unwrap_or("(a header)")
}

/// A tile result's headers, parsed (the console's side).
#[derive(Debug, Clone, PartialEq)]
pub struct TileResultMeta {
    pub job: String,
    pub index: u32,
    pub core: Rect,
    pub channels: u8,
    /// `(reason, detail)` of a failed tile.
    pub error: Option<(String, String)>,
    pub worker: Option<String>,
}

impl TileResultMeta {
    pub fn from_header_pairs<'a>(pairs: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>) -> Result<Self, TileHeaderError> {
        use tile_header::*;
        let (mut job, mut index, mut core, mut channels, mut error, mut detail, mut worker) = (None, None, None, None, None, None, None);
        for (k, v) in pairs {
            let Some(v) = v.and_then(|v| std::str::from_utf8(v).ok()) else { continue };
            match k {
                JOB => job = Some(v.to_owned()),
                TILE => index = Some(v.parse::<u32>().map_err(|_| TileHeaderError { header: TILE, reason: "not a number".into() })?),
                CORE => core = Some(v.parse::<Rect>().map_err(|reason| TileHeaderError { header: CORE, reason })?),
                CHANNELS => channels = v.parse::<u8>().ok().filter(|c| *c == 1 || *c == 3),
                crate::wire::dead_letter_header::ERROR => error = Some(v.to_owned()),
                crate::wire::dead_letter_header::ERROR_DETAIL => detail = Some(v.to_owned()),
                crate::wire::result_header::WORKER => worker = Some(v.to_owned()),
                _ => {}
            }
        }
        let missing = |header: &'static str| TileHeaderError { header, reason: "missing".into() };
        let job = job.ok_or(missing(JOB))?;
        let index = index.ok_or(missing(TILE))?;
        if let Some(reason) = error {
            return Ok(TileResultMeta { job, index, core: core.unwrap_or_default(), channels: channels.unwrap_or(0), error: Some((reason, detail.unwrap_or_default())), worker });
        }
        Ok(TileResultMeta { job, index, core: core.ok_or(missing(CORE))?, channels: channels.ok_or(missing(CHANNELS))?, error: None, worker })
    }
}


/// A job's state on the compacted jobs topic (key = job id; a tombstone when it expires). The
/// console writes it; workers read `status` to skip the tiles of jobs that are over.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobRecord {
    /// Format of this record ([`JOB_RECORD_VERSION`]).
    pub v: u32,
    pub id: String,
    pub status: JobStatus,
    pub created_ms: u64,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub pipeline: String,
    pub tile: u32,
    pub tiles: u32,
    pub out_width: u32,
    pub out_height: u32,
    pub out_channels: u8,
    /// The tile-results topic's end offsets (partition, offset) before the first tile was
    /// queued: a restarted console reads this job's results from there.
    #[serde(default)]
    pub results_from: Vec<(i32, i64)>,
    /// Why the job failed or was cancelled.
    #[serde(default)]
    pub reason: Option<String>,
    /// The uploaded file's name, for people.
    #[serde(default)]
    pub name: Option<String>,
}

pub const JOB_RECORD_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Tiles are being queued.
    Queuing,
    /// All tiles queued; results arriving.
    Running,
    /// Every tile came back and was stitched.
    Done,
    /// Some tiles failed (the job's status names them), or the job could not be queued.
    Failed,
    /// Cancelled by `DELETE /api/jobs/{id}`.
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queuing => "queuing",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
    /// Whether the job still wants its tiles processed.
    pub fn wants_tiles(self) -> bool {
        matches!(self, Self::Queuing | Self::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> TileMeta {
        let plan = crate::tiling::plan(&Pipeline::parse("blur:1,sobel").unwrap(), 300, 200, 3, 128).unwrap();
        TileMeta::of("j-1", &plan, &plan.tiles[1], 3)
    }

    #[test]
    fn tile_headers_round_trip() {
        let m = meta();
        let pairs = m.to_header_pairs();
        let back = TileMeta::from_header_pairs(pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes())))).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.key(), "j-1/1");
        assert_eq!(m.payload_len(), m.region.w as u64 * m.region.h as u64 * 3);
    }

    #[test]
    fn bad_tile_headers_are_named() {
        let m = meta();
        let cases: [(&str, &str, &str); 6] = [
            (tile_header::REGION, "1,2,3", "framelink-tile-region"),
            (tile_header::REGION, "290,0,20,20", "outside the 300x200 image"),
            (tile_header::CHANNELS, "4", "framelink-channels"),
            (tile_header::PIPELINE, "blurr:1", "unknown op"),
            (tile_header::JOB, "../x", "framelink-job"),
            (tile_header::CONTENT_TYPE, "image/jpeg", "content-type"),
        ];
        for (h, v, needle) in cases {
            let pairs: Vec<(&str, String)> = m.to_header_pairs().into_iter().map(|(k, old)| (k, if k == h { v.to_owned() } else { old })).collect();
            let e = TileMeta::from_header_pairs(pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes())))).unwrap_err();
            assert!(e.to_string().contains(needle), "{h}={v}: {e}");
        }
        let pairs: Vec<(&str, String)> = m.to_header_pairs().into_iter().filter(|(k, _)| *k != tile_header::CORE).collect();
        let e = TileMeta::from_header_pairs(pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes())))).unwrap_err();
        assert_eq!(e.to_string(), "tile header framelink-tile-core: missing");
    }
}
