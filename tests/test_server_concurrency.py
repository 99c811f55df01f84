"""Generation and weight pushes at the same time: no request fails, and every answer comes whole from one
version's weights, a version that was being served while the request ran."""

from __future__ import annotations

import threading
import time

import httpx
from conftest import ON_GPU, answer_distance, same_outputs

PROMPTS = ["The cat sat on", "Once upon a time", "Hello", "A B C"]
REQUEST = {"prompts": PROMPTS, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True, "logprobs": True}
N_WEIGHTS, N_PUSHES, N_THREADS = 3, 6, 3


def _outputs(body: dict) -> dict:
    """The answer without its version, which differs between pushes of the same weights."""
    return {**body, "weights_version": None}


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
    assert not any(same_outputs(a, b) for i, a in enumerate(expected) for b in expected[i + 1 :])

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
        own = expected[weights_of[version]]
        if ON_GPU:  # not bit-reproducible next to other requests: its own expected answer is the nearest
            distances = [answer_distance(body, e) for e in expected]
            others = [d for i, d in enumerate(distances) if i != weights_of[version]]
            assert distances[weights_of[version]] < min(others), (version, distances)
        else:
            assert same_outputs(_outputs(body), own), f"version {version} generated other outputs"
    assert len(answers) >= N_PUSHES and len(seen) >= 3, (len(answers), sorted(seen))


RUNNING = "generator_generate_requests_running"
PUSH_WAITING = "generator_weight_loads_waiting"
HELD_BACK = "generator_generate_requests_waiting"
STEP_DEADLINE_S = 300.0
"""Generous: how long one step of a test may take to be seen on a (loaded) machine before it counts as
failed. The tests wait on what the server says it is doing, never on how long something took."""
HEALTH_BOUND_S = 5.0
"""Most seconds /health may take while the engine generates: hundreds of times its cost on an idle server
(5-10 ms on the 2-core CPU); before the event loop was freed of the long pauses it answered no poll for
20 s in a loaded run (issue 29)."""


def _gauges(client: httpx.Client) -> dict[str, float]:
    """The server's gauges, read in one answer of /metrics (so all at one moment)."""
    lines = client.get("/metrics").text.splitlines()
    return {
        k: float(v)
        for k, _, v in (line.partition(" ") for line in lines)
        if k in (RUNNING, PUSH_WAITING, HELD_BACK)
    }


def _long_request(n_prompts: int) -> dict:
    return {"prompts": ["The cat"] * n_prompts, "max_tokens": 250, "ignore_eos": True}


def _push_during_a_long_request(server, weights, n_prompts: int) -> tuple[dict[str, int], dict] | None:
    """Start a long request; once the server says it runs, push; once the push waits for it, send a short
    request; once the short one is held back behind the push, let everything end. Returns the version each
    request was served from and the gauges at the moment all three were seen at once; None if the long
    request ended before that moment (the caller tries a longer one)."""
    version = server.weights_version() + 1
    answered: dict[str, httpx.Response] = {}

    def run(name: str, body: dict) -> None:
        with server.client(timeout=STEP_DEADLINE_S * 2) as client:
            answered[name] = client.post("/generate", json=body)

    def push() -> None:
        answered["push"] = server.push(weights, version)

    def wait_for(client, seen, *threads_ending_it) -> dict | None:
        """The gauges once ``seen(gauges)``; None if the long request ends first."""
        deadline = time.monotonic() + STEP_DEADLINE_S
        while not seen(gauges := _gauges(client)):
            if "long" in answered:
                return None
            assert time.monotonic() < deadline, f"not seen in {STEP_DEADLINE_S:.0f} s: {gauges}"
            time.sleep(0.02)
        return gauges

    threads = [threading.Thread(target=run, args=("long", _long_request(n_prompts)))]
    threads[0].start()
    snapshot = None
    with server.client() as client:
        if wait_for(client, lambda g: g[RUNNING] == 1) is not None:
            threads.append(threading.Thread(target=push))
            threads[-1].start()
            if wait_for(client, lambda g: g[RUNNING] == 1 and g[PUSH_WAITING] == 1) is not None:
                threads.append(
                    threading.Thread(target=run, args=("short", {"prompts": ["Hi"], "max_tokens": 2}))
                )
                threads[-1].start()
                snapshot = wait_for(
                    client, lambda g: g[RUNNING] == 1 and g[PUSH_WAITING] == 1 and g[HELD_BACK] == 1
                )
    for t in threads:
        t.join(timeout=STEP_DEADLINE_S * 2)
    assert not any(t.is_alive() for t in threads), "a request or the push never ended"
    for name, response in answered.items():
        assert response.status_code == 200, (name, response.text)
    versions = {name: r.json()["weights_version"] for name, r in answered.items() if name != "push"}
    return None if snapshot is None else (versions, snapshot)


