"""The `easier-kernels` command line: prune, score, costs, fold, export, backends, bench.

    easier-kernels prune                      # the paper's ResNet-18 (width 0.25) on the shipped Fashion-MNIST subset
    easier-kernels prune --model vgg16_bn --dataset cifar10 --data-root ~/data --download --width 1 --out runs/vgg
    easier-kernels prune --model timm:resnet50 --weights resnet50.pth --dataset imagefolder --data-root ~/flowers
    easier-kernels prune --model hf-gpt2:n_layer=6,n_embd=256 --dataset text:shakespeare.txt --tokenizer bpe:4096
    easier-kernels prune --model hf-bert --dataset tsv:sst2/ --tokenizer bpe:4096 --max-drop 1
    easier-kernels score runs/vgg             # the entropy table of a run's current model
    easier-kernels costs runs/vgg             # each site's true removal cost against every training-free score
    easier-kernels fold runs/vgg              # fold its chains (per plan), save runs/vgg/folded.pt
    easier-kernels export runs/vgg --format onnx   # a checked ONNX file, latency before/after in ONNX Runtime
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch

from . import tasks, text
from .distributed import DEFAULT_TIMEOUT
from .export import FORMATS
from .files import atomic_write, unwritable
from .linearize import PLAN
from .runtimes import RUNTIMES

PRUNE_DEFAULTS = {"model": "resnet18", "dataset": "fashion-mnist-mini", "width": 0.25, "epochs": 4, "epochs_per_step": 1,
                  "max_drop": 1.0, "layers_per_step": 1, "batch_size": 128, "lr": 0.01, "train_lr": 0.1, "seed": 0,
                  "mode": "pooled", "scoring": "ride_along", "select": "entropy", "runtime": "eager", "plan": "measure",
                  "latency_target": None, "split_seed": None, "num_classes": None, "image_size": None, "deploy_batch": 1,
                  "distill": None, "distill_temperature": 4.0, "anneal": None,
                  "entropy_weight": None, "entropy_side": "on", "patience": 0,
                  # text datasets (text:, tsv:); optimizer / lr / train_lr / max_drop default by dataset (`_resolve_defaults`)
                  "tokenizer": None, "seq_len": 128, "split": None, "max_increase": None, "optimizer": "sgd",
                  "gen_tokens": 32}
# text runs: transformers train with AdamW at these rates; a causal LM may lose 5% perplexity by default
TEXT_DEFAULTS = {"optimizer": "adamw", "lr": 3e-4, "train_lr": 1e-3, "max_increase": 0.05}
# what `prune --out` writes: fold and export never replace these (nor anything in checkpoints/)
RUN_FILES = ("run.json", "baseline.pt", "pruned.pt", "report.json", "report.md", "entropy.png", "accuracy.png",
             "latency.png", "tokenizer.json")
HF_FOLDER = "hf_model"  # a text run's pruned Hugging Face model (save_pretrained; ek.models.load_pretrained reads it)
# options a resumed run may change; every other one must match the run it resumes
RESUMABLE = ("max_steps", "device", "workers", "data_root", "download", "quiet", "resume", "out", "dist_timeout")


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class LostRank(UsageError):
    """Another rank died or hangs: printed as one line, then the process ends at once (exit code 2):
    an orderly shutdown can wait forever on the lost rank's connections."""


