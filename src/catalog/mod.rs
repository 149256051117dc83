//! The workflow catalog: API-format ComfyUI graphs with manifests of their typed inputs; validation of a
//! request against them and injection of values into the graph.
//!
//! The repository's `workflows/` are compiled into the binary (see `build.rs`) and are the catalog by
//! default; a directory (`workflows_dir`) adds to them and overrides them by name, and only it is reloaded.
//!
//! Layout: [`model`] (the domain types), `manifest` (parsing `manifest.toml` against `workflow.json`),
//! `graph` (API-format structure checks), `image_header` (an input image's declared size), `object_info` (checks against a backend's `/object_info`),
//! `prepare` (request validation and injection), `watch` (the reload task).
//!
//! Knows nothing of gRPC, the job engine, uploads or how to reach a ComfyUI server: callers pass the
//! backend's `/object_info` in when they have it.

mod graph;
mod image_header;
mod manifest;
pub mod model;
mod object_info;
mod outputs;
mod prepare;
mod values;
mod watch;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::watch as tokio_watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use graph::{GraphProblem, check_structure, parse_graph};
pub use image_header::{ImageHeader, ImageHeaderError, read_image_header};
pub use manifest::{ManifestProblem, SourceFile, parse_workflow};
pub use model::{InputKind, InputSpec, InputTarget, OutputSpec, Requirements, ScalarValue, Workflow};
pub use outputs::{declared_outputs, node_classes, streams_over_websocket};
pub use prepare::{
    FieldViolation, INLINE_WORKFLOW, ImageInput, ImageSlot, JobInputs, MAX_RANDOM_SEED, ParamValue,
    PreparedJob, WorkflowSource, inject_uploaded,
};

/// The manifest file in each workflow directory.
pub const MANIFEST_FILE: &str = "manifest.toml";
/// The API-format graph file in each workflow directory.
pub const GRAPH_FILE: &str = "workflow.json";

/// Why the catalog could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The workflows directory itself could not be read.
    #[error("cannot read the workflows directory {}: {source}", path.display())]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// One or more workflow files are invalid; each problem names its file.
    #[error("invalid workflows: {}", join_problems(.0))]
    Invalid(Vec<LoadProblem>),
}

