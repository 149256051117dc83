//! Replays of the captured traces.