def _finite(text: str) -> float:
    """argparse type of every float option: nan and inf are not values any option takes."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_finite.__name__ = "finite number"  # (what argparse names in "invalid finite number value: 'nan'")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: {message}\n")


# ---- prune

def _cmd_prune(args) -> int:
    """The loop on every rank under torchrun (a process group from the environment), else in one
    process; rank 0 alone checks and writes --out and prints."""
    from . import distributed

    device = distributed.local_device(_device(args.device))
    try:
        joined = distributed.init_from_env(device, timeout=args.dist_timeout)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot join the torchrun process group: {str(exc).strip().splitlines()[0]}") from None
    try:
        done = _prune(args, device)
    except RuntimeError as exc:
        if not distributed.lost_rank(exc):
            raise
        raise LostRank(distributed.lost_rank_message(exc, args.dist_timeout)) from None  # (no teardown: it waits on the lost rank)
    except BaseException:
        if joined:
            torch.distributed.destroy_process_group()
        raise
    if joined:  # (a group the caller made is the caller's)
        torch.distributed.destroy_process_group()
    return done


def _prune(args, device) -> int:
    from . import distributed, report

    settings = {k: v for k, v in vars(args).items() if k not in RESUMABLE and k not in ("func", "command")}
    out = Path(args.out)
    main = distributed.is_main()
    existed = out.exists()
    resuming = distributed.from_main(lambda: _check_out(out, settings, args.resume))
    try:
        result = _run(args, device, out, settings, resuming)
    except Exception:  # (not an interrupt: what it leaves, --resume continues)
        if main and not resuming:
            _undo_start(out, existed)
        raise
    if main:
        print("\n" + report.summary(result.to_dict()))
        print(f"wrote {out / 'report.md'}, report.json, entropy.png, accuracy.png, latency.png, pruned.pt (ek.load)"
              + (f", {HF_FOLDER}/ (the pruned Hugging Face model)" if (out / HF_FOLDER).is_dir() else "")
              + " and checkpoints/")
    return 0


def _run(args, device, out: Path, settings: dict, resuming: bool):
    """The run in `out`: data, model, baseline, the loop; its files written on rank 0."""
    from . import distributed, report
    from .checkpoints import CheckpointError
    from .prune import prune as run_prune

    main = distributed.is_main()
    if not resuming and main:  # (first: a text run's tokenizer and tokens are written into the run folder)
        atomic_write(out / "run.json", lambda f: f.write(json.dumps({"settings": settings}, indent=2).encode()))
    splits, model, trained = _data_and_model(args, out)
    model.to(device)
    text_run = isinstance(splits, text.TextSplits)
    task = tasks.CausalLM() if text_run and splits.task == "causal_lm" else tasks.Classification()
    channels = None if text_run else _channels(model, splits)
    train, val, test = _loaders(splits, args, model_channels=channels, seed=args.seed)
    scores = _baseline(model, train, args, out, device, trained, task)
    run_settings = {**settings, "num_classes": args.num_classes or _classes(splits), "in_channels": channels,
                    "data_root": args.data_root, **(_text_settings(splits) if text_run else {})}

    def save(result) -> None:
        if main:
            result.settings.update(run_settings)
            if result.stopped and _is_hf(model):  # the run ended: the pruned model as a Hugging Face model too
                _save_hf(result, model, out, args.gen_tokens if task.name == "causal_lm" else None)
            result.save(out / "pruned.pt")
            report.write_report(result.to_dict(), out)

    try:
        result = run_prune(model, train, val, test_loader=test, max_drop=args.max_drop, task=task, optimizer=args.optimizer,
                           epochs_per_step=args.epochs_per_step, layers_per_step=args.layers_per_step,
                           max_steps=args.max_steps, mode=args.mode, scoring=args.scoring, scores=scores, lr=args.lr,
                           device=device, seed=args.seed, checkpoint_dir=out / "checkpoints", resume=args.resume,
                           progress=not args.quiet, on_step=save, select=args.select.replace("-", "_"),
                           select_seed=args.select_seed, runtime=args.runtime, plan=args.plan,
                           latency_target=args.latency_target, deploy_batch=args.deploy_batch, distill=args.distill,
                           distill_temperature=args.distill_temperature, anneal=args.anneal, patience=args.patience,
                           entropy_weight=args.entropy_weight, entropy_side=args.entropy_side)
    except CheckpointError as exc:  # (a corrupt latest checkpoint is skipped with a warning; none readable ends here)
        raise UsageError(str(exc)) from None
    return result


def _undo_start(out: Path, existed: bool) -> None:
    """A fresh run failed before its first checkpoint: its run.json (and the folder it made) go,
    so that a corrected rerun starts there. A trained baseline stays, with the run.json it belongs
    to: `--resume` continues from it."""
    if (out / "baseline.pt").exists() or any((out / "checkpoints").glob("step_*.pt")):
        return
    (out / "run.json").unlink(missing_ok=True)
    for folder in (out / "checkpoints", *(() if existed else (out,))):
        try:
            folder.rmdir()  # (only where empty)
        except OSError:
            pass


def _check_out(out: Path, settings: dict, resume: bool) -> bool:
    """Whether `out` holds this run to resume; an error where it may not take this run (nothing a
    user wrote is ever overwritten)."""
    record = out / "run.json"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder")
    if resume and not record.exists():
        raise UsageError(f"--resume: {out} holds no run to continue (no {record.name} there); check --out, or leave out "
                         "--resume to start a run")
    for folder in (out, out / "checkpoints"):
        if (denied := unwritable(folder)) is not None:
            raise UsageError(f"--out {out}: cannot write in {denied} (permission denied or read-only); choose a folder "
                             "you can write to")
    if record.exists():
        try:
            previous = json.loads(record.read_text())["settings"]
        except (ValueError, KeyError) as exc:
            raise UsageError(f"{record} is unreadable ({type(exc).__name__}); choose another --out") from None
        if not resume:
            raise UsageError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
        # an option missing from an older run.json had its default there
        differs = [k for k in sorted(set(previous) | set(settings))
                   if previous.get(k, PRUNE_DEFAULTS.get(k)) != settings.get(k, PRUNE_DEFAULTS.get(k))]
        if differs:
            shown = ", ".join(f"--{k.replace('_', '-')} {previous.get(k)} (now {settings.get(k)})" for k in differs)
            raise UsageError(f"--out {out} holds a run started with {shown}; resume with the same options, or choose "
                             "another --out")
        return True
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty and holds no run; choose a new or empty folder")
    return False


def _data_and_model(args, out: Path | None = None):
    from . import data, distributed

    if text.is_text(args.dataset):
        return _text_data_and_model(args, out)
    if args.dataset not in data.DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; choose from {', '.join(data.DATASETS)}, or text:FILE "
                         "(a causal LM) or tsv:PATH (text classification)")
    try:
        split_seed = args.seed if args.split_seed is None else args.split_seed
        # one download per machine (data, and a hub model with --download), then the others read it
        with distributed.local_main_first(args.download):
            splits = data.load(args.dataset, args.data_root, download=args.download, seed=split_seed,
                               augment=args.augment, image_size=args.image_size)
            torch.manual_seed(args.seed)  # the same initial weights for the same seed
            model = _build_model(args.model, _num_classes(args.num_classes, splits), splits.in_channels, args.width,
                                 download=args.download)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as exc:  # RuntimeError: torchvision's datasets
        raise UsageError(str(exc).strip().splitlines()[0]) from None
    _cut(splits, args.train_size, args.val_size)  # a quicker run on part of the split
    trained = bool(args.weights) and _load_weights(model, args)
    return splits, model, trained


def _text_data_and_model(args, out: Path | None):
    """Text splits (tokenizer trained or read in the run folder `out`) and a text model sized for them."""
    from . import distributed, models

    try:
        split = _split_fractions(args.split)
        # rank 0 of each machine trains and saves the BPE and the token files; the others read them
        with distributed.local_main_first(True):
            splits = text.load(args.dataset, _tokenizer_spec(args), seq_len=args.seq_len, split=split,
                               split_seed=args.seed if args.split_seed is None else args.split_seed,
                               cache_dir=None if out is None else out / "tokens", tokenizer_folder=out)
        torch.manual_seed(args.seed)  # the same initial weights for the same seed
        tok = splits.tokenizer
        spec = models.TextSpec(splits.task, tok.vocab_size, args.seq_len, tok.pad_id, tok.eos_id)
        model = models.build(args.model, num_classes=_num_classes(args.num_classes, splits), text=spec,
                             download=args.download)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise UsageError(str(exc).strip().splitlines()[0]) from None
    _cut(splits, args.train_size, args.val_size)
    trained = bool(args.weights) and _load_weights(model, args)
    return splits, model, trained


def _tokenizer_spec(args) -> str:
    """--tokenizer, by default an hf: model folder's own tokenizer."""
    if args.tokenizer:
        return args.tokenizer
    folder = Path(args.model.removeprefix("hf:")) if args.model.startswith("hf:") else None
    if folder is not None and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return f"hf:{folder}"
    raise UsageError(f"--dataset {args.dataset} needs --tokenizer: bytes (256 ids, nothing to train), bpe:N (a byte-level "
                     "BPE of N tokens trained on the training text, saved in --out) or hf:FOLDER")


