//! `comfyrelay keys create|list|revoke`: the operator's API key management. Unlike the client commands it
//! speaks no gRPC: it opens the server's own database (the `data_dir` of the same configuration as
//! `serve`), so it works with the server running or not, and a revocation holds from the server's next call.
//!
//! A created key is printed once, alone on stdout (for scripts); everything else goes to stderr. Only its
//! digest is stored.

use std::{sync::Arc, time::Duration};

use crate::{
    auth::{self, Role},
    config::Config,
    store::{KeyStore, PgStore, SqliteStore},
};

/// The key management subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create an API key; it is printed once and only its digest is kept.
    Create {
        /// The tenant the key acts for (its jobs belong to it).
        #[arg(long)]
        tenant: String,
        /// viewer (reads), submitter (also submits and cancels) or admin (every tenant, machines).
        #[arg(long, default_value = "submitter")]
        role: Role,
        /// Lifetime, e.g. `30d`, `12h` (default: until revoked).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// List the keys (prefix, tenant, role, creation, expiry, status); never the keys themselves.
    List,
    /// Revoke a key by its prefix (the 8 characters after `cr_`).
    Revoke {
        /// The key's prefix.
        prefix: String,
    },
}

impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Self] {
        &[Role::Viewer, Role::Submitter, Role::Admin]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// Runs a keys subcommand against the server's database: `storage.database_url`, else the SQLite file of
/// `config.data_dir`.
///
/// # Errors
/// The database cannot be opened, a bad tenant name, an unknown prefix (for `revoke`).
pub async fn run(command: KeysCommand, config: &Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let store: Arc<dyn KeyStore> = match &config.storage.database_url {
        Some(url) => Arc::new(
            PgStore::connect(url.expose())
                .await
                .context("connecting to the PostgreSQL database (storage.database_url)")?,
        ),
        None => {
            Arc::new(SqliteStore::open(&config.data_dir, config.storage.durability).await.with_context(
                || format!("opening the database in {} (data_dir)", config.data_dir.display()),
            )?)
        }
    };
    let now = crate::jobs::model::now_ms();
    match command {
        KeysCommand::Create { tenant, role, expires } => {
            let created = auth::create_key(store.as_ref(), &tenant, role, expires, now).await?;
            let row = &created.row;
            eprintln!(
                "created API key {} for tenant {}, role {}, {}; it is shown only this once:",
                row.prefix,
                row.tenant,
                row.role,
                match row.expires_ms {
                    Some(ms) => format!("expires {}", time(ms)),
                    None => "no expiry".into(),
                }
            );
            println!("{}", created.key.expose());
        }
        KeysCommand::List => {
            let rows = store.list_keys().await?;
            println!(
                "{:<10} {:<24} {:<10} {:<21} {:<21} STATUS",
                "PREFIX", "TENANT", "ROLE", "CREATED", "EXPIRES"
            );
            for r in rows {
                let status = match (r.revoked_ms, r.expires_ms) {
                    (Some(_), _) => "revoked",
                    (None, Some(e)) if e <= now => "expired",
                    (None, _) => "active",
                };
                println!(
                    "{:<10} {:<24} {:<10} {:<21} {:<21} {status}",
                    r.prefix,
                    r.tenant,
                    r.role,
                    time(r.created_ms),
                    r.expires_ms.map(time).unwrap_or_else(|| "never".into()),
                );
            }
        }
        KeysCommand::Revoke { prefix } => {
            if !store.revoke_key(&prefix, now).await? {
                anyhow::bail!("no active API key has the prefix {:?}", crate::limits::echo(&prefix));
            }
            eprintln!("revoked API key {prefix}");
        }
    }
    Ok(())
}

fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
