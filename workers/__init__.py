"""One module per process kind: the supervisor and the ingress worker."""
