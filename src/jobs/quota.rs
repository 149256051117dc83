//! Per-tenant quotas at submit: jobs waiting, submits per second and machine-seconds over the last 24
//! hours (`auth.tenant_defaults`, `auth.tenants.<name>`). Jobs running at once are capped by the
//! scheduler, which also shares dispatch fairly between tenants.
//!
//! Machine-seconds are counted when a job ends (the machine time attributed to it), in memory, seeded at
//! start from the jobs that ended in the last 24 hours; only when some tenant has that quota.

use std::{
    collections::{HashMap, VecDeque},
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
    /// Per tenant: (end time in ms, machine-seconds) of its jobs that ended in the last 24 hours, oldest
    /// first. Empty unless some tenant has a `machine_seconds_per_day` quota.
    usage: StdMutex<HashMap<String, VecDeque<(i64, f64)>>>,
}

/// The window of `machine_seconds_per_day`.
const DAY_MS: i64 = 24 * 3600 * 1000;

/// The quotas checked at submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    /// Jobs waiting.
    MaxQueued,
    /// Submits per second.
    SubmitsPerSecond,
    /// Machine-seconds over the last 24 hours.
    MachineSecondsPerDay,
}

impl QuotaKind {
    /// Its setting under `auth.tenants.<name>`.
    pub fn setting(self) -> &'static str {
        match self {
            QuotaKind::MaxQueued => "max_queued",
            QuotaKind::SubmitsPerSecond => "submits_per_second",
            QuotaKind::MachineSecondsPerDay => "machine_seconds_per_day",
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
        Self {
            config: config.clone(),
            limiters: StdMutex::new(HashMap::new()),
            usage: StdMutex::new(HashMap::new()),
        }
    }

    /// Whether machine-seconds are counted (some tenant has that quota).
    pub fn counts_machine_seconds(&self) -> bool {
        self.config.limits_machine_seconds()
    }

    /// Counts the machine-seconds of a job of `tenant` that ended at `ended_ms`.
    pub fn job_ended(&self, tenant: &str, ended_ms: i64, machine_seconds: f64) {
        if !self.counts_machine_seconds() || machine_seconds <= 0.0 {
            return;
        }
        let mut usage = self.usage.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entries = usage.entry(tenant.to_string()).or_default();
        // Kept in order of end time (seeding reads newest first).
        let at = entries.partition_point(|(t, _)| *t <= ended_ms);
        entries.insert(at, (ended_ms, machine_seconds));
    }

    /// Refuses a submit of `tenant` once its jobs of the last 24 hours used its machine-seconds.
    ///
    /// # Errors
    /// The quota is used up; retry once enough of that usage is older than 24 hours.
    pub fn check_machine_seconds(&self, tenant: &str, now_ms: i64) -> Result<(), QuotaExceeded> {
        let Some(limit) = self.of(tenant).machine_seconds_per_day else { return Ok(()) };
        let mut usage = self.usage.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(entries) = usage.get_mut(tenant) else { return Ok(()) };
        while entries.front().is_some_and(|(t, _)| *t <= now_ms - DAY_MS) {
            entries.pop_front();
        }
        let mut used: f64 = entries.iter().map(|(_, s)| s).sum();
        if used < limit {
            return Ok(());
        }
        // Usage leaves the window oldest first: the submit passes once enough of it has.
        let mut retry_ms = DAY_MS;
        for (t, s) in entries.iter() {
            used -= s;
            if used < limit {
                retry_ms = t + DAY_MS - now_ms;
                break;
            }
        }
        Err(QuotaExceeded {
            quota: QuotaKind::MachineSecondsPerDay,
            limit: limit.ceil() as u64,
            retry_after: Duration::from_millis(retry_ms.max(1000) as u64),
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantOverride;

    #[test]
    fn machine_seconds_of_the_last_day_count_and_leave_the_window_oldest_first() {
        let mut config = AuthConfig::default();
        config.tenants.insert(
            "a".into(),
            TenantOverride { machine_seconds_per_day: Some(100.0), ..Default::default() },
        );
        let q = Quotas::new(&config);
        let now = 10 * DAY_MS;
        q.job_ended("a", now - DAY_MS / 2, 60.0);
        q.job_ended("a", now - DAY_MS + 1000, 50.0);
        q.job_ended("b", now, 1e9);
        let e = q.check_machine_seconds("a", now).expect_err("110 of 100 used");
        assert_eq!(e.quota, QuotaKind::MachineSecondsPerDay);
        // The 50 s of the oldest job leave the window in a second.
        assert_eq!(e.retry_after, Duration::from_secs(1));
        assert!(q.check_machine_seconds("a", now + 1000).is_ok(), "60 of 100 after it left");
        assert!(q.check_machine_seconds("b", now).is_ok(), "b has no such quota");
    }
}
