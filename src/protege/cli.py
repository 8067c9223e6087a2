"""The command line: each command parses its options and calls the Python API, nothing more."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer

from .errors import ProtegeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil a teacher into a small student, evaluate it, export it to ONNX.")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug messages.")) -> None:
    from .logs import setup

    setup(logging.DEBUG if debug else logging.INFO)


@app.command("distill")
def distill_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<recipe name>)."),
    set_: List[str] = typer.Option([], "--set", help="Override a field, e.g. --set train.epochs=3 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that already holds a run."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow loading pickle weights (can run code)."),
) -> None:
    """Train or load the teacher, distil the student, export ONNX, evaluate, write report.json."""
    from . import api

    overrides = list(set_) + (["teacher.allow_pickle=true", "student.allow_pickle=true"] if allow_pickle else [])
    api.distill_file(recipe, out, overrides, resume=resume, overwrite=overwrite)


@app.command("evaluate")
def evaluate_cmd(run: Path = typer.Argument(..., help="Run folder.")) -> None:
    """Accuracy, macro-F1, teacher agreement, params, bytes and latency for teacher, student and ONNX."""
    from . import api

    api.evaluate(run)


@app.command("export")
def export_cmd(run: Path = typer.Argument(..., help="Run folder."),
               format: str = typer.Option("onnx", "--format", help="Export format (onnx).")) -> None:
    """Export the student and check the file against PyTorch."""
    from . import api

    if format != "onnx":
        raise ProtegeError(f"--format {format!r} is not supported; allowed: onnx")
    api.export_onnx(run)


@app.command("compress")
def compress_cmd(
    run: Path = typer.Argument(..., help="Run folder with a finished student."),
    prune: Optional[float] = typer.Option(None, "--prune", help="Fraction to remove, in (0, 1): channels (structured) or weights."),
    structured: bool = typer.Option(True, "--structured/--unstructured", help="Remove whole channels/neurons (default) or mask weights."),
    target_params: Optional[int] = typer.Option(None, "--target-params", help="Structured: prune to at most this many parameters."),
    scope: str = typer.Option("layer", "--scope", help="layer (same ratio per layer) or global."),
    keep: List[str] = typer.Option([], "--keep", help="Module path to leave unpruned (repeatable)."),
    steps: int = typer.Option(1, "--steps", help="Iterative pruning: rounds of prune + distil."),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", help="KD recovery epochs after each pruning step (default 0: no recovery)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="auto | int8 | static | dynamic | qat (int8 in ONNX Runtime)."),
    target: str = typer.Option("portable", "--target", help="portable (7-bit weights, exact on every CPU) | this_cpu (full range)."),
    calibration: str = typer.Option("minmax", "--calibration", help="Static calibration: minmax | entropy | percentile."),
    calibration_data: Optional[Path] = typer.Option(None, "--calibration-data", help=".npy array of inputs to calibrate on."),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Leave ops ONNX Runtime cannot quantize in float."),
) -> None:
    """Prune and/or int8-quantize a run's student, recover by distillation, evaluate every stage, write report.html."""
    from . import api

    api.compress_cli(run, prune=prune, structured=structured, target_params=target_params, scope=scope, keep=keep,
                     steps=steps, finetune_epochs=finetune_epochs, quantize=quantize, target=target, calibration=calibration,
                     calibration_data=calibration_data, allow_fallback=allow_fallback)


@app.command("convert-gguf")
def convert_gguf_cmd(gguf: Path = typer.Argument(..., help="A .gguf checkpoint (llama.cpp format)."),
                     out: Path = typer.Argument(..., help="New model folder (config.json, model.safetensors, tokenizer).")) -> None:
    """Dequantize a GGUF causal LM once into a safetensors model folder that recipes can name as a teacher."""
    from . import api

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
    from . import api

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
    from . import api

    print(api.inspect(model, input_shape, classes=classes, which="teacher" if teacher else "student"))


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder."),
             overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo run."),
             set_: List[str] = typer.Option([], "--set", help="Override a field of the demo's recipe, e.g. --set train.epochs=5.")) -> None:
    """Bundled data end to end: teacher -> student -> ONNX -> report (a few minutes on 2 cores)."""
    from . import api
    from .demo import demo_recipe

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

    from .files import write_error, write_fix

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
