"""Two ingress workers' state planes in one process: Owners + a real ZeroMQ mesh over ipc."""
from __future__ import annotations

from tidegate.core.messaging.mesh import Mesh
from tidegate.core.state.owners import Owners
from tidegate.core.state.ring import HashRing


def owner_pair(tmp_path, build):
    """({slot: build(owners)}, {slot: mesh}) for slots 0 and 1; call inside a running loop and
    close the meshes afterwards. build registers its owner-side ops with the Owners it gets."""
    ring = HashRing(range(2))
    services, meshes = {}, {}
    for s in (0, 1):
        owners = Owners(s, ring)
        services[s] = build(owners)
        meshes[s] = Mesh(s, 2, str(tmp_path), owners.handlers, 1 << 20)
        owners.attach(meshes[s])
        meshes[s].start()
    return services, meshes
