//! Integration tests against the ComfyUI emulator (added when the emulator lands).
