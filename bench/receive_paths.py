"""Ways a server can receive a weights body from a loopback socket, without the server: what the stream
port's receiving (``generator_server/stream.py``) was chosen from.

A sender process writes N bytes to a TCP socket; this process receives them, each way in turn, rounds in a
fixed order:

- ``socket, 4 MiB buffer``: ``recv_into`` one reused 4 MiB buffer (the floor of ``bench/weight_sync.py``);
- ``event loop, mapped file``: an asyncio ``BufferedProtocol`` whose buffer is the next part of a file in
  ``/dev/shm`` mapped in memory (the stream port before it read in a thread);
- ``thread, mapped file``: a blocking ``recv_into`` with ``MSG_WAITALL`` of 8 MiB at a time into the mapping
  (the stream port now);

each mapped way also with BLAKE3 hashing every 8 MiB piece in another thread as it completes, on all cores
(``max_threads=AUTO``) or on a few. The mapping is made and populated once and reused, as a server with a
stream port writes over its spare file.

    PYTHONPATH=$PWD python bench/receive_paths.py --gib 2.265 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from bench.common import describe_machine, machine_line, markdown_table, median, write_results

PIECE = 8 << 20


def _send(port: int, nbytes: int) -> None:
    data = memoryview(os.urandom(1 << 20) * 8)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        sent = 0
        while sent < nbytes:
            n = min(len(data), nbytes - sent)
            conn.sendall(data[:n])
            sent += n
        conn.recv(1)  # until the receiver is done


def _hasher(threads: int | None):
    return None if threads is None else blake3.blake3(max_threads=threads)


def _timed_connection(receive: Callable[[socket.socket], None], nbytes: int) -> float:
    """Seconds ``receive`` takes to read ``nbytes`` from a sender process, first byte wait included."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = multiprocessing.Process(target=_send, args=(listener.getsockname()[1], nbytes))
        sender.start()
        conn, _ = listener.accept()
        with conn:
            started = time.perf_counter()
            receive(conn)
            seconds = time.perf_counter() - started
            conn.sendall(b"k")
        sender.join()
    return seconds


def socket_floor(nbytes: int) -> float:
    buffer = memoryview(bytearray(4 << 20))

    def receive(conn: socket.socket) -> None:
        got = 0
        while got < nbytes:
            got += conn.recv_into(buffer, min(nbytes - got, len(buffer)))

    return _timed_connection(receive, nbytes)


def thread_into_map(target: memoryview, threads: int | None) -> float:
    nbytes, hasher = len(target), _hasher(threads)

    def receive(conn: socket.socket) -> None:
        with ThreadPoolExecutor(1) as hashing:
            pieces = []
            got = 0
            while got < nbytes:
                n = min(PIECE, nbytes - got)
                got += conn.recv_into(target[got : got + n], n, socket.MSG_WAITALL)
                if hasher is not None:
                    pieces.append(hashing.submit(hasher.update, target[got - n : got]))
            for piece in pieces:
                piece.result()

    return _timed_connection(receive, nbytes)


def event_loop_into_map(target: memoryview, threads: int | None) -> float:
    nbytes, hasher = len(target), _hasher(threads)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        hashing = ThreadPoolExecutor(1)
        done = loop.create_future()
        state = {"got": 0, "hashed": 0, "last": None, "started": 0.0}

        class Receiver(asyncio.BufferedProtocol):
            def connection_made(self, transport) -> None:
                self.transport = transport
                state["started"] = time.perf_counter()

            def get_buffer(self, sizehint: int) -> memoryview:
                return target[state["got"] : min(nbytes, state["got"] + (64 << 20))]

            def buffer_updated(self, n: int) -> None:
                state["got"] += n
                got = state["got"]
                if hasher is not None and (got - state["hashed"] >= PIECE or got == nbytes):
                    piece = target[state["hashed"] : got]
                    state["last"], state["hashed"] = loop.run_in_executor(hashing, hasher.update, piece), got
                if got == nbytes:
                    self.transport.pause_reading()
                    asyncio.ensure_future(self.finish())

            async def finish(self) -> None:
                if state["last"] is not None:
                    await state["last"]
                done.set_result(time.perf_counter() - state["started"])
                self.transport.write(b"k")

        server = await loop.create_server(Receiver, "127.0.0.1", 0)
        sender = multiprocessing.Process(target=_send, args=(server.sockets[0].getsockname()[1], nbytes))
        sender.start()
        seconds = await done
        await asyncio.to_thread(sender.join)
        server.close()
        hashing.shutdown()
        return seconds

    return asyncio.run(run())


def measure(target: memoryview, rounds: int, few: int) -> dict[str, list[float]]:
    """Seconds of each way per round, in a fixed order each round."""
    nbytes, auto = len(target), blake3.blake3.AUTO
    ways: dict[str, Callable[[], float]] = {
        "socket, 4 MiB buffer": lambda: socket_floor(nbytes),
        "event loop, mapped file": lambda: event_loop_into_map(target, None),
        "event loop, mapped file, BLAKE3 all cores": lambda: event_loop_into_map(target, auto),
        f"event loop, mapped file, BLAKE3 {few} threads": lambda: event_loop_into_map(target, few),
        "thread, mapped file": lambda: thread_into_map(target, None),
        "thread, mapped file, BLAKE3 all cores": lambda: thread_into_map(target, auto),
        f"thread, mapped file, BLAKE3 {few} threads": lambda: thread_into_map(target, few),
        "thread, mapped file, BLAKE3 1 thread": lambda: thread_into_map(target, 1),
    }
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            samples[name].append(way())
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=0.5, help="bytes to receive, in GiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--few-threads", type=int, default=4, help="BLAKE3 threads of the 'few' rows")
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = parser.parse_args()

    nbytes = int(args.gib * (1 << 30)) // PIECE * PIECE
    machine = describe_machine()
    print(machine_line(machine), flush=True)
    path = Path("/dev/shm") / f"receive-paths-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        with memoryview(mapping) as target:
            samples = measure(target, args.rounds, args.few_threads)
        mapping.close()
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)

    floor = median(samples["socket, 4 MiB buffer"])
    rows = [[name, median(s), min(s), median(s) / floor] for name, s in samples.items()]
    print(f"\n## Receiving {nbytes / 1e9:.3f} GB from a loopback socket, median of {args.rounds} rounds\n")
    print(markdown_table(["way", "median s", "best s", "median / socket"], rows))
    if args.out is not None:
        settings = {"bytes": nbytes, "rounds": args.rounds, "few_threads": args.few_threads}
        write_results(args.out, "receive_paths", machine, settings, {"samples_seconds": samples})


if __name__ == "__main__":
    main()
