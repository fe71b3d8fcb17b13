//! Reading one track's samples from an MP4, plain or fragmented.
//!
//! A plain MP4 keeps its sample table in `moov`, and the `mp4` crate reads samples from it.
//! A fragmented MP4 (`moof` + `mdat` pairs after an empty `moov`, as recorders, cameras and
//! `ffmpeg -movflags frag_keyframe` write) keeps it in each fragment's `traf`/`trun`; the crate
//! parses those boxes but reads every sample of a fragment from the fragment's base offset
//! (`mp4` 0.14: the bytes of the `moof` header come back as the first NAL). So for fragmented
//! files the table is built here from the parsed boxes, per ISO/IEC 14496-12 §8.8: a sample
//! lies at the track fragment's base (`tfhd` base data offset, else the `moof`'s first byte)
//! plus the run's data offset plus the sizes of the samples before it in the run; sizes and
//! durations come from the run, else the `tfhd` defaults, else the `trex` defaults.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};

/// One sample of a fragmented track.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentSample {
    pub offset: u64,
    pub size: u32,
    /// In the track's timescale.
    pub duration: u32,
}

/// Where a track's samples are read from.
pub enum Samples {
    /// The `moov` sample table, read by the `mp4` crate.
    Plain,
    /// A fragmented file: the table built here, read from a file handle of its own.
    Fragmented { file: BufReader<File>, table: Vec<FragmentSample> },
}

impl Samples {
    /// For track `track` of the file `reader` read: [`Samples::Fragmented`] when the track's
    /// samples are in fragments.
    pub fn for_track(reader: &mp4::Mp4Reader<BufReader<File>>, track: u32, path: &std::path::Path) -> Result<Samples, String> {
        if !reader.moofs.iter().any(|m| m.trafs.iter().any(|t| t.tfhd.track_id == track)) {
            return Ok(Samples::Plain);
        }
        let mut file = BufReader::new(File::open(path).map_err(|e| e.to_string())?);
        let len = file.get_ref().metadata().map_err(|e| e.to_string())?.len();
        let starts = moof_offsets(&mut file, len).map_err(|e| format!("reading the fragments: {e}"))?;
        let trex = reader.moov.mvex.as_ref().map(|m| &m.trex).filter(|t| t.track_id == track).map(|t| (t.default_sample_size, t.default_sample_duration));
        let table = fragment_table(&runs(&reader.moofs, track), &starts, trex)?;
        Ok(Samples::Fragmented { file, table })
    }

    /// The bytes of sample `id` (1-based); `None` past the end.
    pub fn read(&mut self, reader: &mut mp4::Mp4Reader<BufReader<File>>, track: u32, id: u32) -> Result<Option<bytes::Bytes>, String> {
        match self {
            Samples::Plain => Ok(reader.read_sample(track, id).map_err(|e| e.to_string())?.map(|s| s.bytes)),
            Samples::Fragmented { file, table } => {
                let Some(s) = id.checked_sub(1).and_then(|i| table.get(i as usize)) else { return Ok(None) };
                let mut bytes = vec![0; s.size as usize];
                file.seek(SeekFrom::Start(s.offset)).and_then(|_| file.read_exact(&mut bytes)).map_err(|e| format!("{} bytes at offset {}: {e}", s.size, s.offset))?;
                Ok(Some(bytes.into()))
            }
        }
    }

    /// The number of samples, where the table is built here.
    pub fn count(&self) -> Option<u32> {
        match self {
            Samples::Plain => None,
            Samples::Fragmented { table, .. } => Some(table.len() as u32),
        }
    }

    /// The first sample's duration (in the track's timescale), where the table is built here.
    pub fn first_duration(&self) -> Option<u32> {
        match self {
            Samples::Plain => None,
            Samples::Fragmented { table, .. } => table.first().map(|s| s.duration),
        }
    }
}

/// Offsets of the top-level `moof` boxes, in file order.
fn moof_offsets(file: &mut (impl Read + Seek), len: u64) -> std::io::Result<Vec<u64>> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let (mut at, mut out) = (0u64, Vec::new());
    while at + 8 <= len {
        file.seek(SeekFrom::Start(at))?;
        let mut head = [0u8; 8];
        file.read_exact(&mut head)?;
        let mut size = u64::from(u32::from_be_bytes(head[..4].try_into().expect("4 bytes")));
        if size == 1 {
            let mut large = [0u8; 8];
            file.read_exact(&mut large)?;
            size = u64::from_be_bytes(large);
        } else if size == 0 {
            size = len - at; // to the end of the file
        }
        if size < 8 {
            return Err(bad(format!("a box of {size} bytes at offset {at}")));
        }
        if &head[4..] == b"moof" {
            out.push(at);
        }
        at = at.saturating_add(size);
    }
    Ok(out)
}

