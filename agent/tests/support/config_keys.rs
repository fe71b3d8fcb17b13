//! Every config key the code reads is documented in the example config, and every key the
//! example config documents exists: shared by `agent/tests/config_keys.rs` and
//! `cloud-workers/tests/config_keys.rs`.
//!
//! The code's keys are found by asking the config's own `Deserialize` implementation, through
//! the same loader the binaries use (`framelink_common::config_file`): every config struct
//! refuses unknown keys (`deny_unknown_fields`), and serde's refusal lists the keys the struct
//! has (``unknown field `__probe`, expected one of `a`, `b` ``). A document holding only
//! `__probe = 0` therefore names the top-level keys; `a = { __probe = 0 }` names the keys of
//! table `a` if it is one (a leaf refuses a table with a different error), and
//! `a = [{ __probe = 0 }]` those of an array of tables (`[[cameras]]`). Walking down from the
//! top finds every key, including those behind custom deserializers (`kafka.brokers` takes a
//! string or a list through an untagged enum, which reflection-based tracers such as
//! serde-reflection cannot follow). A free-form map (`kafka.librdkafka`) takes any key, so it
//! counts as one key; a map of tables (`[models.NAME]`) is probed as `a = { __name = { __probe
//! = 0 } }` and its keys are written `models.*.path` (any name in the example stands for `*`).
//!
//! The documented keys are read from the example config's text, commented-out lines included
//! (`# client_ca = "..."` documents `kafka.tls.client_ca`): table headers (`[kafka.tls]`,
//! `[[cameras]]`), `key = value` lines and the keys of inline tables
//! (`synthetic = { width = 1920 }`). Each key outside an array of tables is documented once.

use std::collections::{BTreeMap, BTreeSet};

const PROBE: &str = "__probe";
/// The entry name used to probe a map of tables.
const NAME: &str = "__name";

/// How a key path is written: tables joined by `.`, an array of tables as `name[]`.
fn render(path: &[String], inner: &str) -> String {
    // `a.b[].c` with `inner` at the end, as TOML: a = { b = [{ c = inner }] }
    let mut out = inner.to_owned();
    for seg in path.iter().rev() {
        let seg = if seg == "*" { NAME } else { seg.as_str() };
        out = match seg.strip_suffix("[]") {
            Some(name) => format!("{{ {name} = [{out}] }}"),
            None => format!("{{ {seg} = {out} }}"),
        };
    }
    // The document itself is a table: drop the outer braces.
    out.strip_prefix("{ ").and_then(|s| s.strip_suffix(" }")).unwrap_or(&out).to_owned()
}

/// The keys of the table at `path` if it is one (from serde's unknown-field refusal).
fn table_keys(parse: &dyn Fn(&str) -> Result<(), String>, path: &[String]) -> Option<Vec<String>> {
    let doc = render(path, &format!("{{ {PROBE} = 0 }}"));
    let doc = if path.is_empty() { format!("{PROBE} = 0") } else { doc };
    let err = parse(&doc).err()?;
    let marker = format!("unknown field `{PROBE}`, expected ");
    let listed = &err[err.find(&marker)? + marker.len()..];
    if listed.starts_with("there are no fields") {
        return Some(Vec::new());
    }
    // serde writes "`a`", "`a` or `b`" or "one of `a`, `b`, `c`"; the loader may append more
    // (" for key `x`").
    let mut rest = listed.strip_prefix("one of ").unwrap_or(listed);
    let mut keys = Vec::new();
    while let Some((key, after)) = rest.strip_prefix('`').and_then(|r| r.split_once('`')) {
        keys.push(key.to_owned());
        match after.strip_prefix(", ").or_else(|| after.strip_prefix(" or ")) {
            Some(next) => rest = next,
            None => break,
        }
    }
    Some(keys)
}

