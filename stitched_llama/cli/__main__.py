"""`python -m stitched_llama.cli`, the same as the `stitched-llama` command."""

import sys

from . import main

sys.exit(main())
