"""`python -m prunetune ...` is the `prunetune` command."""
import sys

from prunetune.search.cli import main

sys.exit(main())
