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
MIN_ROUNDS_WHILE_RUNNING = 20
"""How many rounds of /health and /metrics must be answered while the long request still runs. Before the
event loop was freed of its long pauses, a loaded run answered none for 20 s (issue 29). How fast they
answer is a benchmark's to say (bench/health_latency.py), not a test's: on a shared 2-core CI machine one
poll once took 11 s while the whole machine was short of CPU."""


def _gauges(client: httpx.Client) -> dict[str, float]:
    """The server's gauges, read in one answer of /metrics (so all at one moment)."""
    return _gauges_in(client.get("/metrics").text)


def _gauges_in(metrics: str) -> dict[str, float]:
    lines = metrics.splitlines()
    return {
        k: float(v)
        for k, _, v in (line.partition(" ") for line in lines)
        if k in (RUNNING, PUSH_WAITING, HELD_BACK)
    }


def _long_request(n_prompts: int) -> dict:
    return {"prompts": ["The cat"] * n_prompts, "max_tokens": 250, "ignore_eos": True}


def _push_during_a_long_request(server, weights, n_prompts: int) -> tuple | None:
    """Start a long request; once the server says it runs, push; once the push waits for it, send a short
    request; once the short one is held back behind the push, let everything end. Returns the version each
    request was served from, the gauges at the moment all three were seen at once, the push's
    ``wait_seconds`` and the seconds this side saw the push waiting; None if the long request ended before
    that moment (the caller tries a longer one)."""
    version = server.weights_version() + 1
    answered: dict[str, httpx.Response] = {}

    def run(name: str, body: dict) -> None:
        with server.client(timeout=STEP_DEADLINE_S * 2) as client:
            answered[name] = client.post("/generate", json=body)

    def push() -> None:
        answered["push"] = server.push(weights, version)

    polled: dict[str, float] = {}  # when the last /metrics poll was sent, and when its answer came

    def wait_for(client, seen) -> dict | None:
        """The gauges once ``seen(gauges)``; None if the long request ends first."""
        deadline = time.monotonic() + STEP_DEADLINE_S
        while True:
            polled["sent"] = time.monotonic()
            gauges = _gauges(client)
            polled["answered"] = time.monotonic()
            if seen(gauges):
                return gauges
            if "long" in answered:
                return None
            assert time.monotonic() < deadline, f"not seen in {STEP_DEADLINE_S:.0f} s: {gauges}"
            time.sleep(0.02)

    threads = [threading.Thread(target=run, args=("long", _long_request(n_prompts)))]
    threads[0].start()
    snapshot = None
    with server.client() as client:
        if wait_for(client, lambda g: g[RUNNING] == 1) is not None:
            threads.append(threading.Thread(target=push))
            threads[-1].start()
            if wait_for(client, lambda g: g[RUNNING] == 1 and g[PUSH_WAITING] == 1) is not None:
                first_seen_waiting = polled["answered"]
                threads.append(
                    threading.Thread(target=run, args=("short", {"prompts": ["Hi"], "max_tokens": 2}))
                )
                threads[-1].start()
                snapshot = wait_for(
                    client, lambda g: g[RUNNING] == 1 and g[PUSH_WAITING] == 1 and g[HELD_BACK] == 1
                )
                last_seen_waiting = polled["sent"]
    for t in threads:
        t.join(timeout=STEP_DEADLINE_S * 2)
    assert not any(t.is_alive() for t in threads), "a request or the push never ended"
    for name, response in answered.items():
        assert response.status_code == 200, (name, response.text)
    versions = {name: r.json()["weights_version"] for name, r in answered.items() if name != "push"}
    if snapshot is None:
        return None
    # The server said the push was waiting in two answers: the one read at first_seen_waiting or before, and
    # one asked for at last_seen_waiting or after. Its own count of the wait covers at least that span.
    seen_waiting = last_seen_waiting - first_seen_waiting
    return versions, snapshot, answered["push"].json()["wait_seconds"], seen_waiting


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
    versions, snapshot, wait_seconds, seen_waiting = outcome
    assert snapshot == {RUNNING: 1, PUSH_WAITING: 1, HELD_BACK: 1}, snapshot
    assert versions == {"long": old, "short": old + 1}, versions
    # The push's answer says how long it waited for the running request (what a sender needs to tell
    # waiting from a slow transfer): at least as long as this test saw it waiting.
    assert wait_seconds >= seen_waiting > 0, (wait_seconds, seen_waiting)
    assert server.weights_version() == old + 1


def _poll_during_a_long_request(server, n_prompts: int) -> list[tuple[int, int, bool]]:
    """Rounds of polls from when a long request is seen running to its answer: each round's /health status,
    /metrics status, and whether /metrics said the long request was running when it answered (then /health,
    answered before /metrics was sent, was answered while it ran too)."""
    answered: list[httpx.Response] = []

    def run() -> None:
        with server.client(timeout=STEP_DEADLINE_S * 2) as client:
            answered.append(client.post("/generate", json=_long_request(n_prompts)))

    long = threading.Thread(target=run)
    long.start()
    rounds = []
    with server.client() as poller:
        deadline = time.monotonic() + STEP_DEADLINE_S
        while long.is_alive() and not _gauges(poller)[RUNNING]:
            assert time.monotonic() < deadline, "the long request was never seen running"
            time.sleep(0.02)
        while long.is_alive():
            health = poller.get("/health").status_code
            metrics = poller.get("/metrics")
            running = metrics.status_code == 200 and _gauges_in(metrics.text)[RUNNING] == 1
            rounds.append((health, metrics.status_code, running))
            time.sleep(0.05)
    long.join()
    assert answered[0].status_code == 200, answered[0].text
    return rounds


def test_health_and_metrics_answer_while_the_engine_generates(server):
    """/health and /metrics answer all through a long generation, not after it: a busy engine never makes
    the server look dead to a health check. Each /metrics answer says whether the long request was still
    running when it was written, and each /health poll is sent just before one, so the test counts the
    rounds answered during the generation without timing anything (a poll held back until the end would
    find it ended). A request too short for MIN_ROUNDS_WHILE_RUNNING rounds is followed by a longer one."""
    for n_prompts in (256, 1024, 4096):
        rounds = _poll_during_a_long_request(server, n_prompts)
        during = sum(running for _, _, running in rounds)
        if during >= MIN_ROUNDS_WHILE_RUNNING:
            break
    assert {(health, metrics) for health, metrics, _ in rounds} == {(200, 200)}, rounds
    assert during >= MIN_ROUNDS_WHILE_RUNNING, (
        f"only {during} of {len(rounds)} rounds of /health and /metrics were answered while the longest "
        "request ran"
    )
