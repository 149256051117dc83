//! Wire models of the RunComfy Server API: servers (machines), their status and type, cloud-saved
//! workflows, and the API's timestamps.
//!
//! Every model tolerates unknown fields (kept in `extra`) and unknown enum values (kept verbatim), because
//! the API is only partly documented (see `shared/reference/runcomfy-api.md` §1). Knows nothing about HTTP.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A machine tier as the API names it in `server_type`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServerType {
    /// `medium`: 16 GB VRAM (T4/A4000).
    Medium,
    /// `large`: 24 GB VRAM (A10G/A5000).
    Large,
    /// `extra-large`: 48 GB VRAM (A6000).
    ExtraLarge,
    /// `2x-large`: 80 GB VRAM (A100).
    TwoXLarge,
    /// `2xl-turbo`: probably 80 GB H100 (mapping undocumented).
    TwoXlTurbo,
    /// Any other value, kept verbatim (newer tiers may exist).
    Other(String),
}

impl ServerType {
    /// The API's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Medium => "medium",
            Self::Large => "large",
            Self::ExtraLarge => "extra-large",
            Self::TwoXLarge => "2x-large",
            Self::TwoXlTurbo => "2xl-turbo",
            Self::Other(s) => s,
        }
    }

    /// Parses the API's spelling (case-insensitive); anything else becomes [`ServerType::Other`].
    pub fn parse(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "medium" => Self::Medium,
            "large" => Self::Large,
            "extra-large" => Self::ExtraLarge,
            "2x-large" => Self::TwoXLarge,
            "2xl-turbo" => Self::TwoXlTurbo,
            _ => Self::Other(s.to_string()),
        }
    }
}

impl fmt::Display for ServerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ServerType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ServerType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::parse(&String::deserialize(d)?))
    }
}

/// `current_status` of a server.
///
/// Documented: `Starting` → `Ready` → `Deleting`. The other named values appear only in third-party code.
/// Anything else is kept as [`ServerStatus::Unknown`]: callers must treat it as "not usable, not known to
/// be gone" (keep polling; never send work to it; delete it if it does not settle).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerStatus {
    /// Booting; not billed.
    Starting,
    /// Serving ComfyUI at `main_service_url`; billed.
    Ready,
    /// Being deleted (after DELETE or at `estimated_stopping_at`); no longer billed once DELETE returned.
    Deleting,
    /// Seen only in third-party code.
    Stopping,
    /// Seen only in third-party code.
    Stopped,
    /// Seen only in third-party code.
    Error,
    /// Any other value, verbatim (including an absent status, as the empty string).
    Unknown(String),
}

impl ServerStatus {
    /// The API's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Starting => "Starting",
            Self::Ready => "Ready",
            Self::Deleting => "Deleting",
            Self::Stopping => "Stopping",
            Self::Stopped => "Stopped",
            Self::Error => "Error",
            Self::Unknown(s) => s,
        }
    }

    /// Parses a status, case-insensitively. `Initializing`, `Pending` and `Creating` (seen in third-party
    /// code as boot phases) map to [`ServerStatus::Starting`].
    pub fn parse(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "starting" | "initializing" | "pending" | "creating" => Self::Starting,
            "ready" => Self::Ready,
            "deleting" => Self::Deleting,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            "error" => Self::Error,
            _ => Self::Unknown(s.to_string()),
        }
    }

    /// Whether the machine serves ComfyUI.
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready)
    }

    /// Whether the machine is still booting.
    pub fn is_starting(&self) -> bool {
        matches!(self, Self::Starting)
    }

    /// Whether the machine is going or gone for good (it will never become Ready again).
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Deleting | Self::Stopping | Self::Stopped | Self::Error)
    }

    /// Whether the value is not one this client knows.
    pub fn is_unknown(&self) -> bool {
        matches!(self, Self::Unknown(_))
    }
}

impl Default for ServerStatus {
    fn default() -> Self {
        Self::Unknown(String::new())
    }
}

impl fmt::Display for ServerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ServerStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ServerStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(|s| Self::parse(&s)).unwrap_or_default())
    }
}

/// A UTC instant as the API writes it (`2024-11-08T05:13:44.100554Z`).
///
/// Parsing also accepts a `+00:00` offset and a missing zone (read as UTC), which other RunComfy APIs emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    /// Parses the forms described on the type (and any other `±HH:MM` offset); `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Some(utc) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
            return humantime::parse_rfc3339_weak(utc).ok().map(Self);
        }
        let time_start = s.find(['T', 't', ' '])?;
        match s[time_start..].rfind(['+', '-']).map(|i| time_start + i) {
            Some(sign_at) => {
                let (local, offset) = s.split_at(sign_at);
                let digits: String = offset[1..].chars().filter(|c| *c != ':').collect();
                if digits.len() != 4 || !digits.chars().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                let hours: u64 = digits[..2].parse().ok()?;
                let minutes: u64 = digits[2..].parse().ok()?;
                let shift = Duration::from_secs(hours * 3600 + minutes * 60);
                let local = humantime::parse_rfc3339_weak(local).ok()?;
                // local = utc + offset for "+", utc - offset for "-".
                let utc = if offset.starts_with('+') { local.checked_sub(shift)? } else { local + shift };
                Some(Self(utc))
            }
            None => humantime::parse_rfc3339_weak(s).ok().map(Self),
        }
    }

    /// Signed-free difference: how far `self` is after `earlier` (zero if it is not).
    pub fn since(&self, earlier: Timestamp) -> Duration {
        self.0.duration_since(earlier.0).unwrap_or(Duration::ZERO)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_micros(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Deserializes an optional timestamp, reading `null`, an absent field and an unparsable string as `None`
/// (one odd timestamp must not make a whole server unreadable).
fn lenient_timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match value {
        Some(serde_json::Value::String(s)) => {
            let parsed = Timestamp::parse(&s);
            if parsed.is_none() {
                tracing::warn!(value = %s, "unparsable RunComfy timestamp ignored");
            }
            parsed
        }
        _ => None,
    })
}

