import sys

from magnet_engine.server.serve import main

sys.exit(main())
