"""RPC plumbing shared by both daemons and the CLI: server/channel builders, error mapping, conversion."""
