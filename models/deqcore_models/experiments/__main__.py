import sys

from deqcore_models.experiments import main

sys.exit(main())
