//! Who is calling: API keys (created, listed and revoked by the operator CLI, stored as a digest only),
//! verified client-certificate subjects, roles and the [`Principal`] a call acts as.
//!
//! Knows the key store and the `auth` settings; knows nothing of gRPC (the tower layer in `grpc::auth`
//! reads the metadata and calls [`Authenticator::authenticate`] once per call).
//!
//! A key is `cr_<prefix>_<secret>`: 8 hex characters naming it (shown in logs and `keys list`), then 32
//! random bytes in hex. Only the SHA-256 of the whole key is stored; a fast digest is enough for 256 bits
//! of entropy (nothing to brute-force), and it is compared in constant time.

use std::{collections::HashMap, sync::Arc, time::Duration};

use sha2::{Digest, Sha256};

use crate::{
    config::{AuthConfig, AuthMode, Secret},
    store::{KeyRow, KeyStore, StoreError},
};

/// The tenant of every call with `auth.mode = "none"`.
pub const DEFAULT_TENANT: &str = "default";

/// What a caller may do. Each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads its tenant's jobs, events and outputs, and the workflows.
    Viewer,
    /// Also submits and cancels its tenant's jobs.
    Submitter,
    /// Also sees every tenant's jobs and uses MachineService.
    Admin,
}

impl Role {
    /// The name used in configuration, the CLI and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Submitter => "submitter",
            Role::Admin => "admin",
        }
    }

    /// Whether this role includes `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "submitter" => Ok(Role::Submitter),
            "admin" => Ok(Role::Admin),
            _ => Err("must be admin, submitter or viewer".into()),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whom a call acts as: put into the request's extensions by the auth layer, read by handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant its jobs belong to.
    pub tenant: String,
    /// What it may do.
    pub role: Role,
    /// The public prefix of its key (`cert:<subject>` for a client certificate, empty with auth off).
    pub key_prefix: String,
}

impl Principal {
    /// The caller of every call with `auth.mode = "none"`.
    pub fn unauthenticated_admin() -> Self {
        Self { tenant: DEFAULT_TENANT.into(), role: Role::Admin, key_prefix: String::new() }
    }
}

/// Why a call is not authenticated. The messages never contain the key.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("no API key: send `authorization: Bearer <key>`")]
    Missing,
    /// Not `Bearer cr_<prefix>_<secret>`.
    #[error("the authorization metadata is not `Bearer <API key>`")]
    Malformed,
    /// No key with this prefix, or the secret does not match.
    #[error("unknown API key")]
    Unknown,
    /// The key was revoked.
    #[error("the API key was revoked")]
    Revoked,
    /// The key expired.
    #[error("the API key expired")]
    Expired,
    /// The key store failed.
    #[error("the key store failed")]
    Store(#[from] StoreError),
}

/// The public prefix of a key, or `None` when it is not shaped like one (`cr_` + 8 hex + `_` + 64 hex).
pub fn parse_key(key: &str) -> Option<&str> {
    let mut parts = key.splitn(3, '_');
    let (Some("cr"), Some(prefix), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(prefix, 8) && hex(secret, 64)).then_some(prefix)
}

/// Hex SHA-256 of a whole key.
fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a tenant name: 1 to 63 characters of lowercase letters, digits, `-`, `_`, `.`.
///
/// # Errors
/// What is wrong with it.
pub fn validate_tenant(tenant: &str) -> Result<(), String> {
    let ok = !tenant.is_empty()
        && tenant.len() <= 63
        && tenant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(()) } else { Err("must be 1 to 63 characters of a-z, 0-9, '-', '_', '.'".into()) }
}

/// A key just created: the key itself (shown once, never stored) and its stored row.
#[derive(Debug)]
pub struct CreatedKey {
    /// The whole key, for the operator to hand over.
    pub key: Secret,
    /// What is stored.
    pub row: KeyRow,
}

/// Creates and stores a new key for `tenant` with `role`, valid for `expires_in` when given.
///
/// # Errors
/// A bad tenant name, or the store failed.
pub async fn create_key(
    store: &dyn KeyStore,
    tenant: &str,
    role: Role,
    expires_in: Option<Duration>,
    now_ms: i64,
) -> Result<CreatedKey, CreateKeyError> {
    validate_tenant(tenant).map_err(CreateKeyError::Tenant)?;
    use rand::RngCore as _;
    let mut rng = rand::rng();
    let mut prefix = [0u8; 4];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut prefix);
    rng.fill_bytes(&mut secret);
    let prefix = hex::encode(prefix);
    let key = Secret::new(format!("cr_{prefix}_{}", hex::encode(secret)));
    let row = KeyRow {
        prefix,
        secret_sha256: digest(key.expose()),
        tenant: tenant.to_string(),
        role: role.as_str().to_string(),
        created_ms: now_ms,
        expires_ms: expires_in.map(|d| now_ms.saturating_add(d.as_millis().min(i64::MAX as u128) as i64)),
        revoked_ms: None,
    };
    store.insert_key(&row).await?;
    Ok(CreatedKey { key, row })
}

