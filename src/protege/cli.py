"""The command line: each command parses its options and calls the Python API, nothing more."""
from __future__ import annotations

import inspect
import logging
import sys
import types
import typing
from pathlib import Path
from typing import List, Optional

import click
import typer

from . import api
from .compress.budget import BudgetConfig
from .compress.prune import PruneConfig
from .compress.quantize import QuantizeConfig
from .demo import demo_recipe
from .errors import ProtegeError
from .files import write_error, write_fix
from .logs import setup

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil a teacher into a small student, evaluate it, export it to ONNX.")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug messages.")) -> None:
    setup(logging.DEBUG if debug else logging.INFO)


@app.command("distill")
def distill_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<recipe name>)."),
    set_: List[str] = typer.Option([], "--set", help="Override a field, e.g. --set train.epochs=3 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that already holds a run."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow loading pickle weights (can run code)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Train the student with N seeds (seed, seed+1, ...): mean +- std."),
    baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline",
                                            help="Also train, per seed, the student from labels only (same initial weights, data order)."),
) -> None:
    """Train or load the teacher, distil the student, export ONNX, evaluate, write report.json."""
    overrides = list(set_) + (["teacher.allow_pickle=true", "student.allow_pickle=true"] if allow_pickle else [])
    api.distill_file(recipe, out, overrides, resume=resume, overwrite=overwrite, seeds=seeds, baseline=baseline)


@app.command("tune")
def tune_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (its `tune` section: trials, search space)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Finished trials per study (default: tune.trials, 20)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Tune folder (default: runs/<recipe name>-tune)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Then train the best recipe with N seeds and report test accuracy."),
    baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline",
                                            help="Also tune a labels-only student with the same trial budget, and compare."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL shared by several processes or machines "
                                          "(default: sqlite in the tune folder)."),
    set_: List[str] = typer.Option([], "--set", help="Override a field, e.g. --set train.epochs=10 (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the tune folder over (its studies and trials are deleted)."),
) -> None:
    """Choose the recipe's knobs on the validation split with Optuna; write best.yaml; a killed tune resumes."""
    api.tune_file(recipe, out, list(set_), trials=trials, seeds=seeds, baseline=baseline, storage=storage, overwrite=overwrite)


@app.command("evaluate")
def evaluate_cmd(run: Path = typer.Argument(..., help="Run folder.")) -> None:
    """Accuracy, macro-F1, teacher agreement, params, bytes and latency for teacher, student and ONNX."""
    api.evaluate(run)


@app.command("export")
def export_cmd(run: Path = typer.Argument(..., help="Run folder."),
               format: str = typer.Option("onnx", "--format", help="Export format (onnx).")) -> None:
    """Export the student and check the file against PyTorch."""
    if format != "onnx":
        raise ProtegeError(f"--format {format!r} is not supported; allowed: onnx")
    api.export_onnx(run)


def _option(cls, prefix: str, name: str, field) -> inspect.Parameter:
    """A typer option for one config field: its name from the config (--field-name unless ``cls.CLI`` says otherwise),
    its help from the field's description; None (or an empty list) when not given, so the config's default applies."""
    flag = cls.CLI.get(name, "--" + name.replace("_", "-"))
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X], X | None -> X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is typing.Annotated:  # PathStr -> str
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) is list:
        return inspect.Parameter(f"{prefix}{name}", inspect.Parameter.KEYWORD_ONLY, annotation=List[str],
                                 default=typer.Option([], flag, help=field.description))
    if kind is bool or "/" in flag:  # an on/off pair: --x/--no-x, or the config's own pair of names
        flag = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
        return inspect.Parameter(f"{prefix}{name}", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool],
                                 default=typer.Option(None, flag, help=field.description))
    if typing.get_origin(kind) is typing.Literal:
        kind = type(typing.get_args(kind)[0])
    return inspect.Parameter(f"{prefix}{name}", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                             default=typer.Option(None, flag, help=field.description))


def _given(cls, prefix: str, options: dict) -> dict:
    """The fields whose options were given (an on/off pair for a two-value field: on = the first value)."""
    out = {}
    for name, field in cls.model_fields.items():
        value = options[f"{prefix}{name}"]
        if value is None or value == []:
            continue
        if isinstance(value, bool) and typing.get_origin(field.annotation) is typing.Literal:
            value = typing.get_args(field.annotation)[0 if value else 1]
        out[name] = value
    return out


def compress_cmd(run: Path, **options) -> None:
    """Prune and/or int8-quantize a run's student, recover by distillation, evaluate every stage, write report.html.
    With --max-latency-ms and/or --max-bytes: search pruning ratios and int8 schemes for the most accurate file within them."""
    api.compress_cli(run, prune=_given(PruneConfig, "p_", options), quantize=_given(QuantizeConfig, "q_", options),
                     budget=_given(BudgetConfig, "b_", options))


