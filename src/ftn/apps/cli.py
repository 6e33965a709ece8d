"""The ``ftn`` command line. Each sub-command lives in a small function; library errors are
printed as one clear line (exit code 2) rather than a stack trace."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import FTNError

__all__ = ["main"]

#: Top-level module → the pip extra that installs it. The core needs torch and safetensors only;
#: a command that needs more names the extra instead of ending in an ImportError traceback.
_EXTRAS = {"yaml": "train", "tqdm": "train", "matplotlib": "train", "scipy": "train", "torchvision": "train",
           "PIL": "train", "peft": "peft", "transformers": "text", "fastapi": "serve", "uvicorn": "serve",
           "multipart": "serve", "prometheus_client": "serve", "httpx": "serve", "psutil": "serve",
           "onnx": "export", "onnxscript": "export", "onnxruntime": "export", "ray": "ray"}


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    """'needs the X extra' for a module of one of our extras, else None (a real bug: re-raise)."""
    top = (exc.name or "").partition(".")[0]
    extra = _EXTRAS.get(top)
    if extra is None:
        return None
    return (f"this command needs the {top!r} package, which comes with the {extra!r} extra: "
            f"pip install 'factorized-tensor-networks[{extra}]'")


def _cmd_params(args: argparse.Namespace) -> int:
    from ..training.backbones import build_backbone
    from ..core.model import FTNModel

    backbone, _ = build_backbone(args.backbone, pretrained=False)
    options = {}
    if args.include:
        options["include"] = args.include
    if args.exclude:
        options["exclude"] = args.exclude
    model = FTNModel(backbone, rank=args.rank, rank_cap=not args.no_rank_cap, **options)
    for t in range(args.tasks):
        model.add_task(f"task{t + 1}")
    report = model.parameter_report()
    if args.json:
        print(report.to_json(indent=2))
    else:
        print(f"{args.backbone}, rank {args.rank}, {args.tasks} task(s); heads not included\n")
        print(report)
    return 0


def _setup_logging(output_dir: str | None = None) -> None:
    import logging

    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if output_dir:
        from pathlib import Path

        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers,
                        force=True)


def _train_usage() -> str:
    from pathlib import Path

    from ..training.methods import METHODS
    from ..training.settings_registry import SETTINGS

    configs = sorted(Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
    lines = ["ftn train needs a config: ftn train --config FILE.yaml [section.key=value ...]", "",
             f"  settings (the file's `setting:` key): {', '.join(SETTINGS)}",
             f"  methods (method.name=...):            {', '.join(METHODS)}"]
    if configs:
        lines += ["", "  configs in ./configs:"] + [f"    {c}" for c in configs]
    modules = ", ".join(SETTINGS[name].partition(":")[0] for name in SETTINGS)
    lines += ["", f"Every key and its default: src/ftn/training/config.py and each setting's data/model section "
              f"({modules})."]
    return "\n".join(lines)


def _format_metrics(metrics: dict[str, float] | None, setting: str) -> str:
    """A task's metrics as its setting's ``headline`` says (else every metric but the loss)."""
    from ..training.settings_registry import setting_entry

    if not metrics:
        return "-"
    headline = setting_entry(setting).headline
    if headline:
        try:
            return headline.format(**metrics)
        except (KeyError, IndexError):  # a task without that metric: all of them, as below
            pass
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "loss")


def _cmd_train(args: argparse.Namespace) -> int:
    if not args.config:
        print(_train_usage())
        return 2
    from ..training import distributed
    from ..training.config import load_config
    from ..training.runner import run_experiment

    cfg = load_config(args.config, args.overrides)
    _setup_logging(cfg.output_dir)
    summary = run_experiment(cfg, progress=not args.no_progress)
    if not distributed.current().is_main:
        return 0
    print(f"\n{summary['method']} on {summary['backbone']} ({summary['setting']}):")
    for task, r in summary["tasks"].items():
        print(f"  {task:<16} test {_format_metrics(r['test'], cfg.setting)}  trainable {r['trainable_params']:,}")
    print(f"  stored parameters (all tasks): {summary['stored_parameters']:,}; results in {cfg.output_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..core.errors import ConfigError
    from ..training.config import load_config
    from ..training.runner import evaluate_tasks

    if not args.config:
        raise ConfigError("ftn eval needs the config the tasks were trained with: --config FILE.yaml")
    cfg = load_config(args.config, [*args.overrides, "method.load_adapters=[]"])
    paths = [Path(p) for p in args.adapters]
    files = [f for p in paths for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p])]
    if not files:
        raise ConfigError(f"no task files found in {', '.join(map(str, paths))}")
    for (name, metrics), f in zip(evaluate_tasks(cfg, files, args.split).items(), files):
        print(f"{name:<16} {args.split} {_format_metrics(metrics, cfg.setting)}  ({f})")
    return 0


class _SettingDemoFlag(argparse.Action):
    """``ftn demo --<setting>``: that setting's demo instead of the default one. The flag exists
    for every setting the registry names (no import); its help is the setting's own
    (``Demo.help``), read only when help is shown."""

    def __init__(self, option_strings: list[str], dest: str, setting: str = "", **kwargs: object) -> None:
        self.setting = setting
        kwargs.setdefault("default", [])  # the parser's set_defaults(setting_demo=[]) may pass it
        super().__init__(option_strings, dest, nargs=0, **kwargs)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def help(self) -> str:
        from ..training.settings_registry import setting_entry

        demo = setting_entry(self.setting).demo
        return demo.help if demo is not None else f"the {self.setting} setting (it has no demo)"

    @help.setter
    def help(self, value: object) -> None:
        pass

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        chosen = getattr(namespace, self.dest) or []
        setattr(namespace, self.dest, chosen + [self.setting] * (self.setting not in chosen))


class _DemoNames:
    """``ftn sweep --demo``'s choices: the demos of the registry's settings, looked up when the
    option is used or its help shown (building the parser imports no setting)."""

    def _names(self) -> list[str]:
        from ..training.settings_registry import demo_entries

        return [name for name, entry in demo_entries().items() if entry.demo and entry.demo.sweep]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._names())


class _DemoChoice(argparse.Action):
    """``ftn sweep --demo NAME``, checked against :class:`_DemoNames` when given. Not argparse's
    ``choices``: rendering any help line of an option with choices lists them, which would import
    every setting for ``ftn sweep --help``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        if values not in _DemoNames():
            parser.error(f"argument --demo: invalid choice: {values!r} (choose from "
                         f"{', '.join(map(repr, _DemoNames()))})")
        setattr(namespace, self.dest, values)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError
    from ..training.settings_registry import DEFAULT_SETTING, resolve, setting_entry, setting_names

    _setup_logging()
    chosen = [name for name in setting_names() if name in args.setting_demo]
    if len(chosen) > 1:
        flags = [f"--{name}" for name in chosen]
        raise ConfigError(f"choose one of {', '.join(flags[:-1])} and {flags[-1]}")
    entry = setting_entry(chosen[0] if chosen else DEFAULT_SETTING)
    demo = entry.demo
    if demo is None:
        raise ConfigError(f"the {entry.name} setting has no demo")
    # A quick run has its own folder, so it never replaces a full run's results and adapters.
    output = args.output or (f"{demo.output}-quick" if args.quick else demo.output)
    _claim_demo_folder(Path(output), entry.name, args.quick, args.overwrite)
    if args.quick:
        print(_QUICK_NOTE, flush=True)
    options: dict[str, object] = {"quick": args.quick, "progress": not args.no_progress, "extra": args.overrides}
    if demo.methods:
        # `--methods ftn method.ftn.rank=2`: argparse gives the trailing overrides to --methods.
        options["extra"] = [*args.overrides, *(m for m in args.methods or () if "=" in m)]
        methods = tuple(m for m in args.methods or () if "=" not in m)
        from ..training.methods import method_class

        for m in methods:
            method_class(m)  # an unknown name fails here, with the registry's names
        if methods:
            options["methods"] = methods
    results = resolve(demo.run)(output, **options)
    print("\n" + resolve(demo.table)(results))
    print("\n" + demo.done.format(output=output, results=results))
    if args.quick:
        print(_QUICK_NOTE)
    steps = _demo_next_steps(Path(output))
    if steps:
        print("\n" + "\n".join(steps))
    return 0


