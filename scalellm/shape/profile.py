"""A deployment profile: what each shape serves at each concurrency, measured by `scalellm profile`.

JSON layout (``version`` 1)::

    {"version": 1, "model": "...", "device": "cpu", "num_units": 2, "workload": "...",
     "created": "2025-01-01T00:00:00Z",
     "shapes": [{"shape": "1x2",
                 "points": [{"concurrency": 1, "output_throughput": 41.0, "request_throughput": 0.64,
                             "ttft_p50_ms": 96, "ttft_p99_ms": 120, "tpot_p50_ms": 23.8,
                             "tpot_p99_ms": 30, "e2e_p50_ms": 1600, "e2e_p99_ms": 1900}, ...]}, ...]}

Predictions between measured concurrencies interpolate linearly in log2(concurrency); outside the
measured range they hold the nearest measured value (throughput plateaus once a shape saturates).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import orjson

from scalellm.shape.shape import Shape

PROFILE_VERSION = 1


@dataclass(frozen=True)
class ProfilePoint:
    """One shape measured at one concurrency (closed loop); throughputs per second, latencies in ms."""

    concurrency: int
    output_throughput: float
    """Output tokens per second."""
    request_throughput: float
    """Completed requests per second."""
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"a profile point needs concurrency >= 1, got {self.concurrency}")
        for field in fields(self)[1:]:
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"profile point at C={self.concurrency}: {field.name} must be a finite "
                                 f"number >= 0, got {value!r}")

    @classmethod
    def from_summary(cls, concurrency: int, summary: dict) -> "ProfilePoint":
        """From a bench run's summary (`scalellm.bench.metrics.summarize` keys)."""
        return cls(concurrency, summary["output_throughput"], summary["request_throughput"],
                   summary["median_ttft_ms"], summary["p99_ttft_ms"], summary["median_tpot_ms"],
                   summary["p99_tpot_ms"], summary["median_e2el_ms"], summary["p99_e2el_ms"])


@dataclass(frozen=True)
class ShapeProfile:
    """The measured points of one shape, by increasing concurrency."""

    shape: Shape
    points: tuple[ProfilePoint, ...]

    def __post_init__(self) -> None:
        points = tuple(sorted(self.points, key=lambda p: p.concurrency))
        object.__setattr__(self, "points", points)
        if not points:
            raise ValueError(f"shape {self.shape.label} has no measured points")
        concurrencies = [p.concurrency for p in points]
        if len(set(concurrencies)) != len(concurrencies):
            raise ValueError(f"shape {self.shape.label} lists a concurrency twice: {concurrencies}")

    def predict(self, metric: str, concurrency: float) -> float:
        """`metric` (a ProfilePoint field) at `concurrency`, interpolated in log2(concurrency)."""
        values = [getattr(p, metric) for p in self.points]
        xs = [math.log2(p.concurrency) for p in self.points]
        x = math.log2(max(concurrency, 1.0))
        if x <= xs[0]:
            return values[0]
        if x >= xs[-1]:
            return values[-1]
        right = bisect.bisect_right(xs, x)
        fraction = (x - xs[right - 1]) / (xs[right] - xs[right - 1])
        return values[right - 1] + fraction * (values[right] - values[right - 1])


@dataclass(frozen=True)
class Profile:
    """Every profiled shape of one model on one machine."""

    shapes: tuple[ShapeProfile, ...]
    model: str = ""
    device: str = "cpu"
    num_units: int = 1
    workload: str = ""
    created: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))
        if not self.shapes:
            raise ValueError("a profile needs at least one shape")
        labels = [s.shape.label for s in self.shapes]
        if len(set(labels)) != len(labels):
            raise ValueError(f"a profile lists a shape twice: {labels}")

    def get(self, shape: Shape) -> ShapeProfile:
        """The profile of `shape`; KeyError when it was not measured."""
        for entry in self.shapes:
            if entry.shape == shape:
                return entry
        raise KeyError(shape.label)

    def to_json(self) -> dict:
        """The JSON document (see the module docstring)."""
        return {"version": PROFILE_VERSION, "model": self.model, "device": self.device,
                "num_units": self.num_units, "workload": self.workload, "created": self.created,
                "shapes": [{"shape": s.shape.label, "points": [asdict(p) for p in s.points]}
                           for s in self.shapes]}

    @classmethod
    def from_json(cls, document: dict) -> "Profile":
        """Parse and validate a profile document; ValueError says what is wrong."""
        if not isinstance(document, dict) or document.get("version") != PROFILE_VERSION:
            raise ValueError(f"not a version-{PROFILE_VERSION} profile (a JSON object with \"version\": "
                             f"{PROFILE_VERSION}, as `scalellm profile` writes)")
        try:
            shapes = tuple(ShapeProfile(Shape.parse(entry["shape"]),
                                        tuple(ProfilePoint(**point) for point in entry["points"]))
                           for entry in document["shapes"])
            return cls(shapes, str(document.get("model", "")), str(document.get("device", "cpu")),
                       int(document.get("num_units", 1)), str(document.get("workload", "")),
                       str(document.get("created", "")))
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed profile: {type(error).__name__} {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """Read a profile file; ValueError when it is missing, not JSON or not a profile."""
        try:
            document = orjson.loads(Path(path).read_bytes())
        except OSError as error:
            raise ValueError(f"cannot read the profile {path}: {error.strerror}") from None
        except orjson.JSONDecodeError as error:
            raise ValueError(f"the profile {path} is not JSON: {error}") from None
        try:
            return cls.from_json(document)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def save(self, path: str | Path) -> None:
        """Write the profile as indented JSON."""
        Path(path).write_bytes(orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2))


def plot_profile(profile: Profile, path: str | Path) -> None:
    """Output tokens/s and E2E p50 against concurrency, one line per shape (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for entry in profile.shapes:
        xs = [p.concurrency for p in entry.points]
        axes[0].plot(xs, [p.output_throughput for p in entry.points], marker="o", label=entry.shape.label)
        axes[1].plot(xs, [p.e2e_p50_ms for p in entry.points], marker="o", label=entry.shape.label)
    concurrencies = sorted({p.concurrency for entry in profile.shapes for p in entry.points})
    for axis, title, ylabel in ((axes[0], "Output throughput", "output tokens/s"),
                                (axes[1], "End-to-end latency p50", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.minorticks_off()
        axis.set_xlabel("concurrency (requests in flight)")
        axis.set_ylabel(ylabel)
        axis.set_title(f"{title} by shape (replicas x {'threads' if profile.device == 'cpu' else 'TP'})")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    axes[0].set_ylim(bottom=0)
    axes[1].set_yscale("log")
    figure.suptitle(f"{profile.model} on {profile.num_units} {profile.device} units", fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
