"""Ahead-of-time tooling: record kernel launches without running them, and compile the variants
the dispatcher picks for sm_90a on a machine without a GPU (docs/compiled.md).

``LaunchRecorder`` / ``record_launches``  stub and record ``kernel[grid](...)`` (both of Triton's
                                          modes); for counting launches and timing the host path
``planning_for(name)``                    plan for a named device profile on any machine
``main(argv)``                            the ``check-sm90`` command line
"""

from .record import Arg, Launch, LaunchRecorder, planning_for, record_launches


def main(argv=None) -> int:
    from .check import main as _main

    return _main(argv)


__all__ = ["Arg", "Launch", "LaunchRecorder", "main", "planning_for", "record_launches"]
