//! Per-tenant quotas at submit: jobs waiting and submits per second (`auth.tenant_defaults`,
//! `auth.tenants.<name>`). Jobs running at once are capped by the scheduler, which also shares dispatch
//! fairly between tenants.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use governor::{DefaultDirectRateLimiter, Quota, clock::Clock as _};

use crate::config::{AuthConfig, TenantQuota};

/// The quotas of every tenant, and each tenant's submit rate limiter.
#[derive(Debug)]
pub struct Quotas {
    config: AuthConfig,
    limiters: StdMutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
}

/// The quotas checked at submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    /// Jobs waiting.
    MaxQueued,
    /// Submits per second.
    SubmitsPerSecond,
}

impl QuotaKind {
    /// Its setting under `auth.tenants.<name>`.
    pub fn setting(self) -> &'static str {
        match self {
            QuotaKind::MaxQueued => "max_queued",
            QuotaKind::SubmitsPerSecond => "submits_per_second",
        }
    }
}

/// A quota a submit would exceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExceeded {
    /// Which.
    pub quota: QuotaKind,
    /// Its value.
    pub limit: u64,
    /// When trying again may pass.
    pub retry_after: Duration,
}

impl Quotas {
    /// From the `auth` settings.
    pub fn new(config: &AuthConfig) -> Self {
        Self { config: config.clone(), limiters: StdMutex::new(HashMap::new()) }
    }

    /// The quotas of `tenant`.
    pub fn of(&self, tenant: &str) -> TenantQuota {
        self.config.quota(tenant)
    }

    /// Takes one submit from `tenant`'s rate, or says when one will be allowed.
    ///
    /// # Errors
    /// The rate is used up.
    pub fn take_submit(&self, tenant: &str) -> Result<(), QuotaExceeded> {
        let limiter = {
            let mut map = self.limiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            map.entry(tenant.to_string())
                .or_insert_with(|| {
                    let rate = self.of(tenant).submits_per_second;
                    let per_second = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
                    let burst = NonZeroU32::new(rate.saturating_mul(2)).unwrap_or(NonZeroU32::MIN);
                    Arc::new(governor::RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)))
                })
                .clone()
        };
        limiter.check().map_err(|not_until| QuotaExceeded {
            quota: QuotaKind::SubmitsPerSecond,
            limit: u64::from(self.of(tenant).submits_per_second),
            retry_after: not_until
                .wait_time_from(governor::clock::DefaultClock::default().now())
                .max(Duration::from_millis(10)),
        })
    }
}
