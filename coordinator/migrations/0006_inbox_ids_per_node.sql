-- Inbox ids are handed out per node by the database, inside the transaction that stores the
-- message, under the node's row lock: in commit order. Several coordinators sharing one
-- database so never give two messages of a node one id, nor a message a smaller id than one the
-- node may already have read (and acknowledged "up to").
--
-- Ids handed out before were the coordinator's clock in microseconds (below 2e15 until 2033):
-- the nodes that exist now go on from 2e15, so an id never comes again, even for a client that
-- read the old ones and is still connected.
ALTER TABLE nodes ADD COLUMN inbox_last BIGINT NOT NULL DEFAULT 0;
UPDATE nodes SET inbox_last = 2000000000000000;
