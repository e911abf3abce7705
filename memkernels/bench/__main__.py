import sys

from memkernels.bench.run import main

sys.exit(main())
