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
}