_QUICK_NOTE = ("--quick is a smoke test on a small slice of the data: its numbers show that everything runs, "
               "they are not results (ftn demo without --quick gives those).")
#: What a demo folder holds (setting, full or quick), written before training starts.
_DEMO_MARKER = ".ftn-demo.json"


def _claim_demo_folder(output: Path, setting: str, quick: bool, overwrite: bool) -> None:
    """Refuse a folder holding a different run (another demo, full vs quick, an ``ftn train``
    run) unless ``--overwrite``: the demos train with resume off and would replace its results
    and adapters. Then record what this run is."""
    import json

    from ..core.errors import ConfigError
    from ..core.io import atomic_write_bytes

    this = {"setting": setting, "quick": quick}
    marker, results = output / _DEMO_MARKER, output / "results.json"
    held = None
    try:
        if marker.is_file():
            held = json.loads(marker.read_text())
        elif results.is_file():  # a folder written before the marker existed, or another command's
            found = json.loads(results.read_text())
            held = {"setting": None, "quick": found.get("quick") if isinstance(found, dict) else None}
    except (OSError, ValueError):
        held = {"setting": None, "quick": None}
    same = held is None or (held.get("quick") is quick and held.get("setting") in (None, setting))
    if not same and not overwrite:
        kind = {True: "a --quick run", False: "a full run"}.get(held.get("quick"), "another run")
        of = f" of the {held['setting']} demo" if held.get("setting") else ""
        raise ConfigError(f"{output} holds {kind}{of}, which this {'--quick ' if quick else ''}run would replace "
                          f"(results and adapters): give another --output, or --overwrite to replace it")
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(marker, json.dumps(this).encode())


