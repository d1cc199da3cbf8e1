"""Scale-out: the same server as Ray Serve replicas (``leapc serve --ray``).

Each replica is a process of its own that loads the engine and runs `create_app`'s app,
continuous batching included; Ray's HTTP proxy spreads requests over the replicas. The
app is built on the replica (an ingress builder), so nothing but the engine's path and
the config crosses to it. Ray is an extra of its own (``pip install 'leapc[ray]'``): the
plain server does not need it.

    from leapc.runtime.serving.ray_app import application
    serve.run(application("engine/", ServeConfig("pycoder"), replicas=2))
"""

from __future__ import annotations

from pathlib import Path

from ray import serve
from ray.serve import Application

from leapc.runtime.serving.app import ServeConfig, create_app


def application(engine_dir: Path | str, config: ServeConfig, replicas: int = 1,
                cpus_per_replica: int = 1) -> Application:
    """The server as a Ray Serve application of ``replicas`` replicas, each running its
    engine on as many threads as Ray gives it CPUs (two replicas' thread pools on the
    same cores would spin against each other)."""
    engine_dir = str(Path(engine_dir).resolve())

    def build():
        import leapc

        return create_app(leapc.load(engine_dir, policies=[config.policy]), config)

    deployment = serve.deployment(serve.ingress(build)(), name="leapc")
    threads = {"env_vars": {"LEAPC_THREADS": str(cpus_per_replica)}}
    return deployment.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "runtime_env": threads}).bind()


def serve_forever(engine_dir: Path | str, config: ServeConfig, replicas: int, host: str,
                  port: int) -> None:
    """Start a local Ray instance and serve on ``host:port`` until interrupted."""
    import ray

    ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(engine_dir, config, replicas), route_prefix="/", blocking=True)
