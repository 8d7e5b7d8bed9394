"""Deployment shapes: how many replicas, and how much parallelism each one gets.

A shape is ``replicas × parallel``. On a CPU ``parallel`` is the torch intra-op threads of each
replica; on GPUs it is each replica's tensor-parallel degree. A shape fits a machine when
``replicas × parallel`` is at most its cores (or GPUs); the feasible shapes are those that use all
of them (1×2 and 2×1 on two cores; 1×4, 2×2 and 4×1 on four).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass

from scalellm.config import EngineConfig

MAX_REPLICAS = 8
"""Most replicas a feasible shape has (each one holds a copy of the model in memory)."""

_LABEL = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Shape:
    """``replicas`` processes, each with ``parallel`` threads (CPU) or GPUs in tensor parallel."""

    replicas: int
    parallel: int

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.parallel < 1:
            raise ValueError(f"a shape needs replicas >= 1 and parallel >= 1, got {self.replicas}x{self.parallel}")

    @property
    def label(self) -> str:
        """``"2x1"``: replicas x parallel."""
        return f"{self.replicas}x{self.parallel}"

    @property
    def num_units(self) -> int:
        """Cores (or GPUs) the shape occupies."""
        return self.replicas * self.parallel

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """``"2x1"`` -> Shape(2, 1); ValueError for anything else."""
        match = _LABEL.match(text)
        if match is None:
            raise ValueError(f"a shape is written REPLICASxPARALLEL, e.g. 2x1 or 1x2; got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True)
class Machine:
    """What shapes are cut from: ``num_units`` CPU cores, or GPUs when ``device`` is "cuda"."""

    device: str
    num_units: int

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.num_units < 1:
            raise ValueError(f"a machine needs at least one core or GPU, got {self.num_units}")

    @classmethod
    def detect(cls) -> "Machine":
        """The GPUs of this machine when it has any (from /dev, without importing torch), else its cores."""
        gpus = [path for path in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", path)]
        if gpus:
            return cls("cuda", len(gpus))
        return cls("cpu", len(os.sched_getaffinity(0)))

    def fits(self, shape: Shape) -> bool:
        """True when the shape needs no more cores (GPUs) than the machine has."""
        return shape.num_units <= self.num_units

    def feasible_shapes(self, max_replicas: int = MAX_REPLICAS) -> list[Shape]:
        """Every shape using all units with at most `max_replicas` replicas, fewest replicas first."""
        return [Shape(r, self.num_units // r) for r in range(1, min(max_replicas, self.num_units) + 1)
                if self.num_units % r == 0]

    def apply(self, shape: Shape, engine: EngineConfig) -> EngineConfig:
        """`engine` with the shape's parallelism for one replica: its threads on a CPU, its
        tensor-parallel degree on GPUs."""
        if self.device == "cuda":
            return dataclasses.replace(engine, tensor_parallel_size=shape.parallel)
        return dataclasses.replace(engine, num_threads=shape.parallel)

    def replica_env(self, shape: Shape, index: int) -> dict[str, str]:
        """Environment of replica `index`: on GPUs, its own `parallel` devices; nothing on a CPU."""
        if self.device != "cuda":
            return {}
        first = index * shape.parallel
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(first + i) for i in range(shape.parallel))}
