-- Ed25519 public keys (hex) that log in to an account by challenge-response.
CREATE TABLE public_keys (
    account TEXT NOT NULL REFERENCES accounts (name),
    id TEXT NOT NULL,
    key TEXT NOT NULL,
    revoked BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (account, id)
);
