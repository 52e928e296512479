"""The test suite's one fixtures package.

* :mod:`.guests`: the one guest set-up of the core tests (real mode, long mode
  at CPL 0 or 3), deliberately written without :mod:`pykvm.x86`.
* :mod:`.runs`: running a vCPU under :meth:`pykvm.Vcpu.kick_after` (the one watchdog).
* :mod:`.procs`: child interpreters, an unprivileged user (``runuser``), the
  checkout's location.
* :mod:`.host`: facts about this machine a test may need to read (never assume).
* :mod:`.fdtable`: this process's fd table, mappings and RSS (from ``/proc``).

Helpers that only one test area needs live beside those tests as
``tests/<area>/support_<what>.py``; programs the tests run in a child process
keep their documented names (``python -m tests.<area>.<program>``).
"""
