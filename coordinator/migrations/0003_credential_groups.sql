-- Groups each access code and key may act in (JSON list; empty: any group).
ALTER TABLE access_codes ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';
ALTER TABLE public_keys ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';
