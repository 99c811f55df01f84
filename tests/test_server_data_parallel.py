"""``generator-server --data-parallel-size 2``: two vLLM engines in one server (vLLM's own data
parallelism; on the CPU build, two engine cores with a worker each). Requests are balanced over the
engines; a weight reload must reach both before the new version is served, so concurrent requests, which
land on both engines, all see the new weights. One more real server, started here."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import API_KEY
from server_process import running_server

from trainer_client.client import GeneratorClient

PROMPTS = ["The cat sat", "Once upon a time", "Count to 3:"]
CONCURRENT = 8


def greedy_everywhere(client: GeneratorClient) -> list:
    """The same greedy request sent ``CONCURRENT`` times at once (the engines share them out)."""

    def one(_):
        out = client.generate(prompts=PROMPTS, n=1, max_tokens=12, temperature=0.0, logprobs=True)
        return out.weights_version, [[c.token_ids for c in r.completions] for r in out.results]

    with ThreadPoolExecutor(CONCURRENT) as pool:
        return list(pool.map(one, range(CONCURRENT)))


@pytest.mark.slow  # starts a server of its own
def test_a_reload_reaches_every_engine_before_the_version_is_served(tiny_model_dir, make_weights):
    from safetensors.torch import load_file

    with running_server(
        tiny_model_dir, "--api-key", API_KEY, "--data-parallel-size", "2", "--max-model-len", "256"
    ) as server:
        log = server.log_path.read_text()
        assert "EngineCore_DP0" in log and "EngineCore_DP1" in log  # two engines
        with GeneratorClient(server.url, api_key=API_KEY, timeout=120) as client:
            assert "ipc" not in client.weights_spec().transports  # one GPU's IPC handles cannot feed both
            before = greedy_everywhere(client)
            assert len({repr(answer) for answer in before}) == 1 and before[0][0] == 0
            reloads = server.log_path.read_text().count("Reloading and processing weights")
            client.push_weights(load_file(make_weights(seed=3)), version=1)
            after = greedy_everywhere(client)
    assert len({repr(answer) for answer in after}) == 1  # every engine serves the new weights
    assert after[0][0] == 1 and after[0][1] != before[0][1]
    # each engine's worker reloaded once (vLLM logs one line per worker and reload)
    assert server.log_path.read_text().count("Reloading and processing weights") - reloads == 2
