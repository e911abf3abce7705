import sys

from memkernels.apps.bench.run import main

sys.exit(main())
