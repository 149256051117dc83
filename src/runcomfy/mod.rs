//! RunComfy Server API client: rate-limited, retrying, tolerant of the API's documented quirks.
