-- The leader's fencing term. A replica that takes the leader lease adds one to it (waiting for the
-- transactions of the previous leader that still hold it), and every write of a leader reads it FOR SHARE
-- at the start of its transaction and gives up when it is no longer its own: a deposed leader's writes
-- that reach the database late (a partition that heals, a process that was paused) fail instead of
-- landing after its successor's.

CREATE TABLE leader_term (
    id    SMALLINT PRIMARY KEY CHECK (id = 1),
    term  BIGINT NOT NULL
);
INSERT INTO leader_term (id, term) VALUES (1, 0);
