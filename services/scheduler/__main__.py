import sys

from services.scheduler.server import main

sys.exit(main())