/// One track run (`trun`) of the track, with its fragment header's (`tfhd`) fields: what
/// [`fragment_table`] needs, apart from the `mp4` crate's box types (which it does not export).
#[derive(Clone, Debug, Default)]
struct Run {
    base_data_offset: Option<u64>,
    data_offset: i32,
    count: u32,
    sizes: Vec<u32>,
    durations: Vec<u32>,
    default_size: Option<u32>,
    default_duration: Option<u32>,
}

/// The runs of `track`, per fragment.
fn runs(moofs: &[mp4::MoofBox], track: u32) -> Vec<Vec<Run>> {
    moofs
        .iter()
        .map(|m| {
            m.trafs
                .iter()
                .filter(|t| t.tfhd.track_id == track)
                .filter_map(|t| {
                    let r = t.trun.as_ref()?;
                    Some(Run {
                        base_data_offset: t.tfhd.base_data_offset,
                        data_offset: r.data_offset.unwrap_or(0),
                        count: r.sample_count,
                        sizes: r.sample_sizes.clone(),
                        durations: r.sample_durations.clone(),
                        default_size: t.tfhd.default_sample_size,
                        default_duration: t.tfhd.default_sample_duration,
                    })
                })
                .collect()
        })
        .collect()
}

/// The samples of the runs `fragments` (per `moof`, which start at `starts` in the file);
/// `trex` the track's defaults (size, duration).
fn fragment_table(fragments: &[Vec<Run>], starts: &[u64], trex: Option<(u32, u32)>) -> Result<Vec<FragmentSample>, String> {
    if fragments.len() != starts.len() {
        return Err(format!("{} fragments parsed but {} `moof` boxes found", fragments.len(), starts.len()));
    }
    let mut out = Vec::new();
    for (runs, &start) in fragments.iter().zip(starts) {
        for run in runs {
            let base = run.base_data_offset.unwrap_or(start);
            let mut at = base.checked_add_signed(i64::from(run.data_offset)).ok_or_else(|| format!("fragment at {start}: data offset before the file"))?;
            for j in 0..run.count as usize {
                let size = run.sizes.get(j).copied().or(run.default_size).or(trex.map(|t| t.0)).ok_or_else(|| format!("fragment at {start}: sample {j} has no size"))?;
                let duration = run.durations.get(j).copied().or(run.default_duration).or(trex.map(|t| t.1)).unwrap_or(0);
                out.push(FragmentSample { offset: at, size, duration });
                at += u64::from(size);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(base: Option<u64>, data_offset: i32, sizes: Vec<u32>, default_size: Option<u32>) -> Run {
        let count = if sizes.is_empty() { 2 } else { sizes.len() as u32 };
        Run { base_data_offset: base, data_offset, count, sizes, default_size, default_duration: Some(40), ..Default::default() }
    }

    #[test]
    fn samples_lie_at_the_fragment_base_plus_the_run_offset_one_after_another() {
        let fragments = vec![vec![run(None, 200, vec![10, 20, 30], None)], vec![run(Some(5000), 8, vec![], Some(7))], vec![run(None, 16, vec![], None)]];
        let t = fragment_table(&fragments, &[1000, 3000, 9000], Some((3, 33))).unwrap();
        let at: Vec<(u64, u32, u32)> = t.iter().map(|s| (s.offset, s.size, s.duration)).collect();
        assert_eq!(at, vec![(1200, 10, 40), (1210, 20, 40), (1230, 30, 40), (5008, 7, 40), (5015, 7, 40), (9016, 3, 40), (9019, 3, 40)], "run sizes, else the tfhd's, else the trex's");
        assert!(fragment_table(&fragments, &[1000], None).unwrap_err().contains("3 fragments parsed but 1"));
        assert!(fragment_table(&fragments, &[1000, 3000, 9000], None).unwrap_err().contains("has no size"));
    }

    #[test]
    fn moof_boxes_are_found_among_the_top_level_boxes() {
        let mut file = Vec::new();
        for (kind, size) in [(b"ftyp", 16u32), (b"moov", 24), (b"moof", 12), (b"mdat", 20), (b"moof", 8)] {
            file.extend_from_slice(&size.to_be_bytes());
            file.extend_from_slice(kind);
            file.resize(file.len() + size as usize - 8, 0);
        }
        let len = file.len() as u64;
        assert_eq!(moof_offsets(&mut std::io::Cursor::new(file), len).unwrap(), vec![40, 72]);
        let mut broken = 4u32.to_be_bytes().to_vec();
        broken.extend_from_slice(b"moof");
        assert!(moof_offsets(&mut std::io::Cursor::new(broken), 8).is_err());
    }
}
