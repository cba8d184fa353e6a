"""Starting the engine replicas on Ray Serve (a local Ray, or the cluster at `address`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from inhouse.errors import InhouseError
from inhouse.scaleout.client import RayEngineClient
from inhouse.scaleout.replica import EngineReplica, ReplicaSpec

log = logging.getLogger("inhouse.scaleout")

APP_NAME = "inhouse"


@dataclass(frozen=True)
class ReplicaScaling:
    """`replicas` fixed, or autoscaled between `min_replicas` and `max_replicas` on ongoing
    requests (Serve adds a replica when each has more than `target_ongoing` in flight)."""

    replicas: int
    max_replicas: int = 0  # above `replicas`: autoscale between replicas and this
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    target_ongoing: float = 4.0
    max_ongoing: int = 64  # requests one replica accepts at once (its batch and queue)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InhouseError("--replicas must be at least 1")
        if self.max_replicas and self.max_replicas < self.replicas:
            raise InhouseError("--max-replicas must be at least --replicas")

    def deployment_options(self) -> dict:
        opts: dict = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica,
                                  "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": self.max_ongoing,
            "health_check_period_s": 5,
            "health_check_timeout_s": 30,
            "graceful_shutdown_timeout_s": 5,
        }
        if self.max_replicas > self.replicas:
            opts["autoscaling_config"] = {
                "min_replicas": self.replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing}
        else:
            opts["num_replicas"] = self.replicas
        return opts


def start_replicas(spec: ReplicaSpec, scaling: ReplicaScaling, model_config,
                   address: str | None = None) -> RayEngineClient:
    """Deploy the replicas and wait until they are up; the client's shutdown takes them down
    (and the local Ray, when this call started it)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InhouseError("--replicas needs Ray Serve: pip install 'inhouse[ray]'") from None

    connected_here = not ray.is_initialized()
    # a Ray started for this run is this run's to stop whole; a cluster's Serve is shared with
    # whatever else runs on it, so there only our application goes
    owns_ray = connected_here and not address
    if connected_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a local Ray for this run: no dashboard, a small object store (we pass tokens)
            ray.init(include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 * 2**20)
    # no Serve HTTP proxy: the API is inhouse's own, in this process; Serve only routes to the
    # replicas through their handle
    serve.start(http_options={"location": "NoServer"})
    deployment = serve.deployment(EngineReplica, name="EngineReplica",
                                  **scaling.deployment_options())
    log.info("starting %d engine replica(s) on Ray Serve", scaling.replicas)
    handle = serve.run(deployment.bind(spec), name=APP_NAME, route_prefix=None)

    def stop() -> None:
        try:
            if owns_ray:  # Serve and every replica go with it
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
            if connected_here:
                ray.shutdown()
        except Exception as e:  # noqa: BLE001 - stopping anyway
            log.warning("stopping the replicas: %s", e)

    return RayEngineClient(handle, model_config, on_shutdown=stop)
