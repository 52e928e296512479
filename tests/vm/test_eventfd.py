"""EventFd (the doorbell of irqfd/ioeventfd) and fd arguments."""

from __future__ import annotations

import fcntl
import os

import pytest

import pykvm
from pykvm.eventfd import EventFd, fd_of

pytestmark = pytest.mark.no_kvm_needed


def test_eventfd_counts_and_drains():
    with EventFd() as e:
        assert fcntl.fcntl(e.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.readlink(f"/proc/self/fd/{e.fileno()}") == "anon_inode:[eventfd]"
        assert e.read() == 0 and not e.is_set and not e.wait(0.01)
        e.write()
        e.write(41)
        assert e.is_set and e.wait(0)
        assert e.read() == 42
        assert e.read() == 0


def test_eventfd_semaphore_and_initval():
    with EventFd(3, semaphore=True) as e:
        assert [e.read(), e.read(), e.read(), e.read()] == [1, 1, 1, 0]


def test_eventfd_bad_input_and_closed():
    with pytest.raises(TypeError):
        EventFd("1")
    with pytest.raises(ValueError):
        EventFd(-1)
    e = EventFd()
    with pytest.raises(ValueError):
        e.write(0)
    with pytest.raises(TypeError):
        e.write(True)
    e.close()
    e.close()
    assert e.closed
    with pytest.raises(pykvm.KvmClosedError):
        e.write()
    with pytest.raises(pykvm.KvmClosedError):
        fd_of(e)


def test_fd_of():
    with EventFd() as e:
        assert fd_of(e) == e.fileno() == fd_of(e.fileno())
    with pytest.raises(TypeError):
        fd_of("3")
    with pytest.raises(TypeError):
        fd_of(True)
    with pytest.raises(ValueError):
        fd_of(-1)
