import sys

from saw_worker.cli import main

sys.exit(main())
