//! What one ComfyUI server can do: its version (`/system_stats`), its feature flags (`/features`) and
//! whether it has the per-job API (`/api/jobs`, probed: a 404 means absent). Detected once per connection
//! by [`super::ComfyClient::capabilities`] and dropped on every reconnect (the server may have been
//! replaced by another build), so callers choose the per-job routes where they exist and the old ones
//! where not.
//!
//! Owns the parsing of those three answers. No I/O of its own.

use serde_json::Value;

/// Which API family a server speaks, for choosing routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// No jobs API (ComfyUI 0.3.x): `/queue` + `/history` to find a prompt, `/queue {delete}` and
    /// `/interrupt {prompt_id}` (check-then-act) to cancel one.
    Legacy,
    /// The jobs API (ComfyUI 0.38 and later): `/api/jobs/{id}` (404 for an unknown id) and the atomic
    /// `/api/jobs/{id}/cancel`.
    Jobs,
}

/// `/features` (also the WebSocket `feature_flags` reply), the flags comfyrelay cares about.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Features {
    /// Preview frames with metadata (binary type 4).
    pub supports_preview_metadata: bool,
    /// Largest upload in bytes.
    pub max_upload_size: Option<u64>,
    /// The server rewrites deprecated node classes before validation (`/node_replacements`).
    pub node_replacements: bool,
    /// The asset system is on (uploads answer with a blake3-named asset).
    pub assets: bool,
    /// The whole answer, verbatim.
    pub raw: Value,
}

impl Features {
    /// Parses a `/features` answer leniently (absent or non-boolean flags are off).
    pub fn parse(v: &Value) -> Self {
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        Self {
            supports_preview_metadata: flag("supports_preview_metadata"),
            max_upload_size: v.get("max_upload_size").and_then(Value::as_u64),
            node_replacements: flag("node_replacements"),
            assets: flag("assets"),
            raw: v.clone(),
        }
    }
}

/// What a server can do, as detected.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    /// `system_stats.system.comfyui_version` (`"0.3.64"`, `"0.38.1"`), when reported.
    pub comfyui_version: Option<String>,
    /// `/features`.
    pub features: Features,
    /// `GET /api/jobs` answered (a 404 or 405 means absent).
    pub jobs_api: bool,
}

impl Capabilities {
    /// The API family to use.
    pub fn generation(&self) -> Generation {
        if self.jobs_api { Generation::Jobs } else { Generation::Legacy }
    }

    /// Reads the version out of a `/system_stats` answer.
    pub(crate) fn version_of(system_stats: &Value) -> Option<String> {
        system_stats.pointer("/system/comfyui_version").and_then(Value::as_str).map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn features_of_both_generations() {
        let old = Features::parse(&json!({"supports_preview_metadata": true, "max_upload_size": 104857600}));
        assert!(old.supports_preview_metadata && !old.node_replacements && !old.assets);
        assert_eq!(old.max_upload_size, Some(104_857_600));
        let new = Features::parse(
            &json!({"supports_preview_metadata": true, "node_replacements": true, "assets": true,
            "extension": {"manager": {"supports_v4": true}}}),
        );
        assert!(new.node_replacements && new.assets);
        assert_eq!(
            Features::parse(&json!("nonsense")),
            Features { raw: json!("nonsense"), ..Features::default() }
        );
        let caps = Capabilities { comfyui_version: Some("0.38.1".into()), features: new, jobs_api: true };
        assert_eq!(caps.generation(), Generation::Jobs);
        assert_eq!(
            Capabilities::version_of(&json!({"system": {"comfyui_version": "0.3.64"}})).as_deref(),
            Some("0.3.64")
        );
    }
}
