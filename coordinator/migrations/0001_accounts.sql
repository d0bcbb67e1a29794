-- Accounts, their hashed access codes and their role rules. The same SQL runs on SQLite and
-- PostgreSQL: flags are BIGINT 0/1 and filter lists are JSON text.
CREATE TABLE accounts (
    name TEXT PRIMARY KEY,
    enabled BIGINT NOT NULL DEFAULT 1,
    isolate_groups BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE access_codes (
    account TEXT NOT NULL REFERENCES accounts (name),
    id TEXT NOT NULL,
    hash TEXT NOT NULL,
    revoked BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (account, id)
);

CREATE TABLE roles (
    account TEXT NOT NULL REFERENCES accounts (name),
    role TEXT NOT NULL,
    publish TEXT NOT NULL,
    subscribe TEXT NOT NULL,
    PRIMARY KEY (account, role)
);