/// Every key the code reads (leaves) and every table, as `a.b` / `cameras[].id` paths.
pub fn code_keys(parse: &dyn Fn(&str) -> Result<(), String>) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut leaves, mut tables) = (BTreeSet::new(), BTreeSet::new());
    let root = table_keys(parse, &[]).expect("the top level refuses unknown keys and lists its own");
    let mut todo: Vec<Vec<String>> = root.into_iter().map(|k| vec![k]).collect();
    while let Some(path) = todo.pop() {
        let mut as_array = path.clone();
        let last = as_array.last_mut().unwrap();
        *last = format!("{last}[]");
        let mut as_map = path.clone();
        as_map.push("*".to_owned());
        let (table, keys) = match table_keys(parse, &path) {
            Some(keys) => (path, keys),
            None => match table_keys(parse, &as_array) {
                Some(keys) => (as_array, keys),
                None => match table_keys(parse, &as_map).filter(|k| !k.is_empty()) {
                    Some(keys) => (as_map, keys),
                    None => {
                        leaves.insert(path.join("."));
                        continue;
                    }
                },
            },
        };
        assert!(!keys.is_empty(), "table `{}` has no keys", table.join("."));
        for k in keys {
            let mut p = table.clone();
            p.push(k);
            todo.push(p);
        }
        tables.insert(table.join("."));
    }
    (leaves, tables)
}

/// Splits `s` at top-level commas (outside quotes, braces and brackets).
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut quote, mut start) = (Vec::new(), 0i32, None, 0);
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '{' | '[') => depth += 1,
            (None, '}' | ']') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn is_bare_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
}

/// `key = value` (bare lowercase key): the keys it documents under `prefix`.
fn entry_keys(prefix: &str, line: &str, out: &mut Vec<String>) {
    let Some((k, v)) = line.split_once('=') else { return };
    let k = k.trim();
    if !is_bare_key(k) {
        return;
    }
    let path = if prefix.is_empty() { k.to_owned() } else { format!("{prefix}.{k}") };
    out.push(path.clone());
    let v = v.trim();
    if let Some(inner) = v.strip_prefix('{') {
        let end = inner.rfind('}').unwrap_or(inner.len());
        for item in split_top(&inner[..end]) {
            entry_keys(&path, item.trim(), out);
        }
    }
}

/// Key paths documented in an example config (commented-out lines included), with how often.
pub fn documented_keys(text: &str) -> BTreeMap<String, usize> {
    let mut table = String::new();
    let mut keys = Vec::new();
    for raw in text.lines() {
        let line = raw.trim().trim_start_matches('#').trim();
        if let Some(h) = line.strip_prefix("[[").and_then(|l| l.split_once("]]")) {
            table = format!("{}[]", h.0.trim());
        } else if let Some(h) = line.strip_prefix('[').and_then(|l| l.split_once(']')) {
            if is_bare_key(h.0.trim()) {
                table = h.0.trim().to_owned();
            }
        } else {
            entry_keys(&table, line, &mut keys);
        }
    }
    let mut counts = BTreeMap::new();
    for k in keys {
        *counts.entry(k).or_insert(0) += 1;
    }
    counts
}

/// Fails naming every key of the code missing from `example` (a path in the repository),
/// every documented key the code does not have, and every key documented twice.
pub fn check(parse: &dyn Fn(&str) -> Result<(), String>, example: &str) -> usize {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let text = std::fs::read_to_string(format!("{root}/{example}")).unwrap_or_else(|e| panic!("{example}: {e}"));
    let (leaves, tables) = code_keys(parse);
    // A map of tables (`models.*`): the example's entry names stand for `*`.
    let maps: Vec<&str> = tables.iter().filter_map(|t| t.strip_suffix(".*")).collect();
    let mut documented = BTreeMap::new();
    for (k, n) in documented_keys(&text) {
        let k = match maps.iter().find(|m| k.starts_with(&format!("{m}."))) {
            Some(m) => {
                let rest = &k[m.len() + 1..];
                match rest.split_once('.') {
                    Some((_, key)) => format!("{m}.*.{key}"),
                    None => format!("{m}.*"),
                }
            }
            None => k,
        };
        *documented.entry(k).or_insert(0) += n;
    }
    let mut problems = Vec::new();
    for k in &leaves {
        if !documented.contains_key(k) {
            problems.push(format!("`{k}` is read by the code but not documented in {example} (add it, commented out if it should keep its default)"));
        }
    }
    for (k, n) in &documented {
        if !leaves.contains(k) && !tables.contains(k) {
            problems.push(format!("`{k}` is documented in {example} but the code has no such key"));
        }
        if *n > 1 && !k.contains("[]") && !k.contains(".*.") {
            problems.push(format!("`{k}` is documented {n} times in {example}; document it once"));
        }
    }
    assert!(problems.is_empty(), "{example}:\n  {}", problems.join("\n  "));
    leaves.len()
}