def _split_fractions(text_value: str | None) -> tuple:
    if text_value is None:
        return (0.9, 0.05, 0.05)
    try:
        return tuple(float(x) for x in text_value.split(","))
    except ValueError:
        raise UsageError(f"--split {text_value!r} is not three fractions (write e.g. 0.9,0.05,0.05)") from None


def _classes(splits) -> int | None:
    return splits.num_labels if isinstance(splits, text.TextSplits) else splits.num_classes


def _text_settings(splits) -> dict:
    """What rebuilds a text run's model (`_model_of`): the task and the tokenizer's sizes."""
    tok = splits.tokenizer
    return {"task": splits.task, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "eos_id": tok.eos_id}


def _model_of(settings: dict):
    """The unpruned architecture of a run, from its settings."""
    from . import models

    if settings.get("task"):
        spec = models.TextSpec(settings["task"], settings["vocab_size"], settings["seq_len"], settings["pad_id"],
                               settings["eos_id"])
        return models.build(settings["model"], num_classes=settings["num_classes"], text=spec)
    return _build_model(settings["model"], settings["num_classes"], settings["in_channels"], settings["width"])


def _is_hf(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained")


def _save_hf(result, model, out: Path, gen_tokens: int | None) -> None:
    """The pruned network folded, written back into the Hugging Face model (`ek.write_back`; `model`
    is the trained baseline, which the loop never changes) and saved in out/hf_model with its
    tokenizer; with `gen_tokens` (a causal LM), its generation speed against the baseline's."""
    import shutil

    from . import payoff
    from .capture import example_from_spec
    from .fold import InexactFold, WriteBackError, fold, write_back

    example = example_from_spec(result.example)
    try:
        pruned = write_back(fold(result.model.eval(), example, original=model.eval()), model)
    except (WriteBackError, InexactFold) as exc:  # (pruned.pt holds the result either way)
        print(f"note: the pruned network stays a graph module (pruned.pt), not a Hugging Face model: {exc}",
              file=sys.stderr)
        return
    pruned.save_pretrained(out / HF_FOLDER)
    if (out / "tokenizer.json").is_file():
        shutil.copy(out / "tokenizer.json", out / HF_FOLDER / "tokenizer.json")
    if gen_tokens:
        prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        result.generation = payoff.generation(pruned, model, prompt, gen_tokens)


def _cut(splits, train_size: int | None, val_size: int | None) -> None:
    """The training and validation splits cut to their first N samples where a size is given."""
    for part, size in (("train", train_size), ("val", val_size)):
        if size is not None:
            dataset = getattr(splits, part)
            setattr(splits, part, torch.utils.data.Subset(dataset, range(min(size, len(dataset)))))


def _num_classes(requested: int | None, splits) -> int | None:
    """--num-classes, by default the dataset's class count; never fewer (its labels would not fit)."""
    classes = _classes(splits)
    if requested is None or classes is None:
        return classes
    if requested < classes:
        name = getattr(splits, "name", None) or splits.source
        raise UsageError(f"--num-classes {requested} is fewer than the {classes} classes of {name}; "
                         f"pass at least {classes}, or leave it out")
    return requested


def _build_model(name: str, num_classes: int, data_channels: int, width: float, download: bool = False):
    """The paper's models take the data's channels and --width, timm's the data's channels;
    torchvision's and transformers' take 3 channels (grayscale is repeated) at their own width."""
    from . import models

    if name in models.PAPER_MODELS:
        return models.build(name, num_classes=num_classes, in_channels=data_channels, width=width)
    if name.startswith("timm:"):
        return models.build(name, num_classes=num_classes, in_channels=data_channels)
    return models.build(name, num_classes=num_classes, download=download)


def _load_weights(model, args) -> bool:
    """Loads --weights into the model; False where its head was replaced (then untrained)."""
    from . import distributed, models
    from .recipe_entry import RECIPE_ENTRY

    path = args.weights
    try:
        state = models.read_weights(path)
        if RECIPE_ENTRY in state:
            raise UsageError(f"--weights {path} holds a pruned network; --weights takes the unpruned model's "
                             "state_dict (load a pruned one in Python with ek.load(path, model_fn))")
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"--weights {path}: no such file") from None
    except (ValueError, ImportError) as exc:  # ImportError: safetensors for a .safetensors file
        raise UsageError(f"--weights: {exc}") from None
    try:
        replaced = models.load_weights(model, state)
    except ValueError as exc:
        raise UsageError(f"--weights {path} does not fit --model {args.model}: {exc}; pass a state_dict of that "
                         "architecture") from None
    if distributed.is_main():
        print(f"loaded --weights {path}" + (f"; {replaced} (trained with the rest for --epochs {args.epochs})"
                                             if replaced else ""))
    return replaced is None


def _channels(model, splits) -> int:
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return conv.in_channels if conv is not None else splits.in_channels


