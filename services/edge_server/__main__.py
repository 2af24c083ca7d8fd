import sys

from services.edge_server.server import main

sys.exit(main())
