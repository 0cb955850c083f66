"""Write a SYNTHETIC slide (not patient data) with known tumour regions and their ASAP XML.

Same as the ``wsi-synth`` command: ``python scripts/make_synthetic_slide.py OUT.tif --mpp 0.226``.
"""

import sys

from wsi_toolkit.cli.synth import main

if __name__ == "__main__":
    sys.exit(main())
