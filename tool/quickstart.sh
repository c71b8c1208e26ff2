#!/bin/sh
# The README's first command: install, make the toy dataset, train a small PSPNet, evaluate it.
#   sh tool/quickstart.sh [SECTION.key value ...]     (overrides go to train.py and test.py)
# Re-running resumes (TRAIN.resume auto): a finished run is only evaluated again.
set -e
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
config=config/toy/toy_pspnet18.yaml
echo "== installing requirements"
$PYTHON -m pip install -q --disable-pip-version-check -r requirements.txt
echo "== toy dataset"
$PYTHON tool/make_toy_dataset.py
echo "== training (CUDA if available, else CPU)"
$PYTHON tool/train.py --config=$config TRAIN.resume auto "$@"
echo "== multi-scale sliding-window evaluation"
result=$($PYTHON -c "import sys; sys.path.insert(0, '.'); from util.config import load_config; \
c = load_config('$config', sys.argv[1:]); print(c.save_folder); print(c.save_path); print(c.epochs)" "$@")
save_folder=$(echo "$result" | sed -n 1p)
save_path=$(echo "$result" | sed -n 2p)
epochs=$(echo "$result" | sed -n 3p)
$PYTHON tool/test.py --config=$config TEST.model_path "$save_path/train_epoch_$epochs.pth" "$@"
cat <<TXT
== done
colour predictions:   $save_folder/color/
report:               $save_folder/report.html   (scores, confusions, the worst images)
worst images:         $save_folder/vis/   (image | prediction | ground truth | errors)
scores (JSON):        $save_folder/metrics.json
checkpoints and logs: $save_path/
TensorBoard:          tensorboard --logdir $save_path
TXT
