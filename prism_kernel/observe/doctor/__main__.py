"""`python -m prism_kernel.observe.doctor`: the same as `prism-kernel doctor`."""

import sys

from prism_kernel.observe.doctor import main

sys.exit(main())
