"""HTTP/1.1 types, routing, JSON bodies over the ext/httpconn hot path. Imports core.base and ext."""
