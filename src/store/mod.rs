//! Durable storage of jobs, events, idempotency keys and machines (SQLite by default), and the
//! content-addressed artifact directory.
