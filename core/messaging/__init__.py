"""ZeroMQ between processes: the protocol (every op of every socket), fd reading, the supervisor link,
the ingress mesh, the control socket and the client of blocking workers. Imports core.base, core.http."""