fn join_problems(problems: &[LoadProblem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// One problem found while loading: the file and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProblem {
    /// The file (or workflow directory) concerned.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// The outcome of loads so far, for observers (and tests) of the reload task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Successful loads, the first included.
    pub generation: u64,
    /// Reload attempts since the first load, successful or not.
    pub attempts: u64,
    /// Why the last attempt failed; `None` after a success.
    pub last_error: Option<String>,
    /// Whether the reload task is watching the directory and SIGHUP.
    pub watching: bool,
}

/// An immutable set of workflows, sorted by name.
#[derive(Debug, Default)]
struct Snapshot {
    workflows: Vec<Arc<Workflow>>,
}

#[derive(Debug)]
struct Inner {
    /// The directory read at load and on reload; `None`: the bundled workflows only.
    dir: Option<PathBuf>,
    /// Workflows under the directory's: a directory workflow of the same name replaces one of these.
    base: Vec<Arc<Workflow>>,
    // A std lock: held only to clone or swap an `Arc`, never across an await.
    current: RwLock<Arc<Snapshot>>,
    status: tokio_watch::Sender<ReloadStatus>,
}

/// The workflow catalog. Cheap to clone; every clone sees reloads.
#[derive(Debug, Clone)]
pub struct Catalog {
    inner: Arc<Inner>,
}

impl Catalog {
    /// Loads every workflow under `dir` (one directory per workflow holding `manifest.toml` and
    /// `workflow.json`; files and hidden directories are ignored).
    ///
    /// # Errors
    /// [`CatalogError::ReadDir`] if `dir` cannot be read; [`CatalogError::Invalid`] listing every bad file
    /// with its path and reason.
    pub fn load(dir: &Path) -> Result<Self, CatalogError> {
        let snapshot = load_snapshot(Some(dir), &[])?;
        Ok(Self::from_snapshot(Some(dir), Vec::new(), snapshot))
    }

    /// The bundled workflows (compiled into the binary), with the workflows under `overlay`, if given,
    /// added to them; an overlay workflow replaces the bundled one of the same name. Only the overlay is
    /// read from disk, by [`Catalog::reload`] and [`Catalog::watch`] too.
    ///
    /// # Errors
    /// As [`Catalog::load`] for the overlay; [`CatalogError::Invalid`] if a bundled workflow is invalid
    /// (a build the catalog tests would have failed).
    pub fn with_bundled(overlay: Option<&Path>) -> Result<Self, CatalogError> {
        let base = bundled_workflows()?;
        let snapshot = load_snapshot(overlay, &base)?;
        Ok(Self::from_snapshot(overlay, base, snapshot))
    }

    /// A catalog of the given workflows (e.g. built with [`parse_workflow`] in tests), as if loaded from
    /// `dir`, which [`Catalog::reload`] and [`Catalog::watch`] read later.
    ///
    /// # Errors
    /// [`CatalogError::Invalid`] if two workflows share a name.
    pub fn from_workflows(dir: &Path, workflows: Vec<Workflow>) -> Result<Self, CatalogError> {
        let mut workflows: Vec<Arc<Workflow>> = workflows.into_iter().map(Arc::new).collect();
        workflows.sort_by(|a, b| a.name.cmp(&b.name));
        let duplicates: Vec<LoadProblem> = workflows
            .windows(2)
            .filter(|pair| pair[0].name == pair[1].name)
            .map(|pair| LoadProblem {
                path: dir.join(&pair[0].name),
                reason: "two workflows have this name".into(),
            })
            .collect();
        if !duplicates.is_empty() {
            return Err(CatalogError::Invalid(duplicates));
        }
        Ok(Self::from_snapshot(Some(dir), Vec::new(), Snapshot { workflows }))
    }

    fn from_snapshot(dir: Option<&Path>, base: Vec<Arc<Workflow>>, snapshot: Snapshot) -> Self {
        let (status, _) = tokio_watch::channel(ReloadStatus { generation: 1, ..ReloadStatus::default() });
        Self {
            inner: Arc::new(Inner {
                dir: dir.map(Path::to_path_buf),
                base,
                current: RwLock::new(Arc::new(snapshot)),
                status,
            }),
        }
    }

    /// The directory the catalog loads from; `None` when it holds only the bundled workflows.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Every workflow, sorted by name.
    pub fn list(&self) -> Vec<Arc<Workflow>> {
        self.snapshot().workflows.clone()
    }

    /// The workflow called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Workflow>> {
        let snapshot = self.snapshot();
        snapshot
            .workflows
            .binary_search_by(|w| w.name.as_str().cmp(name))
            .ok()
            .and_then(|i| snapshot.workflows.get(i).cloned())
    }

    /// Validates a request and builds the graph to run, reporting every problem at once (see the
    /// `prepare` module docs for the field names). `object_info` is the backend's `/object_info`, when
    /// known; the graph is then checked against it too.
    ///
    /// # Errors
    /// One [`FieldViolation`] per problem.
    pub fn prepare(
        &self,
        source: WorkflowSource,
        inputs: JobInputs,
        object_info: Option<&serde_json::Value>,
    ) -> Result<PreparedJob, Vec<FieldViolation>> {
        match source {
            WorkflowSource::Named(name) => match self.get(&name) {
                Some(workflow) => prepare::prepare_named(&workflow, inputs, object_info),
                None => {
                    let all = self.list();
                    let mut known =
                        all.iter().take(20).map(|w| w.name.as_str()).collect::<Vec<_>>().join(", ");
                    if all.is_empty() {
                        known = "(no workflows)".to_string();
                    } else if all.len() > 20 {
                        known.push_str(&format!(", … ({} in all; see ListWorkflows)", all.len()));
                    }
                    Err(vec![FieldViolation::new(
                        "workflow",
                        format!(
                            "unknown workflow `{}`; the catalog has: {known}",
                            crate::limits::echo(&name)
                        ),
                    )])
                }
            },
            WorkflowSource::Inline(text) => prepare::prepare_inline(&text, inputs, object_info),
        }
    }

    /// Reloads from the directory now (the bundled workflows do not change). On failure the current
    /// catalog stays in service.
    ///
    /// # Errors
    /// Why the new files were rejected.
    pub fn reload(&self) -> Result<(), CatalogError> {
        let result = load_snapshot(self.inner.dir.as_deref(), &self.inner.base);
        let dir = self.inner.dir.as_deref().unwrap_or(Path::new("<bundled>")).display();
        let outcome = match result {
            Ok(snapshot) => {
                let count = snapshot.workflows.len();
                *self.inner.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
                tracing::info!(workflows = count, %dir, "workflow catalog reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, %dir, "workflow catalog reload rejected; keeping the last good catalog");
                Err(e)
            }
        };
        self.inner.status.send_modify(|s| {
            s.attempts += 1;
            match &outcome {
                Ok(()) => {
                    s.generation += 1;
                    s.last_error = None;
                }
                Err(e) => s.last_error = Some(e.to_string()),
            }
        });
        outcome
    }

    /// Follows the outcome of loads and reloads.
    pub fn status(&self) -> tokio_watch::Receiver<ReloadStatus> {
        self.inner.status.subscribe()
    }

    /// Spawns the owned reload task: it reloads when files under the directory change (debounced) or on
    /// SIGHUP, and stops when `cancel` is cancelled. Exit policy: errors (a bad file, a watcher failure)
    /// are logged and the task goes on with the last good catalog; it never ends the service. Without a
    /// directory there is nothing to reload and the task ends at once.
    pub fn watch(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let Some(dir) = self.inner.dir.clone() else {
            return tokio::spawn(async {});
        };
        let span = tracing::info_span!("catalog_watch", dir = %dir.display());
        tokio::spawn(watch::run(self.clone(), dir, cancel).instrument(span))
    }

    fn set_watching(&self, watching: bool) {
        self.inner.status.send_modify(|s| s.watching = watching);
    }
}

/// The workflows compiled into the binary: `(name, manifest.toml, workflow.json)` from `build.rs`.
const BUNDLED: &[(&str, &str, &str)] = include!(concat!(env!("OUT_DIR"), "/bundled_workflows.rs"));

/// Parses the bundled workflows (problems are named as `<bundled>/name/file`).
fn bundled_workflows() -> Result<Vec<Arc<Workflow>>, CatalogError> {
    let mut problems = Vec::new();
    let mut workflows = Vec::new();
    for (name, manifest, graph) in BUNDLED {
        match parse_workflow(name, manifest, graph) {
            Ok(w) => workflows.push(Arc::new(w)),
            Err(found) => problems.extend(found.into_iter().map(|p| LoadProblem {
                path: Path::new("<bundled>").join(name).join(match p.file {
                    SourceFile::Manifest => MANIFEST_FILE,
                    SourceFile::Graph => GRAPH_FILE,
                }),
                reason: p.reason,
            })),
        }
    }
    if !problems.is_empty() {
        return Err(CatalogError::Invalid(problems));
    }
    Ok(workflows)
}

/// `base`, with every workflow directory under `dir` added (replacing a base workflow of its name).
fn load_snapshot(dir: Option<&Path>, base: &[Arc<Workflow>]) -> Result<Snapshot, CatalogError> {
    let mut workflows = match dir {
        Some(dir) => read_dir_workflows(dir)?,
        None => Vec::new(),
    };
    for w in base {
        if workflows.iter().any(|o| o.name == w.name) {
            tracing::debug!(workflow = %w.name, "a workflows_dir workflow overrides the bundled one");
        } else {
            workflows.push(w.clone());
        }
    }
    workflows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Snapshot { workflows })
}

