"""Core lending between the replicas of one machine: who may step on the whole machine, and when."""

from __future__ import annotations

import pytest

from scalellm.cli import build_parser
from scalellm.engine.core_board import CoreBoard, create_board
from scalellm.serve import local_launcher
from scalellm.shape.shape import Machine, Shape


@pytest.fixture
def board_file(tmp_path):
    path = tmp_path / "board"
    create_board(path, 3)
    return path


def test_a_replica_borrows_only_while_every_other_is_idle(board_file):
    a, b, c = (CoreBoard(board_file, slot, threads=1, threads_alone=3) for slot in range(3))
    assert a.step_threads() == 3  # b and c idle
    assert b.step_threads() == 1  # a is busy
    assert a.step_threads() == 1  # now b is too
    b.mark_idle()
    assert a.step_threads() == 3
    assert a.step_threads(may_borrow=False) == 1  # a long step keeps its own share
    assert c.step_threads() == 1
    c.close()
    assert a.step_threads() == 3
    a.close()
    b.close()


def test_two_replicas_waking_together_never_both_borrow(board_file):
    a, b = CoreBoard(board_file, 0, 1, 2), CoreBoard(board_file, 1, 1, 2)
    # Each marks itself busy before reading the board, so whatever the interleaving one sees the other.
    a._map[a.slot] = 1
    b._map[b.slot] = 1
    assert a.step_threads() == 1 and b.step_threads() == 1
    a.close()
    b.close()


def test_a_restarted_replica_starts_idle(board_file):
    a = CoreBoard(board_file, 0, 1, 2)
    a.step_threads()
    again = CoreBoard(board_file, 0, 1, 2)  # the same slot after a restart
    assert CoreBoard(board_file, 1, 1, 2).step_threads() == 2
    a.close()
    again.close()


@pytest.mark.parametrize("slot, threads, alone", [(3, 1, 2), (-1, 1, 2), (0, 2, 1), (0, 0, 2)])
def test_bad_boards_are_refused(board_file, slot, threads, alone):
    with pytest.raises(ValueError):
        CoreBoard(board_file, slot, threads, alone)


def test_serve_lends_cores_unless_told_not_to_or_on_the_mock_engine():
    machine = Machine("cpu", 2)

    def lends(*flags: str) -> bool:
        args = build_parser("serve").parse_args(["serve", *flags])
        return local_launcher(args, machine, 1).lends_cores(Shape(2, 1))

    assert lends()
    assert not lends("--no-lend-cores")
    assert not lends("--engine", "mock")
    assert not lends("--tensor-parallel-size", "2")