def _compress_signature() -> inspect.Signature:
    """compress_cmd's options, one per PruneConfig and QuantizeConfig field: a new field is a new option."""
    run = inspect.Parameter("run", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                            default=typer.Argument(..., help="Run folder with a finished student."))
    return inspect.Signature([run] + [_option(cls, prefix, name, field) for cls, prefix in ((PruneConfig, "p_"), (QuantizeConfig, "q_"), (BudgetConfig, "b_"))
                                      for name, field in cls.model_fields.items()])


compress_cmd.__signature__ = _compress_signature()
app.command("compress")(compress_cmd)


@app.command("convert-gguf")
def convert_gguf_cmd(gguf: Path = typer.Argument(..., help="A .gguf checkpoint (llama.cpp format)."),
                     out: Path = typer.Argument(..., help="New model folder (config.json, model.safetensors, tokenizer).")) -> None:
    """Dequantize a GGUF causal LM once into a safetensors model folder that recipes can name as a teacher."""
    print(f"converted: {api.convert_gguf(gguf, out)}")


@app.command("generate")
def generate_cmd(
    teacher: Path = typer.Argument(..., help="The teacher: a causal-LM model folder (config, weights, tokenizer)."),
    prompts: Path = typer.Argument(..., help="Corpus to cut prompts from (.jsonl / .csv rows, or paragraphs of a .txt)."),
    out: Path = typer.Argument(..., help="The new corpus, a .jsonl file (one text per line)."),
    column: str = typer.Option("text", "--column", help="The text column of PROMPTS (and of OUT)."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", help="Tokens of real text before each continuation."),
    new_tokens: int = typer.Option(96, "--new-tokens", help="Tokens the teacher writes after each prompt."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature; 0: greedy."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generate call."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many prompts."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow loading pickle weights (can run code)."),
) -> None:
    """Sequence-level KD: the teacher writes a corpus for a student (any tokenizer) to learn with next-token CE."""
    api.generate_corpus(teacher, prompts, out, column=column, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                        temperature=temperature, batch_size=batch_size, limit=limit, seed=seed, overwrite=overwrite,
                        allow_pickle=allow_pickle)


@app.command("inspect")
def inspect_cmd(
    model: str = typer.Argument(..., help="Zoo name (cnn, resnet20, ...), file.py:factory, or a run folder."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Shape of one example, e.g. 1,28,28 (not needed for a run)."),
    classes: int = typer.Option(10, "--classes", help="Number of output classes (zoo names and factories)."),
    teacher: bool = typer.Option(False, "--teacher", help="For a run folder: inspect its teacher instead of its student."),
) -> None:
    """Print every module path with its output shape and parameters (one dry forward pass), to pick hook points."""
    print(api.inspect(model, input_shape, classes=classes, which="teacher" if teacher else "student"))


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder."),
             overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo run."),
             set_: List[str] = typer.Option([], "--set", help="Override a field of the demo's recipe, e.g. --set train.epochs=5.")) -> None:
    """Bundled data end to end: teacher -> student -> ONNX -> report (a few minutes on 2 cores)."""
    api.distill(demo_recipe(list(set_)), out, overwrite=overwrite)


INTERRUPTED = {
    "distill": "interrupted: the last finished epoch is saved; continue with the same command plus --resume",
    "compress": "interrupted: the run is as it was before this compress (its files, recipe.yaml, reports and metrics "
                "put back); run the command again",
}


def _interrupted() -> str:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    return INTERRUPTED.get(command, "interrupted: files protege was writing were left as they were")


def _os_error(e: OSError) -> str:
    """A failed read or write (full disk, no permission, read-only disk) as one line that names the file."""
    import errno

    where = f"{e.filename}: " if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"{write_fix(e, Path(e.filename or '.'))}, then continue with --resume (or choose another --out)"
    else:
        fix = "check the disk and the path, then retry"
    return f"{where}{write_error(e)}; {fix}"


def _usage_errors() -> tuple:
    """click's usage errors, and typer's vendored copy of them (typer >= 0.16 ships its own click)."""
    errors = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        errors.append(TyperClickException)
    except ImportError:
        pass
    return tuple(errors)


USAGE_ERRORS = _usage_errors()


def main() -> None:
    try:
        rc = app(standalone_mode=False)  # typer turns Ctrl-C into a return value of 130
    except ProtegeError as e:
        if "--debug" in sys.argv[1:]:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        rc = 130
    except USAGE_ERRORS as e:  # usage errors: unknown option, missing argument, bad value
        message = " ".join(e.format_message().split()).rstrip(".")
        if message:  # (no arguments at all: the help was printed, nothing more to say)
            command = f"protege {sys.argv[1]}" if len(sys.argv) > 1 else "protege"
            print(f"error: {message}; see `{command} --help`", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk, a permission, a read-only disk: the file and the fix, no traceback
        if "--debug" in sys.argv[1:]:
            raise
        print(f"error: {_os_error(e)}", file=sys.stderr)
        sys.exit(2)
    if rc == 130:
        print(_interrupted(), file=sys.stderr)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
