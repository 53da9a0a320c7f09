"""Memory benchmark script; same as `magnet-engine bench --memory` (see magnet_engine/bench_memory.py)."""
import sys

from magnet_engine.bench_memory import main

if __name__ == "__main__":
    sys.exit(main())
