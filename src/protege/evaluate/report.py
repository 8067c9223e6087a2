"""The report of a run, typed: `Report` (pydantic) is what the tasks build, what report.json holds, and what the
terminal table (here) and report.html (html.py) are rendered from, row by row through one formatter (`cell`)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table

from ..errors import RunError
from ..files import finite_json, write_atomic

Number = Optional[float]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stage(_Section):
    """One model of the run as measured (a row of the table). Classification fills accuracy, macro_f1, agreement and
    latency_*; a causal LM fills test_ppl, the generation speed and, for its ONNX files, scoring_*. A field a stage
    does not measure is absent from report.json; one it could not measure is null."""

    name: Optional[str] = Field(None, description="stage: teacher, student, student_onnx, pruned, pruned_onnx, int8 (...)")
    file: Optional[str] = Field(None, description="the file measured, relative to the run folder")
    runtime: Optional[str] = Field(None, description="pytorch or onnxruntime")
    accuracy: Number = None
    macro_f1: Number = None
    agreement: Number = Field(None, description="share of test examples where it predicts the teacher's class")
    params: Optional[int] = None
    bytes: Optional[int] = Field(None, description="size of the file on disk")
    latency_ms_b1: Number = Field(None, description="p50 ms per batch of 1 over interleaved rounds")
    latency_ms_b1_p95: Number = None
    latency_ms_b1_iqr: Number = None
    latency_b1_reliable: Optional[bool] = None
    latency_ms_b32: Number = None
    latency_ms_b32_p95: Number = None
    latency_ms_b32_iqr: Number = None
    latency_b32_reliable: Optional[bool] = None
    test_ppl: Number = Field(None, description="causal LM: perplexity on the test blocks")
    test_loss: Number = None
    test_tokens: Optional[int] = None
    tokens_per_s: Number = Field(None, description="causal LM: greedy generation at batch 1 with the KV cache")
    ms_per_token: Number = None
    new_tokens: Optional[int] = None
    prompt_tokens: Optional[int] = None
    generation_reliable: Optional[bool] = None
    ms_per_block_b1: Number = Field(None, description="causal LM: ms to score one test block at batch 1")
    ms_per_block_b1_p95: Number = None
    ms_per_block_b1_iqr: Number = None
    scoring_b1_reliable: Optional[bool] = None
    scheme: Optional[dict[str, Any]] = Field(None, description="int8 file: its scheme as read from the file")
    note: Optional[str] = None

    @classmethod
    def of(cls, values: dict[str, Any]) -> "Stage":
        """A row from a quantization candidate (which holds more than a stage: verification, validation figures)."""
        return cls(**{k: v for k, v in values.items() if k in cls.model_fields})


class Latency(BaseModel):
    """How the latencies were measured, and whether all of them stand. Per measurement label (b1, b32, generation,
    scoring_b1) a mapping: calls_per_stage, the machine's load while measuring, per-round medians, spreads."""

    model_config = ConfigDict(extra="allow")
    method: Optional[str] = None
    rounds: Optional[int] = None
    warmup: Optional[int] = None
    threads: Optional[int] = None
    new_tokens: Optional[int] = None
    max_spread: Number = None
    max_other_share: Number = None
    reliable: bool = True
    reasons: list[str] = []

    def label(self, name: str) -> dict[str, Any]:
        extra = self.model_extra or {}
        return extra.get(name) if isinstance(extra.get(name), dict) else {}


class Environment(_Section):
    cpu: Optional[str] = None
    cpu_flags: list[str] = []
    int8_kernels: Optional[str] = None
    cores: Optional[int] = None
    threads: Optional[int] = None
    torch: Optional[str] = None
    onnxruntime: Optional[str] = None
    python: Optional[str] = None


