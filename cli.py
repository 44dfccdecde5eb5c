"""The `fxopt` command: parse arguments → fxopt.optimize → write artifacts. Nothing else lives here.

Installed as `fxopt.console.cli` (see pyproject.toml), so no top-level `cli` module lands in
site-packages. User errors print one line on stderr and exit with code 2; an internal error
prints one line and exits with 1 (FXOPT_DEBUG=1 shows its traceback).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fxopt import rules as rules_mod
from fxopt import substitutes
from fxopt.errors import FxoptError, OutputError, StrictFailure

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="fxopt: rewrite a PyTorch model's linear/conv layers by YAML rules, validated.")
rules_app = typer.Typer(no_args_is_help=True, help="Check rule files; list substitutes and their parameters.")
app.add_typer(rules_app, name="rules")
console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _one_line_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FxoptError as exc:
            err_console.print(f"fxopt: error: {exc}", markup=False)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if os.environ.get("FXOPT_DEBUG"):
                raise
            err_console.print(f"fxopt: internal error: {type(exc).__name__}: {exc} "
                              "(set FXOPT_DEBUG=1 for the traceback)", markup=False)
            raise typer.Exit(1) from None
    return wrapper


@app.command()
@_one_line_errors
def optimize(
    model: Path = typer.Argument(..., help="MODEL.py defining `model` or `build_model()`, and `example_inputs()`"),
    rules: str = typer.Option(..., "--rules", "-r", help="rule file path, or a shipped rule set's name (e.g. kron)"),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="output directory (replaced atomically)"),
    calib_batches: int = typer.Option(8, "--calib-batches", min=0, help="calibration batches used (validation, training)"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="calibration data: a .pt file holding a tensor or a "
                                         "list of batches (default: the model file's calibration_data())"),
    layerwise_steps: int = typer.Option(0, "--layerwise-steps", min=0, help="layer-wise training steps per substitute (0: off)"),
    layerwise_lr: float = typer.Option(1e-3, "--layerwise-lr", min=0.0, help="Adam learning rate of layer-wise training"),
    layerwise_loss: str = typer.Option("mse", "--layerwise-loss", help="mse (relative squared error) or cosine"),
    distill_steps: int = typer.Option(0, "--distill-steps", min=0, help="end-to-end distillation steps after layer-wise training"),
    distill_lr: float = typer.Option(1e-4, "--distill-lr", min=0.0, help="Adam learning rate of distillation"),
    distill_sites: float = typer.Option(0.0, "--distill-sites", min=0.0, help="distillation: weight of each rewritten "
                                        "layer's own target, the original layer's output (0: model outputs only)"),
    time_sites: bool = typer.Option(True, "--time-sites/--no-time-sites", help="time every applied site against its "
                                    "original layer (rules with require_speedup are always timed)"),
    strict: bool = typer.Option(False, "--strict", help="exit 2 if any site is rolled back or end-to-end tolerance fails"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log each stage"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="processes to train across: layer-wise training "
                              "split by site, distillation data parallel (starts torchrun; under torchrun, leave it at 1)"),
) -> None:
    """Trace MODEL.py, apply RULES, (train,) validate, and write model.pt2 and reports into OUT."""
    from fxopt import distributed
    from fxopt.layerwise import Layerwise
    from fxopt.pipeline import optimize as run
    from fxopt.report import print_summary
    from fxopt.trace import calibration_batches, load_calibration_file, load_model_file

    if nproc > 1:
        rules_mod.load(rules)  # a bad rule file: one line, before any process starts
        raise typer.Exit(_torchrun(nproc))
    with distributed.process_group() as across:
        main = distributed.world()[0] == 0
        if verbose and main:
            logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        try:
            layerwise = Layerwise(steps=layerwise_steps, lr=layerwise_lr, loss=layerwise_loss, distill_steps=distill_steps,
                                  distill_lr=distill_lr, distill_sites=distill_sites, progress=main)
        except ValueError as exc:
            raise FxoptError(str(exc)) from None
        ruleset = rules_mod.load(rules)  # rule errors before the (slower) model import
        spec = load_model_file(model)
        if calib is not None:
            batch = spec.example_inputs[0].shape[0] if spec.example_inputs and spec.example_inputs[0].dim() else 1
            calibration = load_calibration_file(calib, batch, calib_batches)
        else:
            calibration = calibration_batches(spec, calib_batches)
        result = run(spec.model, spec.example_inputs, ruleset, calibration=calibration, source=str(model),
                     layerwise=layerwise, time_sites=time_sites, evaluate=spec.evaluate, across_processes=across)
        if result is None:  # a process other than 0 under torchrun: its share of training is done
            return _helper_done()
        result.save(out)
        print_summary(result.report, console, stages=verbose)
        console.print(f"wrote {out}/model.pt2, report.json, report.md, report.html")
        totals, e2e = result.report["totals"], result.report["end_to_end"]
        rolled = totals["rolled_back"] + totals["over_budget"]
        if strict and (rolled or e2e["violations"]):
            problems = [f"{rolled} site(s) rolled back"] if rolled else []
            raise StrictFailure("--strict: " + "; ".join(problems + e2e["violations"]) + f" (results kept in {out})")


def _helper_done() -> None:
    """A process other than 0 under torchrun, its part done and nothing left to write: it leaves the
    group and ends at once. Python's orderly teardown of torch takes about half a second of CPU,
    which, on a machine whose cores are shared out one per process, slowed process 0's validation
    and the gate's timings several-fold (measured: examples/cnn.py validate 0.03 s -> 0.5-0.7 s)."""
    import torch.distributed as dist

    dist.destroy_process_group()
    _end_now(0)


