# On the lent GPU machine (after bench/device/prepare.sh here): the CUDA tests, then the embedding benchmark.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
repo=$PWD; mkdir -p /tmp/w && cp -r bench /tmp/w/ && cp tests/test_batcher.py /tmp/w/ && cd /tmp/w || exit 1
export PYTHONPATH=/tmp/site:$repo/.gpu/shim HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, sentence_transformers as s, transformers as t; print('torch', torch.__version__, 'st', s.__version__, 'tf', t.__version__)" | tee -a $OUT/gpu.txt
timeout 150 python3 -m pytest --noconftest -p gpu_plugin -p no:cacheprovider -q -ra -W ignore::pytest.PytestUnknownMarkWarning test_batcher.py 2>&1 | tee $OUT/cuda_tests.log | tail -12
timeout 240 python3 -m bench.embed_bench --device cuda:0 --model-path $repo/.gpu/minilm-fp16 --out-dir $OUT 2>&1 | grep -v "Loading weights" | tee $OUT/embed_bench.log | tail -40
