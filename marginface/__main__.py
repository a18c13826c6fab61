"""`python -m marginface ...` (and `torchrun ... -m marginface train ...`) runs the CLI."""
import sys

try:
    from marginface.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing the command line
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
