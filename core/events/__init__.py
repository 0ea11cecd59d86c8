"""Event log (partitions, recovery, retention), this worker's partition as an owner, materialized
views and the admin log actions. Imports base, http, messaging, runtime and state."""