class _RepeatChannels:
    """Collates grayscale batches as 3-channel ones, for torchvision's models."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, batch):
        images, labels = torch.utils.data.default_collate(batch)
        return images.expand(-1, self.channels, -1, -1).contiguous(), labels


def _workers(requested: int | None, dataset: str) -> int:
    """--workers, by default none for the datasets held in memory (a worker would only copy tensors)
    and up to 4 for imagefolder, whose images are read and decoded on access."""
    if requested is not None:
        return requested
    return min(4, os.cpu_count() or 1) if dataset == "imagefolder" else 0


def _loaders(splits, args, model_channels: int, seed: int = 0):
    """Train, validation and test loaders; under torchrun each rank's part (a DistributedSampler
    seeded by --seed for training, a padding-free shard for evaluation). --batch-size is per process."""
    from torch.utils.data import DataLoader

    from . import distributed

    if isinstance(splits, text.TextSplits):
        collate, workers = splits.collate, args.workers or 0
    else:
        collate = _RepeatChannels(model_channels) if model_channels != splits.in_channels else None
        workers = _workers(args.workers, splits.name)

    def loader(dataset, shuffle):
        if dataset is None:
            return None
        # no generator of its own: the order comes from torch's global RNG, which checkpoints restore
        whole = DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, num_workers=workers,
                           collate_fn=collate, pin_memory=torch.cuda.is_available())
        return distributed.shard(whole, train=shuffle, seed=seed)

    return loader(splits.train, True), loader(splits.val, False), loader(splits.test, False)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} needs a CUDA GPU; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None


def _baseline(model, train, args, out: Path, device, trained: bool, task=None):
    """Trains the model `--epochs` epochs (unless --weights loaded it whole: `trained`), the last one
    with the scores riding along; kept in out/baseline.pt so that a resumed run does not train it again."""
    from . import distributed, train as training
    from .capture import batch_inputs
    from .entropy import EntropyMeter

    if trained or args.epochs == 0:
        if not trained:
            what = "--weights with a new head" if args.weights else "no --weights"
            print(f"note: --epochs 0 and {what}: pruning an untrained model", file=sys.stderr)
        return None
    path = out / "baseline.pt"
    saved = distributed.from_main(lambda: _read_baseline(path))
    if saved is not None:
        model.load_state_dict(saved["state_dict"])
        return saved["scores"]
    example = batch_inputs(next(iter(train)), device)  # what torch.export captures from, where torch.fx cannot
    meter = EntropyMeter(model, example_inputs=example, mode=args.mode)
    try:
        training.fit(model, train, args.epochs, lr=args.train_lr, meter=meter, device=device,
                     progress=not args.quiet and distributed.is_main(), desc="baseline",
                     loss_fn=None if task is None else task.loss, optimizer=args.optimizer)
        scores = dict(meter.scores())
    finally:
        meter.close()
    distributed.sync_module(model)
    if distributed.is_main():
        atomic_write(path, lambda f: torch.save({"state_dict": model.state_dict(), "scores": scores}, f))
    return scores


def _read_baseline(path: Path) -> dict | None:
    """The saved baseline, or None (to train it) when absent or unreadable (with a warning)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        warnings.warn(f"{path} is unreadable ({type(exc).__name__}); training the baseline again", stacklevel=2)
        return None


# ---- score

def _source(path_arg: str) -> Path:
    """The pruned.pt that `score`, `fold` and `export` read: a run folder's, or the file given."""
    path = Path(path_arg)
    return path / "pruned.pt" if path.is_dir() else path


def _load_run(path_arg: str, what: str):
    """(pruned.pt path, the run's CLI settings, its PruneResult) from a run folder or its pruned.pt."""
    from .prune import load, read_record

    path = _source(path_arg)
    try:
        settings = read_record(path).get("settings", {})
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    if "model" not in settings:
        raise UsageError(f"{path} was saved from Python (no CLI settings); {what} it with ek.load(...) in Python")
    try:
        result = load(path, lambda: _model_of(settings))
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as exc:
        raise UsageError(str(exc).strip().splitlines()[0]) from None
    return path, settings, result


def _run_splits(settings: dict, dataset: str, data_root: str | None, run: Path | None = None):
    """The run's dataset (or `dataset`), split as the run split it (text: with the run's tokenizer,
    read from its folder `run` where it trained one)."""
    from . import data

    split_seed = settings["seed"] if settings.get("split_seed") is None else settings["split_seed"]
    try:
        if text.is_text(dataset):
            saved = run / "tokenizer.json" if run is not None else None
            tokenizer = f"file:{saved}" if saved is not None and saved.is_file() else settings["tokenizer"]
            return text.load(dataset, tokenizer, seq_len=settings["seq_len"], split=_split_fractions(settings.get("split")),
                             split_seed=split_seed)
        return data.load(dataset, data_root or settings.get("data_root"),
                         seed=split_seed, augment=settings["augment"], image_size=settings.get("image_size") if dataset == "imagefolder" else None)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise UsageError(str(exc).strip().splitlines()[0]) from None


def _cmd_score(args) -> int:
    from .capture import to_device
    from .entropy import entropy_scores
    from .sites import find_sites

    path, settings, result = _load_run(args.path, "score")
    splits = _run_splits(settings, args.dataset or settings["dataset"], args.data_root, path.parent)
    device = _device(args.device)
    net = result.model.to(device).train()  # the paper counts in train mode; buffers are restored
    train, _, _ = _loaders(splits, args, settings["in_channels"])
    scores = entropy_scores(net, train, mode=args.mode, max_batches=args.max_batches)
    kinds = {s.name: s for s in find_sites(net, to_device(_example_at(result, 1), device))}
    print(f"{path}: {len(scores)} active sites, {len(result.linearized)} linearized; {args.mode} entropy over "
          f"{scores.batches} batches of {args.dataset or settings['dataset']}")
    print(f"{'rank':>4}  {'site':<32} {'kind':<10} {'channels':>8}  {'entropy (bits)':>14}")
    for rank, name in enumerate(scores.ranking(), 1):
        site = kinds[name]
        print(f"{rank:>4}  {name:<32} {site.kind:<10} {site.channels:>8}  {scores[name]:>14.4f}")
    if result.linearized:
        print("linearized: " + ", ".join(result.linearized))
    return 0


# ---- costs: what removing each site really costs, against the training-free scores

COSTS_FORMAT = "easier_kernels.removability/1"


def _cmd_costs(args) -> int:
    from .entropy import entropy_scores
    from .oracle import agreement, finetuned_cost, removal_costs
    from .scores import on_split, output_change, training_free
    from .train import check_rate

    if args.epochs_per_step is not None and args.epochs_per_step < 1:
        raise UsageError(f"--epochs-per-step must be an integer >= 1, not {args.epochs_per_step}")
    if args.lr is not None:
        try:
            check_rate("--lr", args.lr)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    path, settings, result = _load_run(args.path, "costs")
    if settings.get("task"):
        raise UsageError(f"{path} is a text run: costs measures accuracy drops of image classifiers fine-tuned with SGD; "
                         "text runs are not supported yet")
    out = Path(args.out) if args.out else path.with_name("removability.json")
    _check_costs_out(out, args.force)
    cache = Path(args.cache) if args.cache else path.with_name("costs.json")
    splits = _run_splits(settings, settings["dataset"], args.data_root)
    # the loop's schedule: the run's subsets unless given others
    _cut(splits, args.train_size or settings.get("train_size"), args.val_size or settings.get("val_size"))
    train, val, _ = _loaders(splits, args, settings["in_channels"])
    device = _device(args.device)
    net = result.model.to(device)
    torch.manual_seed(settings["seed"])
    counted = entropy_scores(net.train(), train, mode=settings["mode"], energy=True)  # the paper counts in train mode
    table = training_free(counted, output_change(net, val, max_batches=args.change_batches), seed=settings["seed"])
    epochs = args.epochs_per_step or settings["epochs_per_step"]
    lr = settings["lr"] if args.lr is None else args.lr
    try:
        costs = removal_costs(net, train, val, seeds=args.seeds, epochs=epochs, lr=lr,
                              weight_decay=settings["weight_decay"], plan=settings["plan"], runtime=settings["runtime"],
                              cache=cache, progress=not args.quiet)
    except ValueError as exc:  # a cache of other weights or options
        raise UsageError(str(exc)) from None
    cost = finetuned_cost(costs)
    k = sum(c <= args.max_drop for c in cost.values())
    record = {"format": COSTS_FORMAT, "run": str(path), "seeds": args.seeds, "epochs": epochs, "lr": lr,
              "train_size": len(splits.train), "val_size": len(splits.val), "max_drop": args.max_drop, "k": k,
              "baseline": json.loads(cache.read_text())["baseline"], "scores": table,
              "split": {n: on_split(counted.probabilities[n]) for n in counted}, "costs": costs,
              "agreement": {name: agreement(values, cost, k) for name, values in table.items()}}
    atomic_write(out, lambda f: f.write(json.dumps(record, indent=1).encode()))
    _print_costs(record, cost)
    print(f"wrote {out} (costs cached in {cache}: a rerun measures only what is missing)")
    return 0


