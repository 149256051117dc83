//! The job engine: submission, scheduling, running on backends, event logs and subscriptions.
