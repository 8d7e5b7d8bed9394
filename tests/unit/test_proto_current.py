"""The committed protobuf code matches what the proto file generates today."""

from __future__ import annotations

import pytest

from scalellm.rpc import codegen

pytest.importorskip("grpc_tools")


def test_generated_code_is_current(tmp_path):
    written = codegen.generate(tmp_path)
    assert [p.name for p in written] == list(codegen.GENERATED_FILES)
    for path in written:
        committed = codegen.PB_DIR / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `python -m scalellm.rpc.codegen` and commit the result")
