//! What both binaries' Prometheus metrics share: the label set of a metric family and the text
//! exposition `/metrics` serves. The metrics themselves differ per binary and stay there.

use prometheus_client::registry::Registry;

/// A family's labels: names fixed in the code, values from the data (camera, reason, kind).
pub type Labels = Vec<(&'static str, String)>;

/// [`Labels`] from borrowed values.
pub fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// The OpenMetrics text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("formatting to a String");
    out
}

/// The samples of metric `name` (its full exposed name, e.g. `framelink_agent_frames_dropped_total`)
/// in a text exposition: each sample's labels and value. For summaries (heartbeats, logs) of
/// families whose label values are not known in advance.
pub fn samples(text: &str, name: &str) -> Vec<(std::collections::BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (labels, value) = match rest.chars().next() {
            Some('{') => match rest.rfind('}') {
                Some(end) => (&rest[1..end], &rest[end + 1..]),
                None => continue,
            },
            Some(' ') => ("", rest),
            _ => continue,
        };
        let Ok(value) = value.trim().split(' ').next().unwrap_or("").parse::<f64>() else { continue };
        let mut map = std::collections::BTreeMap::new();
        // Label values here never hold `",` (camera ids and reasons are plain words).
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once("=\"") {
                map.insert(k.trim_start_matches(',').to_owned(), v.trim_end_matches('"').to_owned());
            }
        }
        out.push((map, value));
    }
    out
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    use super::*;

    #[test]
    fn a_labelled_counter_renders() {
        let mut registry = Registry::with_prefix("framelink_test");
        let family = Family::<Labels, Counter>::default();
        registry.register("frames", "Frames", family.clone());
        family.get_or_create(&labels(&[("camera", "cam0"), ("reason", "full")])).inc_by(3);
        let text = render(&registry);
        assert!(text.contains("framelink_test_frames_total{camera=\"cam0\",reason=\"full\"} 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn samples_are_read_back_with_their_labels() {
        let text = "# HELP x_total X\nx_total{camera=\"front\",reason=\"spool_full\"} 3\nx_total{camera=\"rear\",reason=\"encoder_behind\"} 12\nx_totally 5\nx_total 7\n";
        let s = samples(text, "x_total");
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].0["camera"], "front");
        assert_eq!(s[0].0["reason"], "spool_full");
        assert_eq!(s[0].1, 3.0);
        assert_eq!(s[1].0["reason"], "encoder_behind");
        assert_eq!(s[1].1, 12.0);
        assert!(s[2].0.is_empty());
        assert_eq!(s[2].1, 7.0);
    }
}
