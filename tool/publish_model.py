"""Publish a trained model: weights only, named by their hash, with a model card beside them.

  python tool/publish_model.py exp/ade20k/pspnet50/model/train_epoch_100.pth --output release/
  python tool/publish_model.py best.pth --output release/ --config config/ade20k/ade20k_pspnet50.yaml

Writes <output>/<dataset>_<arch><layers>-<sha256[:8]>.pth (e.g. ade20k_pspnet50-1a2b3c4d.pth):
{'state_dict': ...} with the 'module.' prefix, no optimizer, tensors only, so it loads with
torch.load(weights_only=True) in semseg's test.py and in ours, also by URL once uploaded
(TEST.model_path https://.../ade20k_pspnet50-1a2b3c4d.pth: the name's hash is checked). Beside it,
<same name>.md: architecture, classes, crop, the training config and epochs, the test
mIoU/mAcc/allAcc of every metrics.json of the experiment (result/<checkpoint>/<split>/<ss|ms>/,
written by tool/test.py) or of --metrics, the command that evaluates it, and the sha256.
The training config comes from the checkpoint (tool/train.py stores it) or from --config.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from model import build_model  # noqa: E402
from model.weights import extract_state_dict, load_checkpoint, load_model_state  # noqa: E402
from util.checkpoint import EPOCH_FILE, atomic_save, check_writable, with_module_prefix  # noqa: E402
from util.cli import run_main, setup_logging  # noqa: E402
from util.config import load_config  # noqa: E402
from util.download import file_digest  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.experiment import result_folder  # noqa: E402

logger = logging.getLogger("publish_model")
HASH_DIGITS = 8
SCORES = ("mIoU", "mAcc", "allAcc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of tool/train.py (or semseg's)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the weights and the model card")
    parser.add_argument("--config", help="the training config, when the checkpoint holds none (semseg's)")
    parser.add_argument("--dataset", help="dataset name in the file name; default: the experiment folder's "
                        "(exp/<dataset>/<exp>/model/...), else the last part of DATA.data_root")
    parser.add_argument("--metrics", type=Path, action="append", default=[],
                        help="a metrics.json of tool/test.py to report (repeatable); default: the experiment's")
    return parser.parse_args(argv)


def check_segmentation(state: dict, path: Path) -> None:
    """A file without a classifier head (cls.*) is no segmentation network: most often ImageNet
    backbone weights, whose right place is TRAIN.pretrained_backbone, not a release."""
    names = [key.removeprefix("module.") for key in state]
    if not any(name.startswith("cls.") for name in names):
        kind = ("ImageNet backbone weights (an fc classifier, no segmentation head)" if "fc.weight" in names
                else "no segmentation head (no cls.* weights)")
        raise UserError(f"{path} is not a segmentation checkpoint: it holds {kind}; publish a checkpoint of "
                        f"tool/train.py (exp/<dataset>/<exp>/model/train_epoch_<N>.pth); backbone weights are "
                        f"TRAIN.pretrained_backbone (tool/prepare_weights.py)")


def training_config(checkpoint: dict, config: str | None, path: Path) -> dict:
    """{section: {key: value}} of the run that wrote the checkpoint."""
    if config is not None:
        return load_config(config).to_dict()
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict):
        return checkpoint["config"]
    raise UserError(f"{path} holds no training config (semseg's checkpoints do not); give the YAML it was "
                    f"trained with: --config config/<dataset>/<dataset>_<arch><layers>.yaml")


def flat(config: dict) -> SimpleNamespace:
    return SimpleNamespace(**{key: value for section in config.values() for key, value in section.items()})


def check_fits(state: dict, cfg: SimpleNamespace, path: Path) -> None:
    """The weights must be exactly the network the config describes, or the card would lie."""
    load_model_state(build_model(cfg), {"state_dict": state}, path, "checkpoint", strict=True)


def dataset_name(path: Path, cfg: SimpleNamespace, given: str | None) -> str:
    if given:
        return given
    folder = path.resolve().parent
    if folder.name == "model" and folder.parent.parent.name:  # exp/<dataset>/<exp>/model/
        return folder.parent.parent.name
    return Path(cfg.data_root).name or "model"


def experiment_metrics(path: Path) -> list[Path]:
    """metrics.json files of evaluations of this checkpoint in its experiment folder."""
    folder = path.resolve().parent
    if folder.name != "model":
        return []
    named = result_folder(folder.parent, path.name, "split", [1.0]).parent.parent  # result/<checkpoint name>
    return sorted(named.glob("*/*/metrics.json"))


def read_metrics(paths: list[Path]) -> list[dict]:
    found = []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UserError(f"--metrics: {path} is not a readable metrics.json of tool/test.py ({error})") from None
        if not isinstance(data, dict) or not all(key in data for key in SCORES):
            raise UserError(f"--metrics: {path} lacks {', '.join(SCORES)}; expected a metrics.json of tool/test.py")
        found.append({**data, "path": path})
    return found


def evaluation_config(metrics: list[dict], dataset: str, arch: str) -> str:
    """The YAML to evaluate with: the one the recorded evaluation used, else the shipped one."""
    for entry in metrics:
        if entry.get("config"):
            return entry["config"]
    shipped = Path("config") / dataset / f"{dataset}_{arch}.yaml"
    return str(shipped) if (Path(__file__).resolve().parents[1] / shipped).is_file() else "<your config>.yaml"


def model_card(name: str, sha256: str, cfg: SimpleNamespace, config: dict, epoch, metrics: list[dict],
               eval_config: str) -> str:
    arch = {"psp": "PSPNet", "psa": "PSANet"}.get(cfg.arch, cfg.arch)
    lines = [f"# {name}", "",
             f"{arch} with a dilated ResNet-{cfg.layers} backbone (output stride 8), {cfg.classes} classes.", "",
             "| | |", "|---|---|",
             f"| file | `{name}` |", f"| sha256 | `{sha256}` |",
             f"| architecture | {arch}, ResNet-{cfg.layers}{', deep stem' if cfg.deep_stem else ''} |",
             f"| classes | {cfg.classes} |", f"| training crop | {cfg.train_h} x {cfg.train_w} |",
             f"| epochs trained | {epoch if epoch is not None else 'not recorded'} of {cfg.epochs} |",
             f"| ImageNet initialisation | {cfg.pretrained_backbone or 'initmodel/resnet%d_v2.pth' % cfg.layers} |",
             f"| test window, base size | {cfg.test_h} x {cfg.test_w}, {cfg.base_size} |", "",
             "## Results", ""]
    if metrics:
        lines += ["| evaluation | images | scales | flip | mIoU | mAcc | allAcc |", "|---|---|---|---|---|---|---|"]
        for m in metrics:
            scores = " | ".join(f"{m[key]:.4f}" if m[key] is not None else "n/a" for key in SCORES)
            evaluation = "/".join(m["path"].parts[-4:-1])  # <checkpoint>/<split>/<ss|ms>
            lines.append(f"| {evaluation} | {m.get('images', '?')} | {m.get('scales', '?')} | {m.get('flip', '?')} "
                         f"| {scores} |")
    else:
        lines.append("No metrics.json of tool/test.py was found for this checkpoint (give --metrics).")
    lines += ["", "## Evaluate", "", "```",
              f"python tool/test.py --config={eval_config} TEST.model_path {name}",
              f"python tool/test.py --config={eval_config} TEST.model_path https://<where it is hosted>/{name}",
              "```", "",
              "The file holds {'state_dict': ...} (keys prefixed 'module.', as semseg saved them) and no optimizer; "
              "it loads with torch.load(weights_only=True). Loaded by URL, it is downloaded once into torch.hub's "
              f"cache and its sha256 must start with {sha256[:HASH_DIGITS]}, the hash in its name.", "",
              "## Training config", "", "```yaml", yaml.safe_dump(config, sort_keys=False, default_flow_style=None).rstrip(),
              "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    checkpoint = load_checkpoint(args.checkpoint, "checkpoint")
    state = extract_state_dict(checkpoint, args.checkpoint, "checkpoint")
    check_segmentation(state, args.checkpoint)
    config = training_config(checkpoint, args.config, args.checkpoint)
    cfg = flat(config)
    check_fits(state, cfg, args.checkpoint)
    dataset = dataset_name(args.checkpoint, cfg, args.dataset)
    arch = f"{cfg.arch}net{cfg.layers}"
    metrics = read_metrics(args.metrics or experiment_metrics(args.checkpoint))
    check_writable(args.output, "--output")
    temporary = args.output / f".{dataset}_{arch}.publishing{os.getpid()}.pth"
    atomic_save({"state_dict": with_module_prefix(state)}, temporary)
    sha256 = file_digest(temporary)
    name = f"{dataset}_{arch}-{sha256[:HASH_DIGITS]}.pth"
    os.replace(temporary, args.output / name)
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    if epoch is None and (found := EPOCH_FILE.match(args.checkpoint.name)):
        epoch = int(found.group(1))
    card = args.output / f"{Path(name).stem}.md"
    evaluate_with = evaluation_config(metrics, dataset, arch)
    card.write_text(model_card(name, sha256, cfg, config, epoch, metrics, evaluate_with), encoding="utf-8")
    logger.info("wrote %s (sha256 %s, %d tensors) and its model card %s; %d evaluation(s) reported",
                args.output / name, sha256, len(state), card, len(metrics))


if __name__ == "__main__":
    run_main(main)