def _check_costs_out(out: Path, force: bool) -> None:
    """--out of `costs`: a file it wrote before is rewritten, any other existing file only with --force."""
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; pass the path of the file to write")
    if _run_file(out):
        raise UsageError(f"{out} is a run folder's own file (never replaced); pass --out another path")
    if out.exists() and not force:
        try:
            ours = json.loads(out.read_text()).get("format") == COSTS_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UsageError(f"{out} exists and was not written by `costs`; pass --force to replace it, or --out another path")
    if (denied := unwritable(out)) is not None:
        raise UsageError(f"cannot write {out}: {denied} is not writable (permission denied or read-only)")


def _print_costs(record: dict, cost: dict) -> None:
    scores, split = record["scores"], record["split"]
    names = sorted(cost, key=lambda n: (cost[n] != cost[n], cost[n]))  # the cheapest first
    labels = {"entropy": "entropy", "off_fraction": "off fraction", "linearization_error": "lin. error",
              "output_change": "out. change"}
    columns = [s for s in labels if s in scores]
    print(f"{'site':<28} {'cost':>6} {'untrained':>9} {'on/off':>9} " + " ".join(f"{labels[c]:>12}" for c in columns))
    for name in names:
        on, off = split[name]
        print(f"{name:<28} {cost[name]:>6.2f} {record['costs'][name].get('untrained', math.nan):>9.2f} "
              f"{on:>4.2f}/{off:<4.2f} " + " ".join(f"{scores[c][name]:>12.4g}" for c in columns))
    print(f"cost: validation points lost with that site alone linearized and fine-tuned ({record['epochs']} epoch(s) on "
          f"{record['train_size']} images, seeds {', '.join(map(str, record['seeds']))}; mean); untrained: before "
          f"fine-tuning; on/off: share of channels always on / always off")
    print(f"how well each score ranks the sites by cost (k = {record['k']} sites cost <= {record['max_drop']:g} point alone):")
    for name, agreed in record["agreement"].items():
        print(f"  {name:<20} spearman {agreed['spearman']:+.2f}  kendall {agreed['kendall']:+.2f}  "
              f"top-{record['k']} overlap {agreed['top_k']:.2f}")


# ---- fold, export

def _folded(args, what: str):
    """(run path, settings, the run's folded model, the example batch) for `fold` / `export`: folded
    for args.runtime, checked against the run's unpruned architecture with batch norms folded."""
    from . import payoff, report
    from .capture import positional, to_device
    from .fold import fold, format_decisions
    from .fold.graph import InexactFold

    path, settings, result = _load_run(args.path, what)
    device = _device(args.device)
    batch = result.deploy_batch if args.batch_size is None else args.batch_size  # the batch its plans were timed at
    example = to_device(_example_at(result, batch), device)
    shape = list(positional(result.model, example)[0].shape)
    original = _model_of(settings).to(device)
    try:
        folded = fold(result.model.to(device).eval(), example, runtime=args.runtime, portable=args.portable,
                      decide=args.decide, allow_inexact=args.allow_inexact, original=original.eval())
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    except InexactFold as exc:
        raise UsageError(f"{exc.what}; pass --allow-inexact to accept it") from None
    record = folded.meta["easier_kernels"]["fold"]
    print(f"{path}: {len(result.linearized)} sites linearized; {record['batch_norms']} batch norms folded; "
          f"plans timed in {args.runtime} on {device} with a batch of {list(shape)}")
    print(format_decisions(record["decisions"], record["latency"]))
    print(f"relative error of the outputs: {record['relative_error']:.1e}")
    before = {"runtime": args.runtime, "device": str(device), "example_shape": list(shape), **payoff.counts(original, example)}
    after = {**payoff.counts(folded, example), **payoff.latency_fields(record["latency"])}
    print("\n".join(report.payoff_lines(before, after)))
    return path, settings, folded, example