def test_push_waits_for_running_requests_and_holds_back_new_ones(server, make_weights):
    """A long request runs when a push arrives: it finishes on the old weights, the push waits for it, and
    a request arriving during the wait is held back and runs after the swap, on the new weights.

    The test asserts what the server says it is doing at one moment (one /metrics answer: the long request
    running, the push waiting, the short request held back) and which version served what; no durations.
    The one thing it cannot control is the long request ending before that moment (it is only long): then
    it tries again with a longer one (128 x 250 tokens took 2.2 s on a fast machine; 2048 x 250 take
    minutes on the 2-core CPU)."""
    weights = make_weights(seed=400)
    for n_prompts in (128, 512, 2048):
        old = server.weights_version()
        outcome = _push_during_a_long_request(server, weights, n_prompts)
        if outcome is not None:
            break
    assert outcome is not None, "the long request ended before the push and the short one were seen waiting"
    versions, snapshot = outcome
    assert snapshot == {RUNNING: 1, PUSH_WAITING: 1, HELD_BACK: 1}, snapshot
    assert versions == {"long": old, "short": old + 1}, versions
    assert server.weights_version() == old + 1


def _poll_during_a_long_request(server, n_prompts: int) -> list[tuple[int, float]]:
    """(status, seconds) of each /health and /metrics poll from when a long request is seen running to its
    answer."""
    answered: list[httpx.Response] = []

    def run() -> None:
        with server.client(timeout=STEP_DEADLINE_S * 2) as client:
            answered.append(client.post("/generate", json=_long_request(n_prompts)))

    long = threading.Thread(target=run)
    long.start()
    polls = []
    with server.client() as poller:
        deadline = time.monotonic() + STEP_DEADLINE_S
        while long.is_alive() and not _gauges(poller)[RUNNING]:
            assert time.monotonic() < deadline, "the long request was never seen running"
            time.sleep(0.02)
        while long.is_alive():
            for path in ("/health", "/metrics"):
                started = time.monotonic()
                status = poller.get(path).status_code
                polls.append((status, time.monotonic() - started))
            time.sleep(0.05)
    long.join()
    assert answered[0].status_code == 200, answered[0].text
    return polls


def test_health_and_metrics_answer_while_the_engine_generates(server):
    """/health and /metrics answer within HEALTH_BOUND_S all through a long generation, many times before
    it ends: a busy engine never makes the server look dead to a health check. (A request too short to
    poll 20 times is followed by a longer one.)"""
    for n_prompts in (256, 1024, 4096):
        polls = _poll_during_a_long_request(server, n_prompts)
        if len(polls) >= 20:
            break
    assert len(polls) >= 20, f"only {len(polls)} polls during the longest request"
    assert {status for status, _ in polls} == {200}, polls
    slowest = max(seconds for _, seconds in polls)
    assert slowest < HEALTH_BOUND_S, f"a poll took {slowest:.1f} s while the engine generated"