def _torchrun(nproc: int) -> int:
    """This very command under torchrun (torch.distributed.run, in this process) with `nproc`
    processes and without --nproc, one thread each unless OMP_NUM_THREADS says otherwise (process 0
    takes this process's threads back when it works alone: distributed.alone); its exit
    code: 0, or a failed process's (each printed its own one-line error)."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv, args = [], iter(sys.argv[1:])
    for arg in args:
        if arg == "--nproc":
            next(args, None)  # and its value
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    os.environ["FXOPT_THREADS_ALONE"] = str(torch.get_num_threads())  # process 0's, once the others are done
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure report: a traceback
    try:
        run(get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "fxopt", *argv]))
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        return 2 if 2 in codes else max(codes, default=1) or 1
    return 0


@app.command()
@_one_line_errors
def bench(
    model: Path = typer.Argument(..., help="MODEL.py, as for optimize"),
    rules: str = typer.Option(..., "--rules", "-r", help="rule file path, or a shipped rule set's name"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the timings as JSON here"),
    rounds: int = typer.Option(3, "--rounds", min=1, help="interleaved rounds; each figure is their median"),
    min_run_time: float = typer.Option(0.2, "--min-run-time", min=0.001, help="seconds per timing"),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="also time both sides under torch.compile"),
    calib_batches: int = typer.Option(8, "--calib-batches", min=0, help="calibration batches used for validation"),
    layerwise_steps: int = typer.Option(0, "--layerwise-steps", min=0, help="layer-wise training steps, as for optimize"),
    distill_steps: int = typer.Option(0, "--distill-steps", min=0, help="distillation steps, as for optimize"),
) -> None:
    """Time the original model against the rewritten one, eager and compiled, end to end and per site."""
    from fxopt.bench import bench as run
    from fxopt.report import print_bench
    from fxopt.save import write_json
    from fxopt.trace import calibration_batches, load_model_file

    if out is not None and out.is_dir():  # fail before minutes of timing, not after
        raise OutputError(f"{out}: is a directory")
    ruleset = rules_mod.load(rules)
    spec = load_model_file(model)
    from fxopt.layerwise import Layerwise

    timings = run(spec.model, spec.example_inputs, ruleset, compile=compile, rounds=rounds,
                  min_run_time=min_run_time, calibration=calibration_batches(spec, calib_batches), source=str(model),
                  layerwise=Layerwise(steps=layerwise_steps, distill_steps=distill_steps), evaluate=spec.evaluate)
    print_bench(timings, console)
    if out is not None:
        write_json(out, timings)
        console.print(f"wrote {out}", markup=False)


@app.command()
@_one_line_errors
def rescale(
    model: Path = typer.Argument(..., help="MODEL.py, as for optimize (a CNN taking image batches)"),
    factor: float = typer.Option(2.0, "--factor", "-f", help="inputs this many times smaller per spatial axis"),
    rules: str = typer.Option("rescale", "--rules", "-r", help="rescale rule file, or a shipped name"),
    out: Path = typer.Option(Path("out-rescaled"), "--out", "-o", help="output directory (replaced atomically)"),
) -> None:
    """Kernel rescaling: rewrite MODEL.py for inputs FACTOR times smaller (smaller kernels, resampled),
    to train there first; write model.pt2 and the per-layer scaling check into OUT."""
    from fxopt import rescale as rescale_mod
    from fxopt.trace import load_model_file

    ruleset = rules_mod.load_rescale(rules)
    spec = load_model_file(model)
    low = rescale_mod.down(spec.model, spec.example_inputs, factor, ruleset)
    report = rescale_mod.save(spec.model, low, spec.example_inputs, out, str(model))
    table = Table(title=f"{model}: rescaled for inputs of "
                        f"{', '.join('×'.join(map(str, s)) for s in low.input_shapes)}", title_justify="left")
    for col in ("layer", "status", "scaling error", "reason"):
        table.add_column(col, overflow="fold")
    for layer in report["layers"]:
        error = "" if layer["error"] is None else f"{layer['error']:.3g}"
        table.add_row(escape(layer["name"]), layer["status"], error, escape(layer["reason"] or ""))
    console.print(table)
    check = report["check"]
    console.print(f"whole model on smooth inputs: rescaled vs original rel. L2 {check['low_resolution_rel_l2']:.3g}, "
                  f"down and up again {check['round_trip_rel_l2']:.3g}", markup=False)
    console.print(f"wrote {out}/model.pt2, report.json, report.md", markup=False)


@app.command()
@_one_line_errors
def diff(
    a: Path = typer.Argument(..., help="a result folder written by `fxopt optimize` (or a .pt2 file)"),
    b: Path = typer.Argument(..., help="another one, e.g. the same model under other rules"),
    out: Path = typer.Option(Path("diff.html"), "--out", "-o", help="the HTML page to write"),
) -> None:
    """Compare two saved results: both graphs with their differences marked, and every site's outcome."""
    from fxopt.html import diff_page
    from fxopt.save import load_report, write_text

    page = diff_page(load_report(a), load_report(b), (str(a), str(b)))
    write_text(out, page)
    console.print(f"wrote {out}", markup=False)


