"""How far a run is from the machine: achieved memory bandwidth and compute over the probe's limits.

Model facts come from the GGUF the systems serve (``ModelFacts.from_gguf``);
what a run moved and computed comes from its requests:

* Weight bytes per forward pass: every matrix of the decoder blocks plus the
  output head (the embedding matrix when tied), at the served format's size:
  ``gguf`` the file's own tensor bytes (llama.cpp; a server that keeps the file's
  quantization), ``bf16``/``fp16`` 2 bytes a parameter (vLLM), ``fp32`` 4, ``int8``
  1 byte plus a float32 scale per output row (head included). Norms and biases
  are left out (well under 1%). MoE models count every expert (an upper bound).
* Forward passes per second: the token arrivals of all streams, sorted; a gap
  longer than a quarter of the median inter-token latency (at most 5 ms) starts
  a new pass, since one engine step emits the tokens of all its sequences at once.
  Passes that emit no token (a chunk of a longer prefill) are not seen, so this
  undercounts a little; each replica of a server counts its own passes.
* KV bytes: every generated token reads the K and V of its whole context
  (prompt + tokens so far): 2 x layers x kv_heads x head_dim x 2 bytes a position.
* FLOPs: 2 per parameter of the blocks for every prompt and output token, 2 per
  head parameter for every output token (logits of the prompt's last position
  only), attention 4 x layers x heads x head_dim per position attended (QK and PV).

Achieved bandwidth = (passes x weight bytes + KV bytes) / duration; achieved
compute = FLOPs / duration; each divided by the probe's streaming-read bandwidth
(all cores) and by its matmul peak in the served format's arithmetic (int8 for
``int8`` and ``gguf``, bf16 for ``bf16``/``fp16``, fp32 for ``fp32``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from scalellm.bench.client import RequestResult
from scalellm.bench.metrics import percentile

WEIGHT_KINDS = ("gguf", "bf16", "fp16", "fp32", "int8")
PEAK_DTYPE = {"gguf": "int8", "int8": "int8", "bf16": "bf16", "fp16": "bf16", "fp32": "fp32"}
KV_ELEMENT_BYTES = 2
MAX_STEP_GAP_S = 0.005
_BLOCK_MATRIX = re.compile(r"^blk\.\d+\..*\.weight$")


@dataclass(frozen=True)
class ModelFacts:
    """What the roofline needs to know about a (dense, decoder-only) model."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    body_params: int
    """Parameters of every matrix of the decoder blocks."""
    head_params: int
    """Parameters of the output head (the embedding matrix when tied)."""
    body_gguf_bytes: int
    head_gguf_bytes: int
    body_rows: int = 0
    """Output rows of the block matrices (an int8 scale each)."""
    head_rows: int = 0

    @classmethod
    def from_gguf(cls, path) -> "ModelFacts":
        """Read the facts from a GGUF file's metadata and tensor table."""
        from scalellm.engine.loader.gguf_header import read_gguf_header

        reader = read_gguf_header(str(path))
        arch = _field(reader, "general.architecture")
        num_heads = int(_field(reader, f"{arch}.attention.head_count"))
        hidden = int(_field(reader, f"{arch}.embedding_length"))
        tensors = {t.name: t for t in reader.tensors}
        head = tensors.get("output.weight") or tensors["token_embd.weight"]
        body = [t for name, t in tensors.items() if _BLOCK_MATRIX.match(name) and len(t.shape) >= 2]
        return cls(num_layers=int(_field(reader, f"{arch}.block_count")), num_heads=num_heads,
                   num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
                   head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads)),
                   body_params=sum(int(t.n_elements) for t in body),
                   head_params=int(head.n_elements),
                   body_gguf_bytes=sum(int(t.n_bytes) for t in body), head_gguf_bytes=int(head.n_bytes),
                   body_rows=sum(int(t.shape[-1]) for t in body), head_rows=int(head.shape[-1]))

    def weight_bytes(self, kind: str) -> int:
        """Bytes of weights one forward pass reads when served as ``kind`` (see WEIGHT_KINDS)."""
        params = self.body_params + self.head_params
        if kind == "gguf":
            return self.body_gguf_bytes + self.head_gguf_bytes
        if kind in ("bf16", "fp16"):
            return 2 * params
        if kind == "fp32":
            return 4 * params
        if kind == "int8":
            return params + 4 * (self.body_rows + self.head_rows)
        raise ValueError(f"unknown weight format {kind!r}: use one of {', '.join(WEIGHT_KINDS)}")

    @property
    def kv_bytes_per_position(self) -> int:
        """K and V of one position in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * KV_ELEMENT_BYTES

    @property
    def attention_flops_per_position(self) -> int:
        """QK^T and PV for one query against one cached position, all layers and heads."""
        return 4 * self.num_layers * self.num_heads * self.head_dim


def _field(reader, key: str, default=None):
    value = reader.fields.get(key, default)
    if value is None:
        raise ValueError(f"the GGUF has no {key}")
    return value


def triangle(n: int) -> int:
    """1 + 2 + ... + n."""
    return n * (n + 1) // 2


def request_flops(facts: ModelFacts, prompt_tokens: int, output_tokens: int) -> int:
    """FLOPs of one request: its prompt's prefill and its output tokens."""
    tokens = prompt_tokens + output_tokens
    attended = triangle(tokens) if output_tokens else triangle(prompt_tokens)
    return (2 * facts.body_params * tokens + 2 * facts.head_params * output_tokens
            + facts.attention_flops_per_position * attended)


