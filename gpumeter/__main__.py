import sys

from gpumeter.cli import main

sys.exit(main())
