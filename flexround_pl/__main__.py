import sys

from flexround_pl.cli import main

sys.exit(main())