/// Reads every workflow directory under `dir`.
fn read_dir_workflows(dir: &Path) -> Result<Vec<Arc<Workflow>>, CatalogError> {
    let read_dir_err = |source| CatalogError::ReadDir { path: dir.to_path_buf(), source };
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_err)? {
        let entry = entry.map_err(read_dir_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        dirs.push((name, entry.path()));
    }
    dirs.sort();
    let mut problems = Vec::new();
    let mut workflows = Vec::new();
    for (name, path) in dirs {
        let read = |file: &str| {
            let path = path.join(file);
            std::fs::read_to_string(&path)
                .map_err(|e| LoadProblem { reason: format!("cannot read: {e}"), path })
        };
        let (manifest, graph) = match (read(MANIFEST_FILE), read(GRAPH_FILE)) {
            (Ok(m), Ok(g)) => (m, g),
            (m, g) => {
                problems.extend(m.err());
                problems.extend(g.err());
                continue;
            }
        };
        match parse_workflow(&name, &manifest, &graph) {
            Ok(workflow) => workflows.push(Arc::new(workflow)),
            Err(found) => problems.extend(found.into_iter().map(|p| LoadProblem {
                path: path.join(match p.file {
                    SourceFile::Manifest => MANIFEST_FILE,
                    SourceFile::Graph => GRAPH_FILE,
                }),
                reason: p.reason,
            })),
        }
    }
    if !problems.is_empty() {
        return Err(CatalogError::Invalid(problems));
    }
    Ok(workflows)
}

#[cfg(test)]
mod tests;
