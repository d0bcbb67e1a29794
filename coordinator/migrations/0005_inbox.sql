-- Direct messages stored for nodes that were offline, until the node acknowledges them. `id`
-- increases in the order messages were stored (the coordinator hands ids out); a node's inbox
-- is read in that order. The payload is raw bytes (BYTEA in PostgreSQL; SQLite stores the blob
-- as it is).
CREATE TABLE inbox (
    node_id TEXT NOT NULL,
    id BIGINT NOT NULL,
    from_node TEXT NOT NULL DEFAULT '',
    from_alias TEXT NOT NULL DEFAULT '',
    from_role TEXT NOT NULL DEFAULT '',
    seq BIGINT NOT NULL DEFAULT 0,
    resent_from TEXT NOT NULL DEFAULT '',
    payload BYTEA NOT NULL,
    size BIGINT NOT NULL,
    stored_ms BIGINT NOT NULL,
    PRIMARY KEY (node_id, id)
);
CREATE INDEX inbox_by_age ON inbox (stored_ms);

-- Each node's inbox usage, kept with every write so limits are checked without counting rows.
ALTER TABLE nodes ADD COLUMN inbox_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN inbox_bytes BIGINT NOT NULL DEFAULT 0;