/// Why a key could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateKeyError {
    /// The tenant name is not valid.
    #[error("--tenant {0}")]
    Tenant(String),
    /// The store failed.
    #[error("the key store failed")]
    Store(#[from] StoreError),
}

/// Authenticates calls: API keys from the store, certificate subjects from the configuration, or nobody
/// with `auth.mode = "none"`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Authenticator {
    inner: Arc<AuthInner>,
}

#[derive(Debug)]
struct AuthInner {
    mode: AuthMode,
    keys: Arc<dyn KeyStore>,
    /// Certificate subject → (tenant, role).
    subjects: HashMap<String, (String, Role)>,
    open_services: Vec<String>,
}

impl Authenticator {
    /// From the `auth` settings (already validated) and the key store.
    pub fn new(config: &AuthConfig, keys: Arc<dyn KeyStore>) -> Self {
        let subjects = config
            .client_certificates
            .iter()
            .map(|c| (c.subject.clone(), (c.tenant.clone(), c.role.parse().unwrap_or(Role::Viewer))))
            .collect();
        Self {
            inner: Arc::new(AuthInner {
                mode: config.effective_mode(),
                keys,
                subjects,
                open_services: config.open_services.clone(),
            }),
        }
    }

    /// Whether calls to `service` (its full name) need no key.
    pub fn is_open(&self, service: &str) -> bool {
        self.inner.open_services.iter().any(|s| s == service)
    }

    /// Whom a call acts as, from its `authorization` value and verified client-certificate subject.
    /// A mapped certificate subject is enough; otherwise the key must be known, not revoked, not expired.
    ///
    /// # Errors
    /// Why the call is not authenticated.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        subject: Option<&str>,
        now_ms: i64,
    ) -> Result<Principal, AuthError> {
        if self.inner.mode == AuthMode::None {
            return Ok(Principal::unauthenticated_admin());
        }
        if let Some((tenant, role)) = subject.and_then(|s| self.inner.subjects.get(s)) {
            let prefix = format!("cert:{}", crate::limits::echo(subject.unwrap_or_default()));
            return Ok(Principal { tenant: tenant.clone(), role: *role, key_prefix: prefix });
        }
        let value = authorization.ok_or(AuthError::Missing)?;
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or(AuthError::Malformed)?;
        let prefix = parse_key(key).ok_or(AuthError::Malformed)?;
        let row = self.inner.keys.get_key(prefix).await?.ok_or(AuthError::Unknown)?;
        if !constant_time_eq(digest(key).as_bytes(), row.secret_sha256.as_bytes()) {
            return Err(AuthError::Unknown);
        }
        if row.revoked_ms.is_some() {
            return Err(AuthError::Revoked);
        }
        if row.expires_ms.is_some_and(|e| e <= now_ms) {
            return Err(AuthError::Expired);
        }
        let role = row.role.parse().map_err(|_| AuthError::Unknown)?;
        Ok(Principal { tenant: row.tenant, role, key_prefix: row.prefix })
    }
}

/// The public prefix of whatever `authorization` holds, for logs: only when it is shaped like a key.
pub fn prefix_for_log(authorization: Option<&str>) -> &str {
    authorization
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .and_then(|k| parse_key(k.trim()))
        .unwrap_or("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_only_in_their_shape() {
        let key = format!("cr_0a1b2c3d_{}", "f".repeat(64));
        assert_eq!(parse_key(&key), Some("0a1b2c3d"));
        assert_eq!(parse_key("cr_0a1b2c3d_short"), None);
        assert_eq!(parse_key(&format!("xx_0a1b2c3d_{}", "f".repeat(64))), None);
        assert_eq!(prefix_for_log(Some(&format!("Bearer {key}"))), "0a1b2c3d");
        assert_eq!(prefix_for_log(Some("Bearer hunter2")), "-");
    }

    #[test]
    fn roles_include_the_ones_below() {
        assert!(Role::Admin.allows(Role::Submitter));
        assert!(Role::Submitter.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Submitter));
        assert!(!Role::Submitter.allows(Role::Admin));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
    }
}
