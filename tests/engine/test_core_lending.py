"""The engine steps on the whole machine only while its board says every other replica is idle, and
only for small steps."""

from __future__ import annotations

import torch

from scalellm.config import EngineConfig
from scalellm.engine.core_board import CoreBoard, create_board
from scalellm.engine.llm_engine import LLMEngine
from scalellm.protocol.types import SamplingParams
from tests.engine.tiny_models import make_tiny_model


def test_engine_borrows_idle_cores_for_small_steps_only(tmp_path, tokenizer_dir):
    model_dir = str(tmp_path / "llama")
    make_tiny_model("llama", model_dir, tokenizer_dir)
    board = tmp_path / "board"
    create_board(board, 2)
    before = torch.get_num_threads()
    try:
        engine = LLMEngine(EngineConfig(model=model_dir, kv_cache_gib=0.01, num_threads=1, core_board=str(board),
                                        core_board_slot=0, threads_when_alone=2))
        other = CoreBoard(board, 1, 1, 2)
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        engine.add_request("long", list(range(3, 40)), params)  # a 37-token prefill: its own share
        engine.step()
        assert torch.get_num_threads() == 1
        engine.step()  # a one-token decode with the other replica idle: the whole machine
        assert torch.get_num_threads() == 2
        other.step_threads()  # the other replica wakes up
        engine.step()
        assert torch.get_num_threads() == 1
        other.close()
    finally:
        torch.set_num_threads(before)
