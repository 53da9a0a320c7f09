import sys

from magnet_engine.cli import main

sys.exit(main())
