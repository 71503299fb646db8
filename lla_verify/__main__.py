import sys

from lla_verify.cli import main

sys.exit(main())
