import sys

from services.ue_client.service import main

sys.exit(main())
