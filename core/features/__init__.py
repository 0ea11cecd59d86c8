"""Feature registry: declared feature views, packed rows per (tenant, entity) in LMDB, versions
switched atomically. Imports base, http, messaging, runtime and state."""