/// A RunComfy machine ("server") as GET/POST/DELETE return it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Server {
    /// The server id (UUID).
    pub server_id: String,
    /// The owning account.
    #[serde(default)]
    pub user_id: Option<String>,
    /// The machine tier.
    #[serde(default)]
    pub server_type: Option<ServerType>,
    /// Running duration in seconds, counted from `service_ready_at`.
    #[serde(default)]
    pub estimated_duration: Option<u64>,
    /// Lifecycle status.
    #[serde(default)]
    pub current_status: ServerStatus,
    /// ComfyUI's base URL; set once Ready.
    #[serde(default)]
    pub main_service_url: Option<String>,
    /// When the machine became Ready (billing starts).
    #[serde(default, deserialize_with = "lenient_timestamp")]
    pub service_ready_at: Option<Timestamp>,
    /// `service_ready_at + estimated_duration`: when the machine stops itself.
    #[serde(default, deserialize_with = "lenient_timestamp")]
    pub estimated_stopping_at: Option<Timestamp>,
    /// Fields this client does not model, verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Server {
    /// A string field not modelled above (e.g. `workflow_version_id` or `created_at` if the API adds them).
    pub fn extra_str(&self, key: &str) -> Option<&str> {
        self.extra.get(key).and_then(|v| v.as_str())
    }
}

/// A cloud-saved workflow version, from `GET …/workflows`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workflow {
    /// The workflow id.
    #[serde(default)]
    pub workflow_id: Option<String>,
    /// Its display name (the API says `workflow_name`, not `name`).
    #[serde(default)]
    pub workflow_name: Option<String>,
    /// The version id to launch machines with (`workflow_version_id`).
    pub version_id: String,
    /// Creation time, verbatim.
    #[serde(default)]
    pub created_at: Option<String>,
    /// Last update time, verbatim.
    #[serde(default)]
    pub updated_at: Option<String>,
    /// Fields this client does not model, verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// What to launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    /// The `version_id` of a cloud-saved workflow.
    pub workflow_version_id: String,
    /// The machine tier.
    pub server_type: ServerType,
    /// How long the machine runs once Ready (whole seconds, rounded up) before it stops itself.
    pub estimated_duration: Duration,
}

impl LaunchRequest {
    /// The duration as the API's whole seconds (rounded up, at least 1).
    pub fn duration_secs(&self) -> u64 {
        duration_secs(self.estimated_duration)
    }
}

/// Whole seconds, rounded up, at least 1.
pub(crate) fn duration_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_tolerates_unknown_fields_and_statuses() {
        let s: Server = serde_json::from_value(serde_json::json!({
            "server_id": "abc", "estimated_duration": 600, "server_type": "extra-large", "user_id": "u",
            "main_service_url": null, "current_status": "Hibernating", "service_ready_at": null,
            "estimated_stopping_at": "not a time", "created_at": "2024-11-08T05:13:44Z"
        }))
        .unwrap();
        assert_eq!(s.current_status, ServerStatus::Unknown("Hibernating".into()));
        assert!(!s.current_status.is_ready() && !s.current_status.is_terminal());
        assert_eq!(s.server_type, Some(ServerType::ExtraLarge));
        assert_eq!(s.estimated_stopping_at, None);
        assert_eq!(s.extra_str("created_at"), Some("2024-11-08T05:13:44Z"));
    }

    #[test]
    fn documented_example_round_trips() {
        let s: Server = serde_json::from_value(serde_json::json!({
            "server_id": "d", "estimated_duration": 400, "server_type": "2xl-turbo", "user_id": "u",
            "main_service_url": "https://d-comfyui.runcomfy.com", "current_status": "Ready",
            "service_ready_at": "2024-11-08T05:13:44.100554Z", "estimated_stopping_at": "2024-11-08T05:20:24.100554Z"
        }))
        .unwrap();
        assert!(s.current_status.is_ready());
        let ready = s.service_ready_at.unwrap();
        assert_eq!(s.estimated_stopping_at.unwrap().since(ready), Duration::from_secs(400));
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["service_ready_at"], "2024-11-08T05:13:44.100554Z");
        assert_eq!(v["server_type"], "2xl-turbo");
    }

    #[test]
    fn timestamps_accept_the_forms_runcomfy_emits() {
        let z = Timestamp::parse("2025-07-22T13:05:16.143086Z").unwrap();
        assert_eq!(Timestamp::parse("2025-07-22T13:05:16.143086+00:00"), Some(z));
        assert_eq!(Timestamp::parse("2025-07-22T13:05:16.143086"), Some(z));
        let plus_two = Timestamp::parse("2025-07-22T15:05:16.143086+02:00").unwrap();
        assert_eq!(plus_two, z);
        assert_eq!(Timestamp::parse("2025-07-22T11:35:16.143086-01:30"), Some(z));
        assert_eq!(Timestamp::parse("2025-07-22T13:05:16+0x:00"), None);
        assert_eq!(Timestamp::parse("yesterday"), None);
    }

    #[test]
    fn statuses_parse_case_insensitively() {
        assert_eq!(ServerStatus::parse("ready"), ServerStatus::Ready);
        assert_eq!(ServerStatus::parse("Initializing"), ServerStatus::Starting);
        assert!(ServerStatus::parse("Deleting").is_terminal());
        assert_eq!(ServerType::parse("mega"), ServerType::Other("mega".into()));
    }
}
