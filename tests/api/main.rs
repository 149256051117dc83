//! The one integration-test binary: every test talks to a real comfyrelay over gRPC on 127.0.0.1:0.

mod helpers;

mod auth;
mod cancel;
mod config_errors;
mod faults;
mod foundation;
mod generations;
mod hardening;
mod jobs;
mod load;
mod machines;
mod migration;
mod objects;
mod observability;
mod policies;
mod pool;
mod recovery;
mod replicas;
mod tls;
mod workflows;
