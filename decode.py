"""Decodes from a trained checkpoint; see ``megacontext_jax/cli/decode.py`` or ``--help``.

python decode.py --checkpoint runs/tiny --memory runs/tiny/memory --prompt "def main():"
"""

import sys

from megacontext_jax.cli.decode import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
