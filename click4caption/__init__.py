"""Click4Caption: click two corners of a box and get a description of what is inside.

Library layout: ``config`` (YAML schemas), ``registry`` (names -> builders),
``models`` (one module per model part + builder), ``checkpoint`` (conversion from
upstream names), ``conversation`` (prompt format, ``Chat``), ``captioner`` (high-level
API), ``processors``, ``images``, ``boxes``, ``data`` (datasets), ``training``,
``shapes`` (the offline shapes world).
"""

__version__ = "1.0.0"
