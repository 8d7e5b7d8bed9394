"""Core lending between the replicas of one machine: who may step on the whole machine, and when."""

from __future__ import annotations

import os

import pytest

from scalellm.cli import _core_board, build_parser
from scalellm.engine.core_board import CoreBoard, create_board


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


def test_serve_gives_each_replica_its_slot_unless_told_not_to():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("lending needs at least 2 cores")
    args = build_parser("serve").parse_args(["serve"])
    argvs = [["replica"], ["replica"]]
    board = _core_board(args, argvs, num_threads=1)
    try:
        assert board is not None and os.path.getsize(board) == 2
        for slot, argv in enumerate(argvs):
            assert argv[1:] == ["--core-board", board, "--core-board-slot", str(slot), "--threads-when-alone",
                                str(len(os.sched_getaffinity(0)))]
    finally:
        os.unlink(board)
    no_lending = build_parser("serve").parse_args(["serve", "--no-lend-cores"])
    assert _core_board(no_lending, [["replica"], ["replica"]], num_threads=1) is None
    mock = build_parser("serve").parse_args(["serve", "--engine", "mock"])
    assert _core_board(mock, [["replica"], ["replica"]], num_threads=1) is None
