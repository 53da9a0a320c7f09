"""Latency benchmark script; same as `magnet-engine bench` (see magnet_engine/bench.py)."""
import sys

from magnet_engine.bench import main

if __name__ == "__main__":
    sys.exit(main())
