"""`docker`: a DockerSpec run as a sandboxed container of the node's Docker engine.

Every container is sandboxed unless the node's operator allows more: no network
(`network_mode="none"`; a task may ask for one only where `docker_allow_network` is set), a
read-only root, a tmpfs at /tmp (`docker_tmpfs_mb`, writable by anyone), no capabilities,
no-new-privileges, the unprivileged `docker_user`, and limits on memory (no swap), CPUs and
processes: the task's own where it sets them, within the node's (`docker_memory_mb`,
`docker_cpus`, `docker_pids`), else the node's. Host paths are mounted only where the operator
lists them (`docker_mounts`): never at a task's request.

The task's secrets are files, not environment: one per secret at /run/secrets/<variable>,
readable only by `docker_user` (when it is a uid), on the node's tmpfs (/dev/shm, so the engine
must be on the node's machine), bind-mounted read-only and removed with the container.

Input files (`files`) must be absolute paths under /work: they are written into a scratch
volume mounted at /work before the container starts, and removed with it (a read-only root
leaves no other place to put them before the start). They and their directories belong to
root, so the task's unprivileged user reads them and cannot change them: it writes to /tmp.

The image must be on the node unless the task's pull policy says otherwise (unset means
never). Output streams as it comes, redacted; the container is removed however the task ends.
Containers carry the labels `shoal.managed=1`, `shoal.task`, `shoal.node` (the node's
configured `node_id`), `shoal.host` and `shoal.pid`: a node that starts removes the leftovers
of its own id and of node processes of its machine that are gone.
"""

from shoal.node.executors.docker.executor import DockerExecutor
from shoal.node.executors.docker.sandbox import (
    FILES_DIR,
    LABEL_HOST,
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_PID,
    LABEL_TASK,
)

__all__ = [
    "FILES_DIR",
    "LABEL_HOST",
    "LABEL_MANAGED",
    "LABEL_NODE",
    "LABEL_PID",
    "LABEL_TASK",
    "DockerExecutor",
]