def request_kv_bytes(facts: ModelFacts, prompt_tokens: int, output_tokens: int) -> int:
    """KV bytes the decode steps of one request read: output token j reads prompt + j positions."""
    positions = triangle(prompt_tokens + output_tokens) - triangle(prompt_tokens)
    return facts.kv_bytes_per_position * positions


def token_times(results: Sequence[RequestResult]) -> list[float]:
    """Wall-clock arrival time of every content chunk of the successful requests, sorted."""
    times = []
    for result in results:
        if not result.success:
            continue
        moment = result.start_wall + result.ttft
        times.append(moment)
        for gap in result.itl:
            moment += gap
            times.append(moment)
    return sorted(times)


def count_steps(times: Sequence[float], median_itl_s: float) -> int:
    """Forward passes seen in sorted arrival times: a gap above the threshold starts a new one."""
    if not times:
        return 0
    threshold = min(MAX_STEP_GAP_S, 0.25 * median_itl_s) if median_itl_s > 0 else MAX_STEP_GAP_S
    return 1 + sum(1 for a, b in zip(times, times[1:]) if b - a > threshold)


def run_roofline(facts: ModelFacts, weight_kind: str, results: Sequence[RequestResult], duration_s: float,
                 probe: dict | None = None) -> dict:
    """Achieved bandwidth and compute of one run, and their fractions of the probe's limits."""
    done = [r for r in results if r.success]
    itls = [gap for r in done for gap in r.itl]
    steps = count_steps(token_times(done), percentile(itls, 50))
    weight_bytes = facts.weight_bytes(weight_kind)
    kv_bytes = sum(request_kv_bytes(facts, r.prompt_tokens, r.output_tokens) for r in done)
    flops = sum(request_flops(facts, r.prompt_tokens, r.output_tokens) for r in done)
    row = {"weights": weight_kind, "weight_bytes": weight_bytes, "steps": steps,
           "steps_per_s": steps / duration_s,
           "achieved_gb_s": (steps * weight_bytes + kv_bytes) / duration_s / 1e9,
           "kv_gb_s": kv_bytes / duration_s / 1e9,
           "achieved_gflop_s": flops / duration_s / 1e9}
    row.update(fractions(row, weight_kind, probe))
    return row


def fractions(row: dict, weight_kind: str, probe: dict | None) -> dict:
    """The achieved figures over the probe's limits (None without a probe)."""
    if not probe:
        return {"bandwidth_fraction": None, "compute_fraction": None, "peak_dtype": PEAK_DTYPE[weight_kind]}
    bandwidth = probe["memory_bandwidth"]["all_cores_gb_s"]
    dtype = PEAK_DTYPE[weight_kind]
    peak = probe["matmul"][dtype]["peak_gflop_s"]
    return {"bandwidth_fraction": row["achieved_gb_s"] / bandwidth if bandwidth else None,
            "compute_fraction": row["achieved_gflop_s"] / peak if peak else None,
            "peak_dtype": dtype, "probe_gb_s": bandwidth, "probe_peak_gflop_s": peak,
            "tpot_floor_ms": row["weight_bytes"] / (bandwidth * 1e9) * 1000 if bandwidth else None}


