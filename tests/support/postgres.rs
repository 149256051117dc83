//! A throwaway PostgreSQL server for tests: `initdb` into a temporary directory, then `postgres` as a child
//! process of the test on a free loopback port, stopped when the [`PgServer`] drops. Test support, shared by
//! the library's unit tests (`src/store/postgres.rs`) and the integration test binaries (each includes it
//! with `#[path]`).
//!
//! The binaries are found on `PATH`, else under `/usr/lib/postgresql/*/bin` (the highest version; Debian's
//! package `postgresql`). Without them [`PgServer::start`] returns `None` and the test returns early,
//! unless `CI` is set: then it panics, since `.ci/run` installs them.
//!
//! PostgreSQL refuses to run as root: as root, the directory is handed to the `postgres` system user (or
//! `nobody`) and both programs run as that user.

#![allow(dead_code, unreachable_pub, reason = "shared test support; each includer uses part of it")]

use std::{
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sqlx::{Connection as _, Executor as _, postgres::PgConnection};

/// The superuser `initdb` creates (trust authentication, so no password).
const USER: &str = "comfyrelay";

/// How long the server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stopping server may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running PostgreSQL server, stopped (and its directory removed) on drop.
#[derive(Debug)]
pub struct PgServer {
    /// The data directory (`data/`), the socket and the server's log (`postgres.log`).
    dir: tempfile::TempDir,
    /// The loopback port it listens on.
    port: u16,
    /// The `postgres` process (`None` while stopped).
    child: Option<Child>,
    /// The directory of the binaries, and whether the server runs with the durable defaults: to start
    /// it again.
    bin: PathBuf,
    durable: bool,
}

impl PgServer {
    /// Initialises a cluster in a temporary directory and starts a server on it, ready for connections.
    /// `None` when the PostgreSQL binaries are not installed (and `CI` is not set).
    ///
    /// # Panics
    /// Under `CI` without the binaries; when `initdb` fails or the server does not come up (with the tail of
    /// its log).
    pub async fn start() -> Option<PgServer> {
        Self::start_with(false).await
    }

    /// [`PgServer::start`] with PostgreSQL's durable defaults (`fsync`, `synchronous_commit` and
    /// `full_page_writes` on), for benchmarks: every commit waits for its WAL flush.
    ///
    /// # Panics
    /// As [`PgServer::start`].
    pub async fn start_durable() -> Option<PgServer> {
        Self::start_with(true).await
    }

    async fn start_with(durable: bool) -> Option<PgServer> {
        let Some(bin) = find_binaries() else {
            if std::env::var_os("CI").is_some() {
                panic!("PostgreSQL binaries not found; .ci/run installs the Debian package postgresql");
            }
            eprintln!(
                "skipping: PostgreSQL binaries (initdb, postgres) not found on PATH or under \
                 /usr/lib/postgresql/*/bin"
            );
            return None;
        };
        let spawned_with = bin.clone();
        let (dir, port, child) = tokio::task::spawn_blocking(move || init_and_spawn(&spawned_with, durable))
            .await
            .expect("starting PostgreSQL");
        let mut server = PgServer { dir, port, child: Some(child), bin, durable };
        server.wait_ready().await;
        Some(server)
    }

    /// Stops the server (fast shutdown: its clients are disconnected), as an outage of the database does;
    /// [`PgServer::start_again`] brings it back on the same port with the same data.
    pub async fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            tokio::task::spawn_blocking(move || stop(child)).await.expect("stopping PostgreSQL");
        }
    }

    /// Starts a stopped server again, ready for connections.
    ///
    /// # Panics
    /// The server does not come up.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let (bin, dir, port, durable) =
            (self.bin.clone(), self.dir.path().to_path_buf(), self.port, self.durable);
        let child = tokio::task::spawn_blocking(move || spawn(&bin, &dir, port, durable))
            .await
            .expect("starting PostgreSQL");
        self.child = Some(child);
        self.wait_ready().await;
    }

    /// The URL of the `postgres` database, as the superuser.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// Creates a fresh, empty database `name` (letters, digits and `_`) and returns its URL.
    ///
    /// # Panics
    /// An invalid name, or the database cannot be created.
    pub async fn database(&self, name: &str) -> String {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "database name {name:?}"
        );
        let mut conn = PgConnection::connect(&self.url()).await.expect("connecting to PostgreSQL");
        conn.execute(format!("CREATE DATABASE \"{name}\"").as_str()).await.expect("CREATE DATABASE");
        conn.close().await.ok();
        self.url_of(name)
    }

    fn url_of(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Retries a connection until one succeeds, the server exits or the deadline passes.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = self.url();
        loop {
            let error = match PgConnection::connect(&url).await {
                Ok(conn) => {
                    conn.close().await.ok();
                    return;
                }
                Err(e) => e,
            };
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() >= deadline {
                panic!(
                    "PostgreSQL did not come up ({}; last error: {error}); the end of its log:\n{}",
                    exited.map_or_else(|| "timed out".to_owned(), |s| format!("exited: {s}")),
                    tail(&self.log_path())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop(child);
        }
    }
}

/// Stops a server: SIGINT, PostgreSQL's fast shutdown (disconnects clients, no waiting for them), then a
/// kill after [`STOP_TIMEOUT`]; blocking.
fn stop(mut child: Child) {
    let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).status();
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The directory holding both `initdb` and `postgres`: on `PATH`, else the highest version under
/// `/usr/lib/postgresql/*/bin`.
fn find_binaries() -> Option<PathBuf> {
    let has_both = |dir: &Path| ["initdb", "postgres"].iter().all(|b| is_executable(&dir.join(b)));
    if let Some(path) = std::env::var_os("PATH") {
        // The directory `initdb` is in (perhaps through a symlink): `postgres` of the same version.
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if is_executable(&initdb) {
                let real_dir =
                    std::fs::canonicalize(&initdb).ok().and_then(|p| Some(p.parent()?.to_path_buf()));
                if let Some(real_dir) = real_dir.filter(|d| has_both(d)) {
                    return Some(real_dir);
                }
                if has_both(&dir) {
                    return Some(dir);
                }
            }
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version =
                e.file_name().to_str()?.split('.').map(|p| p.parse().ok()).collect::<Option<_>>()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_both(bin))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The user to run PostgreSQL as, when this process is root: `postgres`, else `nobody`.
fn unprivileged_user() -> Option<(u32, u32)> {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    if uid != 0 {
        return None;
    }
    let from_passwd = Command::new("getent").args(["passwd", "postgres"]).output().ok().and_then(|out| {
        let line = String::from_utf8(out.stdout).ok()?;
        let mut fields = line.trim().split(':').skip(2);
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    });
    Some(from_passwd.unwrap_or((65534, 65534)))
}

/// One of PostgreSQL's programs, run in `dir` (the test's directory may not be readable by the unprivileged
/// user), as that user when this process is root.
fn command(bin: &Path, program: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(bin.join(program));
    cmd.current_dir(dir).env("LC_ALL", "C").env_remove("PGDATA");
    if let Some((uid, gid)) = unprivileged_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// `initdb`, then the server as a child process; blocking.
fn init_and_spawn(bin: &Path, durable: bool) -> (tempfile::TempDir, u16, Child) {
    let dir = tempfile::Builder::new().prefix("comfyrelay-pg-").tempdir().expect("temporary directory");
    let user = unprivileged_user();
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the PostgreSQL directory");
    }
    let data = dir.path().join("data");
    let out = command(bin, "initdb", dir.path())
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", USER, "-N", "--no-instructions", "-E", "UTF8", "--locale=C"])
        .stdin(Stdio::null())
        .output()
        .expect("running initdb");
    assert!(
        out.status.success(),
        "initdb failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let child = spawn(bin, dir.path(), port, durable);
    (dir, port, child)
}

/// The server on the cluster in `dir`, listening on `port`; blocking.
fn spawn(bin: &Path, dir: &Path, port: u16, durable: bool) -> Child {
    // Appended to: a server started again keeps the log of its first run.
    let log =
        File::options().create(true).append(true).open(dir.join("postgres.log")).expect("the server's log");
    command(bin, "postgres", dir)
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(dir)
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"])
        // Tests trade durability for speed; a benchmark keeps PostgreSQL's defaults.
        .args(if durable {
            &[][..]
        } else {
            &["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"][..]
        })
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("the server's log"))
        .stderr(log)
        .spawn()
        .expect("starting postgres")
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    const MAX: u64 = 4000;
    let Ok(mut file) = File::open(path) else { return format!("({} unreadable)", path.display()) };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut text = Vec::new();
    let _ = file.read_to_end(&mut text);
    String::from_utf8_lossy(&text).into_owned()
}
