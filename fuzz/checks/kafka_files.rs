//! Keeps the config checks hermetic: validating a `[kafka]` table reads the files it names
//! (TLS certificates and keys, the SASL password file). A fuzzed path may name anything, and
//! reading `/dev/zero`, a FIFO or a terminal would hang the run or exhaust its memory; such a
//! config is parsed but not validated. A missing file or a regular file is validated as usual.

use framelink_common::KafkaConfig;

/// Whether every file the table names is missing or a regular file.
pub fn reads_only_plain_files(k: &KafkaConfig) -> bool {
    let tls = &k.tls;
    let password_file = k.sasl.as_ref().and_then(|s| s.password_file.as_deref());
    [tls.ca.as_deref(), tls.certificate.as_deref(), tls.key.as_deref(), tls.client_ca.as_deref(), password_file]
        .into_iter()
        .flatten()
        .all(|p| std::fs::metadata(p).map_or(true, |m| m.is_file()))
}