def _example_at(result, batch: int):
    """The run's example inputs at `batch` samples: random images, or token ids (ones: valid ids)."""
    from .capture import example_from_spec

    args, kwargs = example_from_spec(result.example)
    if not any(t.is_floating_point() for t in (*args, *kwargs.values())):
        resize = lambda t: t[:1].expand(batch, *t.shape[1:]).contiguous()  # noqa: E731
        return tuple(map(resize, args)), {k: resize(v) for k, v in kwargs.items()}
    shape = (batch, *result.example_shape[1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _output(args, default: str) -> Path:
    """Where `fold` / `export` write, checked before any work: never a run's own file or the file
    read, an existing file only with --force, in a folder this process can write in."""
    source = _source(args.path)
    if not source.is_file():  # (what is read is named first)
        raise UsageError(f"{source}: no such file")
    out = Path(args.out) if args.out else source.with_name(default)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; pass the path of the file to write")
    if out.resolve() == source.resolve() or _run_file(out):
        raise UsageError(f"{out} is a run folder's own file (prune wrote it; never replaced, even with --force); pass --out "
                         "another path")
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to replace it, or --out another path")
    if (denied := unwritable(out)) is not None:
        raise UsageError(f"cannot write {out}: {denied} is not writable (permission denied or read-only); pass --out "
                         "a path you can write to")
    return out


def _run_file(path: Path) -> bool:
    """Whether `path` is a file `prune --out` wrote (or would write) in a run folder."""
    path = path.resolve()
    folder = path.parent
    if folder.name == "checkpoints" and (folder.parent / "run.json").exists():
        return True
    return (folder / "run.json").exists() and path.name in RUN_FILES


def _cmd_fold(args) -> int:
    from .export import save_folded

    out = _output(args, "folded.pt")
    _, settings, folded, _ = _folded(args, "fold")
    save_folded(folded, out)
    print(f"saved {out} (load it with ek.load_folded(path, model_fn), model_fn building the unpruned {settings['model']})")
    return 0


def _cmd_export(args) -> int:
    from .export import export

    args.runtime = args.runtime or ("onnxruntime" if args.format == "onnx" else "eager")
    args.portable = True
    out = _output(args, f"model.{args.format}")
    _, settings, folded, example = _folded(args, "export")
    dynamic = bool(settings.get("task")) and args.format == "onnx"  # text: any batch size and sequence length
    try:
        written = export(folded, example, out, format=args.format, dynamic=dynamic)
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {out} ({args.format}{', dynamic batch and sequence length' if dynamic else ''}); its outputs match "
          f"the PyTorch module within a relative error of {written['relative_error']:.1e}")
    return 0


# ---- backends, bench

def _cmd_backends(args) -> int:
    from . import ops

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print("available backends:", ", ".join(ops.available_backends()))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"default on {device}: {ops.backends.backend_name(torch.device(device))}")
    return 0


