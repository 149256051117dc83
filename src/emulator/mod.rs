//! Faithful emulators of the external systems comfyrelay talks to, for tests and the offline `dev` mode.

pub mod comfyui;
pub mod runcomfy;
