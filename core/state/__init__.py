"""Per-key state with one owner: the ring, the owners seam (local call or mesh hop), API keys,
sessions, rate-limit decisions. Imports core.base, core.http, core.messaging, core.runtime."""
