import sys

from deqcore_models.cli import main

sys.exit(main())
