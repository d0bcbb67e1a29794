-- Inbox ids are handed out per node by the database, inside the transaction that stores the
-- message, under the node's row lock: in commit order. Several coordinators sharing one
-- database so never give two messages of a node one id, nor a message a smaller id than one the
-- node may already have read (and acknowledged "up to").
ALTER TABLE nodes ADD COLUMN inbox_last BIGINT NOT NULL DEFAULT 0;
UPDATE nodes SET inbox_last = (SELECT COALESCE(MAX(id), 0) FROM inbox WHERE inbox.node_id = nodes.id);
