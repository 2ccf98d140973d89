"""`python -m mlx_flash.bench --worker SPEC_JSON`: the worker process `bench` spawns."""

import json
import sys

from .worker import _worker

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))), flush=True)
    else:
        sys.exit("usage: python -m mlx_flash.bench --worker SPEC_JSON (internal; use `mlx-flash bench`)")
