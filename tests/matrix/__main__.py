import sys

from tests.matrix.run import main

sys.exit(main())
