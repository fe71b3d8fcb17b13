//! A topic-partition: the unit of assignment, ordering and commit in a consumer group.

use std::fmt;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Self { topic: topic.into(), partition }
    }
}

/// `topic[partition]`, as in the logs and `/healthz`.
impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

impl fmt::Debug for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_topic_then_partition_and_prints_as_in_the_logs() {
        let mut v = vec![TopicPartition::new("b", 0), TopicPartition::new("a", 2), TopicPartition::new("a", 1)];
        v.sort();
        assert_eq!(format!("{v:?}"), "[a[1], a[2], b[0]]");
    }
}
