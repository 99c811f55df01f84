"""Generation and weight pushes at the same time: no request fails, and every answer comes whole from one
version's weights, a version that was being served while the request ran."""

from __future__ import annotations

import threading
import time

import httpx

PROMPTS = ["The cat sat on", "Once upon a time", "Hello", "A B C"]
REQUEST = {"prompts": PROMPTS, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True, "logprobs": True}
N_WEIGHTS, N_PUSHES, N_THREADS = 3, 6, 3


def _outputs(body: dict) -> list:
    return [(c["token_ids"], c["logprobs"]) for r in body["results"] for c in r["completions"]]


def test_generation_during_pushes(server, make_weights):
    weights = [make_weights(seed=300 + i) for i in range(N_WEIGHTS)]

    # 1. What each set of weights generates, recorded with nothing else running.
    expected = []
    with server.client() as client:
        for path in weights:
            version = server.weights_version() + 1
            assert server.push(path, version).status_code == 200
            response = client.post("/generate", json=REQUEST)
            assert response.status_code == 200 and response.json()["weights_version"] == version
            expected.append(_outputs(response.json()))
    assert len({str(e) for e in expected}) == N_WEIGHTS  # the weights really generate differently

    # 2. Threads generate in a loop while the main thread pushes those weights again as new versions.
    first = server.weights_version()
    weights_of = {first: N_WEIGHTS - 1}  # version -> index of its weights
    pushed = {first: (0.0, 0.0)}  # version -> (push started, push answered), monotonic seconds
    answers, failures, stop = [], [], threading.Event()

    def generate_loop() -> None:
        with server.client() as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post("/generate", json=REQUEST)
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text}")
                    continue
                answers.append((started, time.monotonic(), response.json()))

    threads = [threading.Thread(target=generate_loop) for _ in range(N_THREADS)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        for i in range(N_PUSHES):
            version = first + 1 + i
            weights_of[version] = i % N_WEIGHTS
            began = time.monotonic()
            response = server.push(weights[i % N_WEIGHTS], version)
            pushed[version] = (began, time.monotonic())
            assert response.status_code == 200, response.text
            time.sleep(0.3)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)

    assert not failures, failures[:3]
    last = first + N_PUSHES
    seen = set()
    for started, finished, body in answers:
        version = body["weights_version"]
        seen.add(version)
        assert version in weights_of, f"unknown version {version}"
        # Served from (at the earliest) the start of its push to (at the latest) the answer of the next push.
        served_from = pushed[version][0]
        served_until = pushed[version + 1][1] if version < last else float("inf")
        assert served_from <= finished and started <= served_until, (version, started, finished)
        assert _outputs(body) == expected[weights_of[version]], f"version {version} generated other outputs"
    assert len(answers) >= N_PUSHES and len(seen) >= 3, (len(answers), sorted(seen))
