"""What a task supplies to the stages. The stages (distill, compress, export, evaluate) are written once; a task
says what differs: how its models are built and checked, what the student learns from (the loss), how an epoch is
validated, what rebuilds the student, what is exported beside it, and what the report measures.

Adding a task (sequence-to-sequence, detection) is one new module with a Task subclass, registered in
``stages/tasks.py``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch
from accelerate import Accelerator
from torch import nn

from ..data import DataSplits
from ..evaluate.report import Report
from ..run import Run
from ..train import FitResult


@dataclass
class Models:
    """A run's models once built and checked: the teachers (empty for an EMA self-teacher) and the student.
    ``teacher_ids``: the training blocks in a teacher's own tokenisation (causal LM, ULD across tokenizers);
    ``foreign``: the teacher reads another tokenizer (never fed the student's ids)."""

    teachers: list[nn.Module]
    student: nn.Module
    teacher_ids: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    foreign: bool = False


class Task(ABC):
    name: ClassVar[str]
    compressible: ClassVar[bool] = False  # whether `protege compress` (pruning, int8 candidates) applies

    @abstractmethod
    def data_line(self, data: DataSplits) -> str:
        """The log line that describes the data (sizes of the splits)."""

    @abstractmethod
    def build(self, run: Run, data: DataSplits) -> Models:
        """Build the teachers and the student and check them against the data and each other, before anything is written."""

    def teach(self, run: Run, data: DataSplits, models: Models, acc: Accelerator, resume: bool) -> Models:
        """The teacher stage (train it, reuse it, or use it as loaded); by default the teachers are used as built."""
        return models

    @abstractmethod
    def init_student(self, run: Run, data: DataSplits, student: nn.Module, teacher: nn.Module) -> None:
        """Start the student from the teacher's weights (``student.init``), in place."""

    @abstractmethod
    def describe_training(self, run: Run, data: DataSplits, student: nn.Module, models: Models) -> str:
        """The log line that says what the student learns from."""

    @abstractmethod
    def loss(self, run: Run, data: DataSplits, models: Models, acc: Accelerator, student: nn.Module) -> Callable:
        """The student's training loss: (model, x, y, idx) -> {"loss": ..., other named terms}."""

    def generations(self, run: Run) -> int:
        """How many students are trained one after another, each taught by the previous (born-again); by default one."""
        return 1

    def validate(self, data: DataSplits) -> Optional[Callable]:
        """An epoch's validation for the fit loop (None: validation accuracy)."""
        return None

    @abstractmethod
    def student_config(self, run: Run, data: DataSplits, student: nn.Module, result: FitResult) -> dict:
        """student/config.json: what rebuilds the student's weights and which epoch they are."""

    @abstractmethod
    def finish(self, run: Run, data: DataSplits, models: Models, student: nn.Module, acc: Accelerator, resume: bool,
               export: bool, evaluate_: bool) -> Run:
        """What follows the student stage in `protege distill` (compression, export, evaluation)."""

    @abstractmethod
    def export(self, run: Run, data: DataSplits) -> Path:
        """`protege export`: the checked ONNX file(s); returns the deployed one."""

    @abstractmethod
    def evaluate(self, run: Run, data: DataSplits, show: bool = True) -> Report:
        """`protege evaluate`: measure the run's models, write report.json (and report.html); returns the report."""
