"""The ingress worker: one uvloop per core serving HTTP. worker.py is the process; guard.py the
auth -> session -> rate-limit chain; routes/ one module per API."""
