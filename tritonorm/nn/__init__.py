"""Drop-in modules (``tritonorm.nn``)."""