@rules_app.command("check")
@_one_line_errors
def rules_check(files: list[str] = typer.Argument(..., help="rule files (or shipped names) to validate")) -> None:
    """Validate rule files without a model."""
    for f in files:
        ruleset = rules_mod.load_any(f)
        if isinstance(ruleset, rules_mod.RescaleRules):
            names = ", ".join(f"{r.name} (min_kernel {r.min_kernel})" for r in ruleset.rules)
            console.print(f"{f}: ok, {len(ruleset.rules)} rescale rule(s): {names}", markup=False)
            continue
        names = ", ".join(f"{r.name} → {r.substitute}" for r in ruleset.rules)
        console.print(f"{f}: ok, {len(ruleset.rules)} rule(s): {names}", markup=False)


@rules_app.command("list")
@_one_line_errors
def rules_list() -> None:
    """Substitutes, their parameters and defaults, and the shipped rule sets."""
    for name in substitutes.names():
        spec = substitutes.get(name)
        table = Table(title=f"{spec.name}: {spec.summary} · replaces {', '.join(spec.ops)}", title_justify="left")
        for col in ("parameter", "default", "meaning"):
            table.add_column(col, overflow="fold")
        for p in spec.params:
            table.add_row(p.name, escape(repr(p.default)), escape(p.doc))
        console.print(table)
    shipped = ", ".join(f"{k} ({v.name})" for k, v in sorted(rules_mod.shipped().items()))
    console.print(f"shipped rule sets (use by name with --rules): {shipped}", markup=False)


def main() -> None:
    try:
        app(prog_name="fxopt")
    except SystemExit as done:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a process under torchrun, its group destroyed
            _end_now(done.code)
        raise


def _end_now(code) -> None:
    """End without Python's teardown of torch: with the output written and the group destroyed,
    gloo's worker threads can still abort the interpreter's exit now and then ('terminate called
    without an active exception', SIGABRT; seen about 1 run in 8 of the 2-process tests), which
    torchrun reports as this process failing."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    sys.exit(main())
