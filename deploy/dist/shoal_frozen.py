"""The entry point of the one-file `shoal` executable (`make dist`).

Packages installed beside it (`pip install --target DIR PACKAGE`) are found through
`SHOAL_PLUGIN_PATH` (directories, `:`-separated): their executors and tools load by their entry
points, as in a virtualenv. They come after the bundled modules, so they cannot replace them.
The executable ignores `PYTHONPATH`.
"""

import os
import sys

for directory in os.environ.get("SHOAL_PLUGIN_PATH", "").split(os.pathsep):
    if directory:
        sys.path.append(directory)

from shoal.cli import main  # noqa: E402  (after the plugin path is set)

sys.exit(main())
