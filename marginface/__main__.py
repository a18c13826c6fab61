"""`python -m marginface ...` (and `torchrun ... -m marginface train ...`) runs the CLI."""
import sys

from marginface.cli import main

sys.exit(main())
