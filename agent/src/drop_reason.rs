//! Why the agent lost a frame on purpose: one enum for every drop, so each drop site names its
//! reason the same way in its log line and in `framelink_agent_frames_dropped{reason}` (the
//! strings are the metric's labels; operators alert on them).

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// The camera delivered faster than the encoder keeps up (its queue was full).
    EncoderBehind,
    /// The frame could not be encoded.
    EncodeError,
    /// No sequence number could be reserved (the disk refuses the write).
    SequenceIoError,
    /// Larger than `forwarder.max_message_bytes`.
    TooLarge,
    /// Kafka refused the frame for good (e.g. the topic's own size limit).
    Rejected,
    /// The spool could not take it (disk full, read-only, I/O error).
    SpoolIoError,
    /// Its spool record was damaged (kept in `spool.dir/damaged/`).
    SpoolDamaged,
    /// Deleted from the full spool to make room (`drop_oldest`, `decimate`).
    FullOldest,
    /// Refused by the full spool (`drop_newest`), or too large to fit even in an emptied spool.
    FullNewest,
    /// Not kept by `decimate`.
    Decimated,
    /// Refused by the spool because its disk is full (less than `spool.min_free_bytes` free),
    /// though the spool is below `max_bytes`, and nothing is left to evict.
    DiskFull,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        Self::EncoderBehind,
        Self::EncodeError,
        Self::SequenceIoError,
        Self::TooLarge,
        Self::Rejected,
        Self::SpoolIoError,
        Self::SpoolDamaged,
        Self::FullOldest,
        Self::FullNewest,
        Self::Decimated,
        Self::DiskFull,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EncoderBehind => "encoder_behind",
            Self::EncodeError => "encode_error",
            Self::SequenceIoError => "sequence_io_error",
            Self::TooLarge => "too_large",
            Self::Rejected => "rejected",
            Self::SpoolIoError => "spool_io_error",
            Self::SpoolDamaged => "spool_damaged",
            Self::FullOldest => "spool_full_oldest",
            Self::FullNewest => "spool_full_newest",
            Self::Decimated => "decimated",
            Self::DiskFull => "spool_disk_full",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_label() {
        let labels: std::collections::BTreeSet<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), DropReason::ALL.len());
    }
}