def _cmd_bench(args) -> int:
    from .benchmark import SHAPES, kernel_report

    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        raise UsageError(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda needs a CUDA GPU; use --device cpu")
    _cmd_backends(args)
    rows = kernel_report(args.shapes, args.device)
    headers = list(rows[0])
    print("\n| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="easier-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prune = sub.add_parser("prune", help="the EASIER loop on a model and dataset; writes a report, plots, checkpoints")
    d = PRUNE_DEFAULTS
    prune.add_argument("--model", default=d["model"], help="resnet18, vgg16_bn, mobilenet_v2 (the paper's CIFAR-style "
                       "models), a torchvision classification name (torchvision.resnet18 for theirs), timm:NAME "
                       "(a timm model, random init) or hf:FOLDER (a transformers image classifier from a "
                       "save_pretrained folder; a hub name with --download)")
    prune.add_argument("--dataset", default=d["dataset"], help="fashion-mnist-mini (shipped, the default), fashion-mnist, "
                       "cifar10-subset, cifar10, imagefolder (read from disk as it is used); text:FILE (a causal "
                       "LM on a plain-text file, cut into --seq-len token blocks, streamed from disk) or tsv:PATH "
                       "(text<TAB>label lines: a folder with train.tsv, dev.tsv, test.tsv, or one file split)")
    prune.add_argument("--tokenizer", help="text datasets: bytes (256 ids), bpe:N (a byte-level BPE of N tokens trained "
                       "on the training text, saved in --out), file:tokenizer.json, or hf:FOLDER (default: an hf: "
                       "model folder's own)")
    prune.add_argument("--seq-len", type=int, default=d["seq_len"], help="text: tokens per block (causal LM) or the "
                       "longest sentence kept (classification)")
    prune.add_argument("--split", help="text:FILE / one tsv file: train,val,test fractions (default 0.9,0.05,0.05; "
                       "text by position, tsv by a --split-seed permutation)")
    prune.add_argument("--max-increase", type=_finite, help="causal LMs (text:): the relative validation perplexity "
                       "increase allowed (default 0.05: +5%%)")
    prune.add_argument("--optimizer", choices=["sgd", "adamw"], help="sgd (momentum 0.9; the default for images) or "
                       "adamw (the default for text)")
    prune.add_argument("--gen-tokens", type=int, default=d["gen_tokens"], help="causal LMs: new tokens generated "
                       "(greedy, KV cache) when the generation speed is timed at the end")
    prune.add_argument("--data-root", help="the dataset's folder (not needed for fashion-mnist-mini)")
    prune.add_argument("--download", action="store_true", help="let torchvision download fashion-mnist / cifar10, "
                       "transformers an hf: hub model; nothing is downloaded without it")
    prune.add_argument("--weights", help="a pretrained state_dict for --model (.pth/.pt, or .safetensors): then no "
                       "baseline training, unless its classifier head is for other classes (then replaced and "
                       "trained for --epochs)")
    prune.add_argument("--num-classes", type=int, help="the model's classes (default: the dataset's)")
    prune.add_argument("--image-size", type=int, help="imagefolder: the side of the square crops (default 224)")
    prune.add_argument("--width", type=_finite, default=d["width"], help="channel width multiplier of the paper models")
    prune.add_argument("--epochs", type=int, default=d["epochs"], help="baseline training epochs (none with "
                       "--weights, unless its head was replaced)")
    prune.add_argument("--epochs-per-step", type=int, default=d["epochs_per_step"], help="fine-tuning epochs per step")
    prune.add_argument("--max-steps", type=int, help="stop after this many steps (default: until the accuracy drops)")
    prune.add_argument("--max-drop", type=_finite, help="accuracy points allowed below the baseline (default 1; a "
                       "causal LM takes --max-increase)")
    prune.add_argument("--layers-per-step", type=int, default=d["layers_per_step"], help="sites linearized per step")
    prune.add_argument("--patience", type=int, default=d["patience"], metavar="N",
                       help="retry on rejection: a step that drops the accuracy past --max-drop is undone and the "
                            "next move tried, until N+1 steps in a row were rejected (a rejected site is never tried "
                            "again; with --layers-per-step > 1, first half as many sites); 0, the paper: stop at the "
                            "first rejected step")
    prune.add_argument("--mode", default=d["mode"], choices=["pooled", "batch_mean"], help="how counts become entropies")
    prune.add_argument("--scoring", default=d["scoring"], choices=["ride_along", "pass"],
                       help="count during the last fine-tuning epoch, or in a separate pass")
    prune.add_argument("--select", default=d["select"],
                       choices=["entropy", "entropy-latency", "output-change", "random", "first", "last"],
                       help="which sites a step removes: the lowest entropy (the method); the least entropy per ms "
                            "saved, gains measured in --runtime (entropy-latency); the least change of the network's "
                            "outputs when linearized alone (output-change: predicts the removal cost best, see "
                            "docs/RESULTS.md); or a naive baseline: a random order, or execution order from the "
                            "input (first) or output (last) end")
    prune.add_argument("--select-seed", type=int, help="seed of --select random's order (default: --seed)")
    prune.add_argument("--runtime", default=d["runtime"], choices=list(RUNTIMES),
                       help="where the pruned model will run: each chain's fold is planned (timed) there")
    prune.add_argument("--latency-target", type=_finite, help="also stop, successfully, once the folded network runs "
                       "in this fraction of the original's latency (e.g. 0.7)")
    prune.add_argument("--plan", default=d["plan"], choices=list(PLAN),
                       help="measure (plan each chain by timing it), merge (prepare every chain to merge), none")
    prune.add_argument("--deploy-batch", type=int, default=d["deploy_batch"], help="the batch size the pruned model "
                       "will serve at (1: per-request latency): plans, gains and latencies are timed at it")
    prune.add_argument("--no-augment", dest="augment", action="store_false", help="no training augmentation (random flip and "
                       "4-pixel shift; imagefolder: random resized crop and flip)")
    prune.add_argument("--distill", type=_finite, nargs="?", const=0.5, default=d["distill"], metavar="WEIGHT",
                       help="fine-tune with knowledge distillation from the unpruned network: WEIGHT (default 0.5) "
                            "is the teacher's share of the loss, the task's 1 - WEIGHT")
    prune.add_argument("--distill-temperature", type=_finite, default=d["distill_temperature"],
                       help="the softmax temperature of --distill (default 4)")
    prune.add_argument("--anneal", type=_finite, metavar="FRACTION", default=d["anneal"],
                       help="gradual linearization: each step's sites go from their activation to the identity over "
                            "this fraction of the step's batches, (1 - t) act(x) + t x (default: at once)")
    prune.add_argument("--entropy-weight", type=_finite, default=d["entropy_weight"], metavar="WEIGHT",
                       help="entropy in the loss: the sites next in line add WEIGHT x their soft layer entropy to the "
                            "fine-tuning loss, so that they arrive nearly linear (default: none)")
    prune.add_argument("--entropy-side", default=d["entropy_side"], choices=["on", "both"],
                       help="--entropy-weight pushes units towards always-on (on: the identity a linearized ReLU "
                            "becomes) or towards either end (both: the paper's entropy)")
    prune.add_argument("--lr", type=_finite, help="fine-tuning learning rate (cosine to 0 per step; default 0.01, "
                       "3e-4 with adamw)")
    prune.add_argument("--train-lr", type=_finite, help="baseline training learning rate (default 0.1, 1e-3 with adamw)")
    prune.add_argument("--batch-size", type=int, default=d["batch_size"])
    prune.add_argument("--train-size", type=int, help="train on the first N images of the training split only")
    prune.add_argument("--val-size", type=int, help="validate on the first N images of the validation split only")
    prune.add_argument("--workers", type=int, help="data loader worker processes (default: 0, imagefolder up to 4)")
    prune.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    prune.add_argument("--seed", type=int, default=d["seed"], help="seeds the weights, the data order and augmentation, "
                       "and the train/validation split")
    prune.add_argument("--split-seed", type=int, help="seed of the train/validation split alone (default: --seed): "
                       "other --seed values then train differently on the same split")
    prune.add_argument("--out", default="easier-run", help="folder for report, plots, checkpoints (default ./easier-run)")
    prune.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    prune.add_argument("--quiet", action="store_true", help="no progress bars or per-step rows")
    prune.add_argument("--dist-timeout", type=_finite, default=DEFAULT_TIMEOUT, help="under torchrun: seconds a rank waits for the "
                       "others before it fails (a rank died or hangs); longer than any step's rank-0-only work")
    prune.set_defaults(func=_cmd_prune)

    score = sub.add_parser("score", help="print the entropy table of a pruned model (a run folder or its pruned.pt)")
    score.add_argument("path", help="a run folder written by `easier-kernels prune --out`, or its pruned.pt")
    score.add_argument("--dataset", help="score on another dataset than the run's")
    score.add_argument("--data-root")
    score.add_argument("--mode", default="pooled", choices=["pooled", "batch_mean"])
    score.add_argument("--max-batches", type=int, help="score on the first N batches only")
    score.add_argument("--batch-size", type=int, default=128)
    score.add_argument("--workers", type=int, help="data loader worker processes (default: 0, imagefolder up to 4)")
    score.add_argument("--device", default="auto")
    score.set_defaults(func=_cmd_score)

    costs = sub.add_parser("costs", help="what removing each site alone really costs (linearized and fine-tuned with the "
                           "run's schedule), against every training-free score: entropy, off fraction, "
                           "linearization error, output change, random")
    costs.add_argument("path", help="a run folder written by `easier-kernels prune --out` (or its pruned.pt): the costs "
                       "of its current network's sites")
    costs.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds per site (default 0 1)")
    costs.add_argument("--epochs-per-step", type=int, help="fine-tuning epochs per site (default: the run's)")
    costs.add_argument("--lr", type=_finite, help="fine-tuning learning rate (default: the run's)")
    costs.add_argument("--train-size", type=int, help="fine-tune on the first N training images (default: the run's)")
    costs.add_argument("--val-size", type=int, help="validate on the first N images (default: the run's)")
    costs.add_argument("--change-batches", type=int, default=4, help="validation batches the output change is measured on")
    costs.add_argument("--max-drop", type=_finite, default=1.0, help="k of the top-k overlap: the sites that cost at most "
                       "this many points alone")
    costs.add_argument("--cache", help="the measured costs, kept between runs (default: costs.json in the run folder)")
    costs.add_argument("--out", help="the JSON written (default: removability.json in the run folder)")
    costs.add_argument("--force", action="store_true", help="replace an existing --out that `costs` did not write")
    costs.add_argument("--batch-size", type=int, default=128)
    costs.add_argument("--data-root")
    costs.add_argument("--workers", type=int, help="data loader worker processes (default: 0, imagefolder up to 4)")
    costs.add_argument("--device", default="auto")
    costs.add_argument("--quiet", action="store_true", help="no progress bars")
    costs.set_defaults(func=_cmd_costs)

    fold = sub.add_parser("fold", help="fold a pruned model's linear chains (per plan, never slower) and save it")
    export = sub.add_parser("export", help="fold a pruned model and write it as a checked ONNX or torch.export file")
    for command in (fold, export):
        command.add_argument("path", help="a run folder written by `easier-kernels prune --out`, or its pruned.pt")
        command.add_argument("--decide", default="measure", choices=["measure", "merge", "separate"],
                             help="measure (follow the run's plans, time the rest, keep the fastest), merge (merge "
                                  "every chain), separate (fold batch norms only)")
        command.add_argument("--allow-inexact", action="store_true", help="allow merges that differ at image borders")
        command.add_argument("--batch-size", type=int, help="the batch size to time and optimize for (default: the "
                             "run's --deploy-batch, which its plans were timed at)")
        command.add_argument("--device", default="auto")
        command.add_argument("--force", action="store_true", help="replace --out where it exists (never the run's "
                             "own files)")
    fold.add_argument("--runtime", default="eager", choices=list(RUNTIMES), help="where the folded model will run")
    fold.add_argument("--portable", action="store_true", help="standard torch modules only (no fused kernels)")
    fold.add_argument("--out", help="where to save the folded model (default: folded.pt beside pruned.pt)")
    fold.set_defaults(func=_cmd_fold)
    export.add_argument("--format", default="onnx", choices=list(FORMATS))
    export.add_argument("--runtime", choices=list(RUNTIMES),
                        help="where the file will run (default: onnxruntime for onnx, eager for pt2)")
    export.add_argument("--out", help="the file to write (default: model.onnx / model.pt2 beside pruned.pt)")
    export.set_defaults(func=_cmd_export)
    sub.add_parser("backends", help="print the active kernel backends").set_defaults(func=_cmd_backends)
    bench = sub.add_parser("bench", help="a short kernel benchmark (GB/s and ratios against torch)")
    bench.add_argument("--shapes", nargs="+", default=["resnet18-cifar-s1", "vit-b16-mlp"])
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.set_defaults(func=_cmd_bench)
    return parser


def _check(args) -> None:
    for name in ("batch_size", "max_batches", "train_size", "val_size", "num_classes", "image_size", "change_batches",
                 "gen_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, not {value}")
    if getattr(args, "dist_timeout", 1) <= 0:
        raise UsageError(f"--dist-timeout must be > 0 seconds, not {args.dist_timeout}")
    for name in ("epochs", "max_steps", "workers"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, not {value}")
    if args.command == "prune":
        _check_prune_options(args)


def _resolve_defaults(args) -> None:
    """The defaults that depend on the dataset: text runs train with AdamW, a causal LM's quality
    is perplexity (--max-increase, a relative increase), a classifier's accuracy (--max-drop)."""
    causal_lm = args.dataset.startswith("text:")
    if causal_lm and args.max_drop is not None:
        raise UsageError(f"--max-drop is in accuracy points; a causal LM ({args.dataset}) is judged by perplexity: pass "
                         "--max-increase 0.05 (+5%) instead")
    if not causal_lm and args.max_increase is not None:
        raise UsageError("--max-increase is for causal LMs (--dataset text:FILE); a classifier is judged by accuracy: "
                         "pass --max-drop POINTS instead")
    if not text.is_text(args.dataset) and (args.tokenizer or args.split):
        raise UsageError(f"--tokenizer and --split are for text datasets (text:FILE, tsv:PATH), not {args.dataset}")
    if text.is_text(args.dataset):  # absolute: score, fold and export read the run's data from anywhere
        prefix, _, where = args.dataset.partition(":")
        args.dataset = f"{prefix}:{Path(where).expanduser().resolve()}"
    defaults = TEXT_DEFAULTS if text.is_text(args.dataset) else PRUNE_DEFAULTS
    args.optimizer = args.optimizer or defaults["optimizer"]
    adamw = args.optimizer == "adamw"
    args.lr = args.lr if args.lr is not None else TEXT_DEFAULTS["lr"] if adamw else PRUNE_DEFAULTS["lr"]
    args.train_lr = args.train_lr if args.train_lr is not None else TEXT_DEFAULTS["train_lr"] if adamw \
        else PRUNE_DEFAULTS["train_lr"]
    if causal_lm:
        args.max_increase = TEXT_DEFAULTS["max_increase"] if args.max_increase is None else args.max_increase
        args.max_drop = args.max_increase
    elif args.max_drop is None:
        args.max_drop = PRUNE_DEFAULTS["max_drop"]


def _check_prune_options(args) -> None:
    """The options `ek.prune` takes, by its own checks, before anything is read, written or trained."""
    from .prune import check_options
    from .train import check_rate

    _resolve_defaults(args)
    task = tasks.CausalLM() if args.dataset.startswith("text:") else tasks.Classification()
    try:
        check_options(task=task, optimizer=args.optimizer, max_drop=args.max_drop, epochs_per_step=args.epochs_per_step,
                      layers_per_step=args.layers_per_step, max_steps=args.max_steps, mode=args.mode,
                      scoring=args.scoring, select=args.select.replace("-", "_"), latency_target=args.latency_target,
                      deploy_batch=args.deploy_batch, lr=args.lr, distill=args.distill,
                      distill_temperature=args.distill_temperature, anneal=args.anneal, patience=args.patience,
                      entropy_weight=args.entropy_weight, entropy_side=args.entropy_side)
        check_rate("train_lr", args.train_lr)
    except ValueError as exc:  # "max_drop must be ..." -> "--max-drop must be ..."
        name, rest = str(exc).split(" ", 1)
        if name == "max_drop" and task.name == "causal_lm":
            name, rest = "max_increase", rest.removeprefix("for a causal LM ")
        raise UsageError(f"--{name.replace('_', '-')} {rest}") from None


def main(argv=None) -> int:
    from .data import UnreadableImage

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
        return args.func(args)
    except (UsageError, UnreadableImage) as exc:  # UnreadableImage: an image folder's file, found as it is read
        print(f"easier-kernels {args.command}: {exc}", file=sys.stderr)
        if isinstance(exc, LostRank):
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print(f"\neasier-kernels {args.command}: interrupted" + ("; continue with --resume" if args.command == "prune" else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
