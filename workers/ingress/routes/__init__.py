"""Route handlers of the ingress worker, one module per API; each exposes add_to(router, guard)."""
