import sys

from services.onboard.cli import main

sys.exit(main())
