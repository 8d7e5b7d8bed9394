"""The engine steps on the whole machine only while its board says every other replica is idle: small
steps, and steps of prefills alone, which re-read the board after every layer."""

from __future__ import annotations

import torch

from scalellm.config import EngineConfig
from scalellm.engine.core_board import CoreBoard, create_board
from scalellm.engine.llm_engine import LLMEngine
from scalellm.protocol.types import SamplingParams
from tests.engine.tiny_models import make_tiny_model


def _engine(tmp_path, tokenizer_dir):
    model_dir = str(tmp_path / "llama")
    make_tiny_model("llama", model_dir, tokenizer_dir)
    board = tmp_path / "board"
    create_board(board, 2)
    engine = LLMEngine(EngineConfig(model=model_dir, kv_cache_gib=0.01, num_threads=1, core_board=str(board),
                                    core_board_slot=0, threads_when_alone=2))
    return engine, CoreBoard(board, 1, 1, 2)


def test_engine_borrows_idle_cores_only_while_the_others_are_idle(tmp_path, tokenizer_dir):
    before = torch.get_num_threads()
    try:
        engine, other = _engine(tmp_path, tokenizer_dir)
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        engine.add_request("long", list(range(3, 40)), params)  # a 37-token prefill, the other replica idle
        engine.step()
        assert torch.get_num_threads() == 2
        engine.step()  # a one-token decode with the other replica idle: the whole machine
        assert torch.get_num_threads() == 2
        engine.add_request("mixed", list(range(50, 90)), params)
        engine.step()  # a decode and a 40-token prefill in one step: a replica under load keeps its share
        assert torch.get_num_threads() == 1
        other.step_threads()  # the other replica wakes up
        engine.step()
        assert torch.get_num_threads() == 1
        other.close()
    finally:
        torch.set_num_threads(before)


def test_a_prefill_gives_borrowed_cores_back_at_the_next_layer(tmp_path, tokenizer_dir):
    """The other replica wakes during a prefill step: the step runs its remaining layers on its own share."""
    before = torch.get_num_threads()
    try:
        engine, other = _engine(tmp_path, tokenizer_dir)
        board = engine.core._board
        threads_per_layer = []
        read = board.step_threads

        def read_and_wake_the_other(*args, **kwargs):
            threads_per_layer.append(torch.get_num_threads())
            if len(threads_per_layer) == 2:  # after the first layer
                other.step_threads()
            return read(*args, **kwargs)

        board.step_threads = read_and_wake_the_other
        engine.add_request("long", list(range(3, 40)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        engine.step()
        num_layers = len(engine.core.executor.runner.model.layers)
        # before the step (1 thread), then after each layer: 2 while the other sleeps, 1 from its wake-up on
        assert threads_per_layer == [1, 2] + [1] * (num_layers - 1)
        assert torch.get_num_threads() == 1
        other.close()
    finally:
        torch.set_num_threads(before)