def _demo_next_steps(output: Path) -> list[str]:
    """The lines ``ftn demo`` ends with: where its adapters are and the ``ftn predict`` /
    ``ftn serve`` commands that use them (FTN's, else the first method's), on the sample images
    the demo wrote to ``output/samples`` (per task in ``samples/<task>/``, or for every task).
    Empty when the run saved no adapters."""
    import json
    import shlex

    from ..core.adapters import read_adapter
    from ..core.errors import AdapterFileError

    folders = sorted({f.parent for f in output.glob("*/adapters/*.safetensors")})
    if not folders:
        return []
    ftn_first = sorted(folders, key=lambda f: f != output / "ftn" / "adapters")

    def metadata(folder: Path) -> dict | None:
        # A baseline's task file (a full copy, LoRA, ...) is not an adapter ftn predict/serve load.
        try:
            return read_adapter(sorted(folder.glob("*.safetensors"))[0])[1]
        except AdapterFileError:
            return None

    adapters, meta = next(((f, m) for f in ftn_first if (m := metadata(f)) is not None), (None, None))
    if adapters is None or meta is None:
        return [f"Task files (one <task>.safetensors per task): {output}/<method>/adapters/ "
                "(ftn predict / ftn serve take FTN adapters; this run trained none)"]
    files = sorted(adapters.glob("*.safetensors"))
    lines = [f"Adapters (one <task>.safetensors per task): {output}/<method>/adapters/; FTN's: {adapters}"]
    info = meta.get("info", {})
    if "input" not in info:  # not an image task: ftn predict / ftn serve take images
        return lines
    config_file = adapters.parent / "config.json"
    model = json.loads(config_file.read_text()).get("model", {}) if config_file.is_file() else {}
    backbone = ["--backbone", str(model.get("backbone", "mobilenet_v2"))]
    if model.get("weights_path"):
        backbone += ["--weights-path", str(model["weights_path"])]
    elif model.get("pretrained") is False:  # the weights a seed made cannot be rebuilt here
        return lines + ["(a backbone without pretrained weights: give ftn predict / ftn serve its --weights-path)"]
    samples = output / "samples"
    per_task = [f for f in files if (samples / f.stem).is_dir()]
    if per_task:
        chosen = next((f for f in per_task if f.stem == "fashion"), per_task[0])  # readable class names
        predict = ["--adapter", str(chosen), str(samples / chosen.stem)]
    elif samples.is_dir():
        predict = ["--adapter", str(adapters), str(samples)]
    else:
        predict = ["--adapter", str(adapters), "IMAGE.png"]
    lines += ["Label images with them, and serve them over HTTP (docs/serving.md):",
              "  " + shlex.join(["ftn", "predict", *backbone, *predict]),
              "  " + shlex.join(["ftn", "serve", *backbone, "--adapters", str(adapters), "--port", "8000"])]
    if per_task and "outputs" not in info:
        image = sorted((samples / chosen.stem).iterdir())[0]
        lines.append(f"  curl -s --data-binary @{shlex.quote(str(image))} "
                     f"'localhost:8000/tasks/{chosen.stem}/predict?k=3'   # while ftn serve runs")
    return lines


