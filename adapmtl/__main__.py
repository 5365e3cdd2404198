"""`python -m adapmtl ...` is the `adapmtl` command."""
import sys

from adapmtl.cli import main

sys.exit(main())
