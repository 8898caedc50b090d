"""Tuning: the persistent cache of measured plans (``cache``), the model shape suites
(``suites``) and the sweeps that measure candidate plans on a GPU (``sweep``).

``tritonorm tune`` runs the sweeps and writes the user's cache; ``tuning/build_tables.py`` in the
source repository writes the tables shipped in ``tritonorm/tables/``. Importing this package
needs neither triton nor a GPU.
"""
