"""Hybrid / rescoring latency benchmark; same as `magnet-engine bench hybrid` (see
magnet_engine/bench_hybrid.py)."""
import sys

from magnet_engine.bench_hybrid import main

if __name__ == "__main__":
    sys.exit(main())
