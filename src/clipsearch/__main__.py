import sys

from clipsearch.client.cli import main

sys.exit(main())
