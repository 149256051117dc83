-- Values every replica of one deployment shares, written once by the first replica that needs them
-- (`instance_id`: the stem of the WebSocket clientIds, so the replica that takes over opens the sockets
-- ComfyUI routes the events of the previous leader's prompts to).

CREATE TABLE replica_settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
