"""Scale-out: the server as Ray Serve replicas on a local Ray instance the test starts
(runtime/serving/ray_app.py)."""

from __future__ import annotations

import socket

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'leapc[ray]')")
openai = pytest.importorskip("openai", reason="the openai package is not installed "
                                              "(pip install -e '.[dev]')")
from ray import serve  # noqa: E402

import leapc  # noqa: E402
from leapc.runtime.serving.app import ServeConfig  # noqa: E402
from leapc.runtime.serving.ray_app import application  # noqa: E402

PROMPTS = ([5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [3], [9, 9, 9, 9], list(range(40, 70)))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_replicas_serve_what_the_engine_generates(engine_dir):
    path = engine_dir("tiny-llama")
    engine = leapc.load(path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(path, ServeConfig("tiny", "lookup"), replicas=2),
                  route_prefix="/")
        deployment = serve.status().applications["default"].deployments["leapc"]
        assert deployment.replica_states == {"RUNNING": 2}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0)
        for prompt in PROMPTS * 2:
            reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                              temperature=0)
            assert reply.choices[0].text == engine.generate(prompt, 24).text
        with pytest.raises(openai.BadRequestError, match="does not support policy"):
            client.completions.create(model="tiny", prompt=[3], max_tokens=4,
                                      extra_body={"leapc": {"policy": "medusa"}})
    finally:
        serve.shutdown()
        ray.shutdown()
