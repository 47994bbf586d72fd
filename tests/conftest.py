"""Test-suite plugins. `pytester` runs inner pytest sessions for the plugin's tests.

In-process inner sessions drop the modules they imported when they end; torch's lazily
imported compiler stack registers operator libraries at import and cannot be imported twice in
one process. Importing it here, before any inner session, keeps it out of their snapshot."""

import torch._dynamo  # noqa: F401

pytest_plugins = ["pytester"]