class Quantization(BaseModel):
    """quantized/choice.json as the report shows it: the mode, the chosen file and why, every candidate measured on
    the validation split (fp32 included), the failed ones, the settings, and the int8 scheme and its verification."""

    model_config = ConfigDict(extra="allow")
    mode: Optional[str] = None
    chosen: Optional[str] = None
    reason: Optional[str] = None
    source: Optional[str] = None
    candidates: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    selected_on: Optional[str] = None
    config: Optional[dict[str, Any]] = None
    target: Optional[str] = None
    scheme: Optional[dict[str, Any]] = None
    verification: Optional[dict[str, Any]] = None


class Report(_Section):
    """report.json. Classification: ``stages`` in order (the last is the deployed one), the first three also by
    name; a causal LM: teacher and student, and after `protege export` its ONNX files (onnx, int8)."""

    name: str = ""
    task: Optional[str] = None
    data: Optional[str] = None
    test_examples: Optional[int] = None
    onnx_max_abs_diff: Number = Field(None, description="largest |ONNX - PyTorch| logit on test examples")
    pruning: Optional[dict[str, Any]] = Field(None, description="pruned/config.json: steps, parameters, conv groups")
    quantization: Optional[Quantization] = None
    teacher: Optional[Stage] = None
    student: Optional[Stage] = None
    student_onnx: Optional[Stage] = None
    onnx: Optional[Stage] = None
    int8: Optional[Stage] = None
    stages: Optional[list[Stage]] = None
    deployed: Optional[str] = Field(None, description="the last stage: the file to ship")
    compression_ratio: Number = Field(None, description="teacher params / final student params")
    speedup_generation: Number = None
    speedup_generation_reliable: Optional[bool] = None
    bytes_ratio: Number = None
    speedup_b1: Number = None
    speedup_b1_reliable: Optional[bool] = None
    speedup_b32: Number = None
    speedup_b32_reliable: Optional[bool] = None
    speedup_b1_pytorch: Number = None
    speedup_b1_pytorch_reliable: Optional[bool] = None
    latency: Optional[Latency] = None
    notes: Optional[str] = None
    environment: Optional[Environment] = None

    def rows(self) -> list[Stage]:
        """The table's rows: the stages, or (a causal LM's report) its named models."""
        if self.stages is not None:
            return self.stages
        named = {k: getattr(self, k) for k in ("teacher", "student", "student_onnx", "onnx", "int8")}
        return [s.model_copy(update={"name": s.name or k}) for k, s in named.items() if s is not None]

    def to_json(self) -> dict[str, Any]:
        """What report.json holds: the fields that were set (a stage keeps the keys its task measures), NaN -> null."""
        return finite_json(self.model_dump(exclude_unset=True))


def read_report(path: Path, fix: str) -> Report:
    """report.json as a Report; a damaged or foreign file is a one-line RunError naming it and ``fix``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunError(f"{path} is damaged or unreadable ({type(e).__name__}); {fix}") from None
    try:
        return Report.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        raise RunError(f"{path} is not a protege report ({where}: {err['msg']}); {fix}") from None


def write_report(path: Path, report: Report) -> None:
    """Write report.json atomically; a NaN or inf figure becomes null (strict JSON)."""

    write_atomic(path, json.dumps(report.to_json(), indent=2, allow_nan=False))


# ---------------------------------------------------------------- one row formatter
class Column(NamedTuple):
    key: str       # a Stage field
    header: str
    kind: str      # pct (a share, shown in %), int, kb (bytes, shown in kB), ms, f2, x
    reliable: str = ""  # the Stage field that says whether this figure stands ("" when it always does)


CLASSIFY_COLUMNS = [
    Column("accuracy", "accuracy %", "pct"), Column("macro_f1", "macro-F1 %", "pct"),
    Column("agreement", "agreement %", "pct"), Column("params", "params", "int"), Column("bytes", "size kB", "kb"),
    Column("latency_ms_b1", "b1 p50 ms", "ms", "latency_b1_reliable"),
    Column("latency_ms_b1_p95", "b1 p95 ms", "ms", "latency_b1_reliable"),
    Column("latency_ms_b32", "b32 p50 ms", "ms", "latency_b32_reliable"),
    Column("latency_ms_b32_p95", "b32 p95 ms", "ms", "latency_b32_reliable")]
LM_COLUMNS = [
    Column("test_ppl", "test ppl", "f2"), Column("params", "params", "int"), Column("bytes", "size kB", "kb"),
    Column("tokens_per_s", "tokens/s b1", "ms", "generation_reliable"),
    Column("ms_per_block_b1", "ms per block b1", "ms", "scoring_b1_reliable")]


def columns(report: Report) -> list[Column]:
    return LM_COLUMNS if report.task == "causal_lm" else CLASSIFY_COLUMNS


def number(v: Any) -> float | None:
    """A finite number, or None for anything missing or not finite."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def fmt(v: Any, kind: str) -> str:
    x = number(v)
    if x is None:
        return "-"
    if kind == "pct":
        return f"{100 * x:.2f}"
    if kind == "int":
        return f"{int(x):,}"
    if kind == "kb":
        return f"{x / 1024:,.1f}"
    if kind == "x":
        return f"{x:.1f}"
    if kind == "f2":
        return f"{x:.2f}"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