def _cmd_sweep(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from ..core.errors import ConfigError
    from .sweep.sources import config_base, demo_base
    from .sweep import DEFAULT_LR_FACTORS, QUICK, SweepSpec, parse_axis, parse_lr_grid, run_sweep

    # Trailing key=value overrides may follow --methods / --seeds (argparse would take them there).
    overrides = [*args.overrides, *(m for m in args.methods if "=" in m), *(s for s in args.seeds if "=" in s)]
    methods = [m for m in args.methods if "=" not in m]
    try:
        seeds = [int(s) for s in args.seeds if "=" not in s]
    except ValueError:
        raise ConfigError(f"--seeds must be integers, got {args.seeds}") from None
    if bool(args.config) == bool(args.demo):
        raise ConfigError(f"give one of --config FILE.yaml and --demo {'|'.join(_DemoNames())}")
    if args.quick:
        overrides = [*QUICK, *overrides]
    output = Path(args.output)
    base = config_base(args.config, overrides) if args.config else demo_base(args.demo, output, args.quick, overrides)
    try:
        factors = tuple(float(f) for f in args.lr_factors.split(",") if f.strip())
    except ValueError:
        raise ConfigError(f"--lr-factors must be numbers, got {args.lr_factors!r}") from None
    _setup_logging()
    import logging

    logging.getLogger("ftn.train").setLevel(logging.WARNING)
    spec = SweepSpec(base=base, methods=methods, output=output, axes=[parse_axis(a) for a in args.grid],
                     seeds=seeds, lr_grid=parse_lr_grid(args.lr_grid), lr_factors=factors or DEFAULT_LR_FACTORS,
                     lr_extend=args.lr_extend, tune=[parse_axis(a) for a in args.tune],
                     workers=args.workers, reference=args.reference, compare_axis=args.compare_axis,
                     gain_reference=args.gain_reference, progress=not args.no_progress,
                     command="ftn sweep " + shlex.join(args.argv))
    results = run_sweep(spec)
    print(f"\n{len(results['rows'])} runs ({len(results['trained'])} trained now); results.csv, results.json, "
          f"table.md and accuracy_vs_parameters.png in {output}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """``ftn serve``: one process (uvicorn), or with ``--ray`` the same app on Ray Serve replicas."""
    if args.ray:
        from .serving.ray_serve import run_ray

        return run_ray(args)
    from .serving.server import cmd_serve

    return cmd_serve(args)


def _cmd_predict(args: argparse.Namespace) -> int:
    """``ftn predict``, each image labelled once: one named directly and through its folder (or
    twice) is the same file (resolved path), kept where it first appears."""
    from .serving import server
    from .serving.predict import collect_images

    seen: set[Path] = set()
    files = []
    for f in collect_images(args.images):
        if f.resolve() not in seen:
            seen.add(f.resolve())
            files.append(str(f))
    args.images = files
    return server.cmd_predict(args)


def _demo_settings() -> list[str]:
    """The settings other than the default one, each a flag of ``ftn demo``: their names only,
    nothing imported. Without the train extra there are none (``ftn demo`` then names the extra)."""
    try:
        from ..training.settings_registry import DEFAULT_SETTING, setting_names
    except ModuleNotFoundError as exc:
        if _missing_extra(exc) is None:
            raise
        return []
    return [name for name in setting_names() if name != DEFAULT_SETTING]


class _Parser(argparse.ArgumentParser):
    """A parser whose ``complete`` callbacks add arguments the first time it parses or shows its
    help: ``ftn demo``'s setting flags need the settings registry (the training package, hence
    torch), which ``ftn --help`` and the other commands' help must not import."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.complete: list[object] = []

    def _completed(self) -> None:
        while self.complete:
            self.complete.pop(0)(self)  # type: ignore[operator]

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        self._completed()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._completed()
        return super().format_help()

    def format_usage(self) -> str:
        self._completed()
        return super().format_usage()


def _add_demo_flags(p: argparse.ArgumentParser) -> None:
    for name in _demo_settings():
        p.add_argument(f"--{name}", action=_SettingDemoFlag, setting=name, dest="setting_demo")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = _Parser(prog="ftn", description="Factorized Tensor Networks for PyTorch")
    parser.add_argument("--version", action="version", version=f"ftn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("params", help="parameter report for an architecture by name (no weights needed)")
    p.add_argument("--backbone", default="resnet34",
                   help="a torchvision name, torchvision:NAME, timm:NAME or hf:PATH_OR_ID (default resnet34)")
    p.add_argument("--rank", type=int, default=40)
    p.add_argument("--tasks", type=int, default=1)
    p.add_argument("--include", nargs="*", help="glob patterns of layers to adapt (default: all)")
    p.add_argument("--exclude", nargs="*", help="glob patterns of layers not to adapt")
    p.add_argument("--no-rank-cap", action="store_true", help="do not cap ranks at the dense size")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("train", help="train the tasks of a config (any setting), one after another")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=3 method.ftn.rank=16")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate saved tasks (adapter files) on their data")
    p.add_argument("--config", help="the YAML config they were trained with")
    p.add_argument("--adapters", nargs="+", required=True,
                   help="task files (<output_dir>/adapters/<task>.safetensors) or folders of them")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="FTN and every baseline on the embedded benchmark")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test on a small slice (CI), its numbers are not results; writes to the demo's "
                        "folder + '-quick' (outputs/demo-quick)")
    p.complete.append(_add_demo_flags)  # type: ignore[attr-defined]
    p.add_argument("--output", help="folder for results.json, table.md, the plot and each method's adapters "
                                    "(default outputs/demo, outputs/demo-quick with --quick)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different run in --output (full vs --quick, another demo)")
    p.add_argument("--methods", nargs="*", help="methods to compare (default: ftn full linear norm_head lora; also taps, ftn_unfreeze)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every method's config")
    p.set_defaults(func=_cmd_demo, setting_demo=[])

    p = sub.add_parser("sweep", help="a grid of runs: methods × grid axes × seeds, learning rates chosen on "
                                     "validation, paired intervals, results.csv and a plot (docs/sweep.md)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", help="YAML config every run starts from (any setting)")
    # The demos are the registry's, looked up when --demo is used (_DemoChoice).
    source.add_argument("--demo", metavar="NAME", action=_DemoChoice,
                        help="an embedded demo's configs: multidomain (ftn demo's), dense, text or a setting "
                             "package's")
    p.add_argument("--methods", nargs="+", default=["ftn", "full"], help="methods of the registry (default ftn full)")
    p.add_argument("--grid", action="append", default=[], metavar="[METHODS:]KEY=V1,V2",
                   help="a grid axis of config overrides, repeatable; 'ftn,lora:method.ftn.rank=1,2,4' applies "
                        "to those methods only")
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="seeds (default 0 1 2); the first one "
                                                                     "chooses the learning rate")
    p.add_argument("--lr-grid", nargs="+", default=[], metavar="METHOD=LR1,LR2",
                   help="learning rates of a method (default: its own rate × --lr-factors)")
    p.add_argument("--lr-factors", default="0.5,1,2",
                   help="default LR grid: each method's own rate times these (default 0.5,1,2)")
    p.add_argument("--lr-extend", type=int, default=2,
                   help="when the chosen rate is at the grid's edge, add a rate beyond it (the grid's ratio) and "
                        "choose again, at most this many times per direction (default 2; 0: never)")
    p.add_argument("--tune", action="append", default=[], metavar="[METHODS:]KEY=V1,V2",
                   help="a hyper-parameter chosen on validation together with the learning rate, repeatable, "
                        "e.g. 'taps:method.taps.penalty=0.1,0.3,1,3' (each value reported: score, stored "
                        "parameters, TAPS's layers on)")
    p.add_argument("--reference", help="the method compared with every other one (default ftn)")
    p.add_argument("--compare-axis", help="also compare, per method, grid points differing only in this --grid "
                   "axis: its first value against each other value (e.g. method.budget_allocation)")
    p.add_argument("--gain-reference", metavar="METHOD[POINT]",
                   help="also report the multi-task gain Δm against this group, e.g. 'full[data.joint=false]' "
                        "(the single-task networks; dense setting)")
    p.add_argument("--output", default="outputs/sweep", help="folder of the runs and the results")
    p.add_argument("--workers", type=int, default=1, help="training processes (one torch thread each if > 1)")
    p.add_argument("--quick", action="store_true", help="two steps per task on a small slice (CI)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    p.set_defaults(func=_cmd_sweep)

    from .serving import server

    p = sub.add_parser("predict", help="top-k labels (or dense prediction images) for image files")
    server.add_predict_arguments(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("serve", help="serve every adapter of a folder over HTTP from one backbone")
    server.add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)

    from . import export

    p = sub.add_parser("export", help="one task, merged, as an ONNX file or a torch.export program (docs/export.md)")
    export.add_export_arguments(p)
    p.set_defaults(func=export.cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    try:
        return args.func(args)
    except FTNError as exc:
        print(f"ftn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = _missing_extra(exc)
        if message is None:
            raise
        print(f"ftn {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
