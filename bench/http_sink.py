"""An HTTP sink for the weight-push floor: it streams a request body to one file on disk and does nothing
else. Same stack as the generation server (uvicorn + FastAPI, body read chunk by chunk), so the time of
an upload to it is the least any HTTP push of the same bytes can cost.

    python -m bench.http_sink --port 8123 --out /tmp/sink.bin
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request


def create_app(out_file: Path) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.put("/sink")
    async def sink(request: Request) -> dict:
        started = time.perf_counter()
        written = 0
        with open(out_file, "wb") as f:
            async for chunk in request.stream():
                f.write(chunk)
                written += len(chunk)
        return {"bytes": written, "seconds": time.perf_counter() - started}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="file every uploaded body overwrites")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    uvicorn.run(create_app(args.out), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