class Cell(NamedTuple):
    text: str
    unreliable: bool  # the measurement marked it: shown with a "?"


def cell(row: Stage, col: Column) -> Cell:
    """One figure of one row, as the terminal table and report.html both show it."""
    text = fmt(getattr(row, col.key), col.kind)
    unreliable = bool(col.reliable) and getattr(row, col.reliable) is False and text != "-"
    return Cell(text + "?" if unreliable else text, unreliable)


def speedup_text(report: Report, key: str) -> str:
    """"12.3x", or "unreliable, 12.3x measured" when the report marks that speedup unreliable; "-" when absent."""
    v = number(getattr(report, key))
    if v is None:
        return "-"
    return f"unreliable, {v:.1f}x measured" if getattr(report, f"{key}_reliable") is False else f"{v:.1f}x"


def latency_footnote(report: Report) -> str:
    """Why latency figures are marked "?": the reasons in the report's latency section ("" when all are reliable)."""
    if report.latency is None or report.latency.reliable:
        return ""
    return "? unreliable latency: " + "; ".join(report.latency.reasons)


def format_table(report: Report, p95: bool = False) -> Table:
    """The terminal table: a row per stage (p50 latencies; ``p95`` adds the p95 columns) and a caption with the
    ratios, the ONNX parity, the int8 scheme and why figures marked "?" are unreliable."""
    table = Table(title=f"protege report: {report.name}")
    cols = [c for c in columns(report) if p95 or not c.key.endswith("_p95")]
    table.add_column("model", justify="left")
    table.add_column("runtime", justify="left")
    for c in cols:
        table.add_column(c.header, justify="right")
    for row in report.rows():
        table.add_row(row.name or "?", row.runtime or "-", *(cell(row, c).text for c in cols))
    table.caption = "\n".join(line for line in (_caption(report), latency_footnote(report)) if line)
    return table


def _caption(report: Report) -> str:
    ratio = f"compression {fmt(report.compression_ratio, 'x')}x params, {fmt(report.bytes_ratio, 'x')}x bytes"
    if report.task == "causal_lm":
        return f"{ratio}; generation speedup (student vs teacher) {speedup_text(report, 'speedup_generation')}"
    out = (f"{ratio}; speedup b1 {speedup_text(report, 'speedup_b1')} ({report.deployed or 'student ONNX'} vs teacher); "
           f"ONNX max |diff| {_diff(report.onnx_max_abs_diff)}")
    scheme = report.quantization.scheme if report.quantization else None
    if scheme:
        out += (f"\nint8: {scheme.get('weights')}: {'portable' if scheme.get('portable') else 'not portable'} "
                f"({scheme.get('portable_why')})")
    return out


def _diff(v: Number) -> str:
    x = number(v)
    return "-" if x is None else f"{x:.2e}"


def print_report(report: Report) -> None:
    Console(width=None if sys.stdout.isatty() else 140).print(format_table(report))
