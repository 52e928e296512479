"""``pykvm stat``: live KVM statistics of any running KVM process (see :mod:`.cli`).

:mod:`.pidfd` borrows another process's fds (``pidfd_getfd``), :mod:`.source`
finds its VM/vCPU fds and reads their binary statistics (or debugfs), and
:mod:`.cli` shows them.
"""
