"""Stopping when asked: the handlers set a flag, a second Ctrl-C stops at once, nesting shares one request."""

from __future__ import annotations

import os
import signal

import pytest

from dreambooth.interrupts import Stopped, stop_requests


def test_sigterm_sets_the_request_instead_of_ending_the_process_and_handlers_come_back(capsys):
    before = signal.getsignal(signal.SIGTERM)
    with stop_requests("image") as request:
        assert not request.requested
        request.stop("never raised")  # nothing asked yet
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.requested and request.signum == signal.SIGTERM
        with pytest.raises(Stopped, match="3 of 5 done") as caught:
            request.stop("3 of 5 done")
    assert caught.value.exit_status == 128 + signal.SIGTERM
    assert "SIGTERM: stopping after the current image" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.fixture
def ctrl_c_handled():
    """SIGINT as an interactive terminal gives it (CI may start the tests with it ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_second_ctrl_c_stops_at_once(ctrl_c_handled):
    with stop_requests("optimizer step") as request:
        os.kill(os.getpid(), signal.SIGINT)
        assert request.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored(ctrl_c_handled):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a shell's background job
    with stop_requests("image") as request:
        os.kill(os.getpid(), signal.SIGINT)
        assert not request.requested
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_nested_blocks_share_the_outer_request():
    with stop_requests("trial") as outer, stop_requests("optimizer step") as inner:
        assert inner is outer
        os.kill(os.getpid(), signal.SIGTERM)
    assert outer.requested
