import sys

from tandem.threads import configure_threads_or_exit

configure_threads_or_exit("tandem-ue")  # before torch loads: TANDEM_THREADS, else half the cores (1..4)

from services.ue_client.server import main  # noqa: E402

sys.exit(main())