def parse_weight_kinds(items: Sequence[str] | None) -> dict[str, str]:
    """``["scalellm=int8", ...]`` -> {system: kind} (ValueError on a malformed item)."""
    kinds = {}
    for item in items or []:
        name, sep, kind = item.partition("=")
        if not sep or kind not in WEIGHT_KINDS:
            raise ValueError(f"--weights takes SYSTEM=FORMAT with FORMAT one of {', '.join(WEIGHT_KINDS)}, "
                             f"got {item!r}")
        kinds[name.strip()] = kind
    return kinds


def infer_weight_kind(system: str, argv: Sequence[str]) -> tuple[str, str]:
    """(format, why) for a system started by compare mode, from its name and command line."""
    if system == "vllm":
        return "bf16", "vLLM serves the bf16 conversion of the GGUF"
    if system == "llamacpp":
        return "gguf", "llama.cpp serves the GGUF as it is"
    args = list(argv)
    if "--quantization" in args and args.index("--quantization") + 1 < len(args):
        quantization = args[args.index("--quantization") + 1]
        if quantization in WEIGHT_KINDS:
            return quantization, f"--quantization {quantization} on its command line"
    if "--dtype" in args and args.index("--dtype") + 1 < len(args) and args[args.index("--dtype") + 1] in (
            "float32", "fp32"):
        return "fp32", "--dtype float32 on its command line"
    return "gguf", ("assumed: scalellm's default (quantization auto) keeps a GGUF's own quantization on "
                    "AVX512-VNNI and AVX2 CPUs (pass --weights NAME=FORMAT when it picked otherwise)")


LOGGED_QUANTIZATION = re.compile(r"quantization auto: (\w+)(?: \(weights in (\w+)\))?")
LOGGED_KINDS = {"gguf": "gguf", "int8": "int8", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def weight_format_from_log(lines: Sequence[str]) -> str | None:
    """The weight format a scalellm server says it picked ("quantization auto: gguf", "quantization
    auto: none (weights in float32)"); a "none" that names no dtype is read as bf16."""
    for line in lines:
        match = LOGGED_QUANTIZATION.search(line)
        if match:
            kind = (match.group(2) or "bfloat16") if match.group(1) == "none" else match.group(1)
            if kind in LOGGED_KINDS:
                return LOGGED_KINDS[kind]
    return None


def apply_roofline(points: Sequence, systems: dict, facts: ModelFacts, probe: dict | None,
                   overrides: dict[str, str]) -> dict:
    """Add ``roofline_*`` figures to every point's summary; return the per-system assumptions.

    The served format of a system is ``overrides[name]``, else what the server reports as
    ``weight_format`` in /v1/models (recorded in ``systems[name]["weight_format"]``), else what
    its start-up log says it picked, else inferred from its name and command line
    (``infer_weight_kind``); the reason is recorded.
    """
    assumptions = {}
    for name, info in systems.items():
        if name in overrides:
            assumptions[name] = {"weights": overrides[name], "why": "--weights on the bench's command line"}
        elif info.get("weight_format") in WEIGHT_KINDS:
            assumptions[name] = {"weights": info["weight_format"], "why": "reported by the server in /v1/models"}
        elif weight_format_from_log(info.get("log_notes") or []):
            assumptions[name] = {"weights": weight_format_from_log(info["log_notes"]),
                                 "why": "the server's start-up log (quantization auto: ...)"}
        else:
            kind, why = infer_weight_kind(name, info.get("argv") or [])
            assumptions[name] = {"weights": kind, "why": why}
        assumptions[name]["weight_bytes"] = facts.weight_bytes(assumptions[name]["weights"])
    for point in points:
        if point.system not in assumptions:
            continue
        row = run_roofline(facts, assumptions[point.system]["weights"], point.requests,
                           point.summary["duration"], probe)
        point.summary.update({f"roofline_{k}": v for k, v in row.items() if isinstance(v, (int, float))})
    return assumptions
