-- Nodes: clients other clients can address. A registered node has the SHA-256 hash of its
-- token's secret (never the token); the role and group it was registered under are the ones it
-- logs in as. Info is a JSON object as text.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts (name),
    -- The routing scope the node was last reachable in (its account, or account#group).
    scope TEXT NOT NULL DEFAULT '',
    role TEXT NOT NULL DEFAULT '',
    grp TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL DEFAULT '',
    location TEXT NOT NULL DEFAULT '',
    info TEXT NOT NULL DEFAULT '{}',
    token_hash TEXT NOT NULL DEFAULT '',
    revoked BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL DEFAULT 0,
    updated_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX nodes_by_account ON nodes (account);
