//! The client-facing test binary: it runs the built `comfyrelay` binary as a user would, from empty
//! temporary directories (`dev` on free ports, the CLI with `--json`), the README's examples, and the
//! Python package's pytest suite against a real `comfyrelay dev`.

mod helpers;

mod cli;
mod contract;
mod dev;
mod python;
mod readme;
