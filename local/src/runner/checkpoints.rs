//! Stream positions, per mapping and shard: the last sequence number whose records are all
//! handled.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use tracing::warn;

/// An event source mapping keeps its position for as long as it exists, so with a file
/// ([`super::Runner::with_checkpoints`]) a new runner resumes where the last one stopped instead
/// of replaying the stream from `StartingPosition`. Keyed by stream ARN too: a recreated table
/// (new stream) starts afresh.
#[derive(Debug, Default)]
pub(super) struct Checkpoints {
    file: Option<PathBuf>,
    positions: Mutex<BTreeMap<String, String>>,
}

impl Checkpoints {
    pub(super) fn load(file: PathBuf) -> Self {
        let positions =
            std::fs::read_to_string(&file).ok().and_then(|text| serde_json::from_str(&text).ok()).unwrap_or_default();
        Self { file: Some(file), positions: Mutex::new(positions) }
    }

    fn key(mapping: &str, stream_arn: &str, shard: &str) -> String {
        format!("{mapping} {stream_arn} {shard}")
    }

    pub(super) fn get(&self, mapping: &str, stream_arn: &str, shard: &str) -> Option<String> {
        self.positions.lock().ok()?.get(&Self::key(mapping, stream_arn, shard)).cloned()
    }

    /// Whether the mapping has read this stream before (so a shard it has not seen is new).
    pub(super) fn knows(&self, mapping: &str, stream_arn: &str) -> bool {
        let prefix = format!("{mapping} {stream_arn} ");
        self.positions.lock().is_ok_and(|p| p.keys().any(|k| k.starts_with(&prefix)))
    }

    pub(super) fn set(&self, mapping: &str, stream_arn: &str, shard: &str, sequence: &str) {
        if let Ok(mut positions) = self.positions.lock() {
            positions.insert(Self::key(mapping, stream_arn, shard), sequence.to_owned());
        }
    }

    pub(super) fn save(&self) {
        let Some(file) = &self.file else { return };
        let Ok(positions) = self.positions.lock().map(|p| p.clone()) else { return };
        let written = file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(file, serde_json::to_vec_pretty(&positions).unwrap_or_default()));
        if let Err(e) = written {
            warn!(file = %file.display(), error = %e, "stream positions not saved: the next run replays from StartingPosition");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_survive_a_save_and_load_per_mapping_and_stream() {
        // Given a mapping that has handled a shard up to sequence 200, saved to a file
        let file = std::env::temp_dir().join(format!("runner-checkpoints-{:016x}.json", fastrand::u64(..)));
        let checkpoints = Checkpoints::load(file.clone());
        assert!(!checkpoints.knows("f.e", "stream-1"));
        checkpoints.set("f.e", "stream-1", "shard-1", "100");
        checkpoints.set("f.e", "stream-1", "shard-1", "200");
        checkpoints.save();

        // When a new runner loads it
        let loaded = Checkpoints::load(file.clone());
        let _ = std::fs::remove_file(&file);

        // Then it resumes there, for that mapping and stream only
        assert_eq!(loaded.get("f.e", "stream-1", "shard-1").as_deref(), Some("200"));
        assert!(loaded.knows("f.e", "stream-1"));
        assert!(!loaded.knows("f.e", "stream-2"), "a recreated table's stream starts afresh");
        assert!(!loaded.knows("g.e", "stream-1"));
        assert_eq!(loaded.get("f.e", "stream-1", "shard-2"), None);
    }
}
