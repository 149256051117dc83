//! A simulated day of traffic through the real RunComfy pool against the RunComfy emulator, under
//! `tokio::time::pause()`. Prints cost, machine use and queue waits; asserts nothing.
//!
//! Run: `cargo bench --bench pool_day`. `POOL_DAY_PEAK=N` sets peak arrivals per hour (default 600),
//! `POOL_DAY_HOURS=H` the simulated length (default 24).

use std::time::{Duration, Instant};

#[path = "../tests/support/pool_day.rs"]
mod pool_day;

use pool_day::{DayParams, simulate_day};

fn env_f64(key: &str, default: f64) -> f64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let mut params = DayParams {
        peak_jobs_per_hour: env_f64("POOL_DAY_PEAK", 600.0),
        length: Duration::from_secs_f64(env_f64("POOL_DAY_HOURS", 24.0) * 3600.0),
        ..DayParams::default()
    };
    let peak = params.peak_jobs_per_hour;
    for (label, peak, min_warm, idle_stop) in [
        ("busy day, scale to zero, idle_stop 5 min", peak, 0, 300),
        ("busy day, scale to zero, idle_stop 20 min", peak, 0, 1200),
        ("quiet day (peak/20), scale to zero, idle_stop 5 min", peak / 20.0, 0, 300),
        ("quiet day (peak/20), one warm machine, idle_stop 5 min", peak / 20.0, 1, 300),
    ] {
        params.peak_jobs_per_hour = peak;
        params.policy.min_warm = min_warm;
        params.policy.idle_stop = Duration::from_secs(idle_stop);
        let wall = Instant::now();
        let r = runtime.block_on(simulate_day(params.clone())).expect("simulation");
        let wall = wall.elapsed();
        let billed_h = r.pool.billed_seconds / 3600.0;
        println!("{label}");
        println!(
            "  {} jobs ({} done) over {:.0} h simulated in {:.1} s wall",
            r.jobs,
            r.completed,
            params.length.as_secs_f64() / 3600.0,
            wall.as_secs_f64()
        );
        println!(
            "  machines: {} launched, peak {}, {} left running; billed {:.2} h (provider {:.2} h), busy {:.2} h, utilisation {:.0} %",
            r.pool.launched,
            r.peak_machines,
            r.left_running,
            billed_h,
            r.provider_billed_seconds / 3600.0,
            r.busy_seconds / 3600.0,
            100.0 * r.busy_seconds / r.pool.billed_seconds.max(1.0)
        );
        println!(
            "  cost ${:.2} (${:.4}/job); queue wait p50 {:.1?} p95 {:.1?} max {:.1?}",
            r.pool.cost_usd,
            r.pool.cost_usd / r.completed.max(1) as f64,
            r.wait_p50,
            r.wait_p95,
            r.wait_max
        );
        println!(
            "  API: {} requests, {} answered 429, {} lease renewals, {} launch failures",
            r.api_requests, r.rate_limited, r.pool.renewals, r.pool.launch_failures
        );
    }
}
