import sys

from prism_kernel.cli import main

sys.exit(main())
