#!/usr/bin/env bash
# The GPU check in one run: the CUDA tests (pytest -m gpu), then the GPU throughput table
# (agents.experiments.bench_gpu), each stage time-boxed; figures land in benchmarks/results/gpu.json
# as each stage ends. Under 8 minutes of GPU time including the install (the boxes add up to 450 s).
#
#   bash benchmarks/gpu_wheels.sh            # once, where pip reaches an index: fills .whl/
#   bash benchmarks/gpu_check.sh             # on the GPU machine (its python3 holds CUDA torch)
#   bash benchmarks/gpu_check.sh --dry-run   # here, on the CPU: checks the wheels, installs
#                                            # nothing, runs the table's code at a tiny shape
#
# PYTHON names the interpreter (default python3). On the GPU machine the project is installed with
# --no-deps over the machine's own torch, and the packages it lacks come from the wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
dry_run=0
case "${1:-}" in
    --dry-run) dry_run=1 ;;
    "") ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

# -- the wheels (pure Python; the GPU machine reaches no package index) -----------------------
wheels=(gymnasium-1.4.0 farama_notifications-0.0.6 stable_baselines3-2.9.2 tyro-1.0.17
        docstring_parser-0.18.0 typeguard-4.6.1)
missing=0
for wheel in "${wheels[@]}"; do
    if ! compgen -G ".whl/${wheel}-*.whl" >/dev/null; then
        echo "gpu_check: missing .whl/${wheel}-*.whl" >&2
        missing=1
    fi
done
if ((missing)); then
    echo "gpu_check: run 'bash benchmarks/gpu_wheels.sh' first (where pip reaches an index)" >&2
    exit 1
fi
echo "gpu_check: ${#wheels[@]} wheels present ($(du -ck .whl/*.whl | tail -1 | cut -f1) KiB)"

# -- install (not in a dry run) ----------------------------------------------------------------
if ((dry_run)); then
    device=cpu
    quick=--quick
    out=$(mktemp -d)/gpu.json
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    device=cuda
    quick=
    out=benchmarks/results/gpu.json
    rm -f "$out"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/seqmatch-site .whl/*.whl || exit 1
    export PYTHONPATH=$PWD:/tmp/seqmatch-site${PYTHONPATH:+:$PYTHONPATH}
    # The `seqmatch` command; the packages import from the checkout either way (PYTHONPATH).
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
        || echo "gpu_check: editable install failed; running from the checkout"
fi
export PYTHONUNBUFFERED=1
bench=("$python" -m agents.experiments.bench_gpu --device "$device" $quick --json "$out")

# -- 1. the CUDA tests (skipped, with their reason, without CUDA) ------------------------------
timeout 180 "$python" -m pytest -m gpu -rs -q -p no:cacheprovider tests/gpu
status=$?
"${bench[@]}" --set "gpu_tests_exit_status=$status"
echo "gpu_check: pytest -m gpu exited $status (124: time box of 180 s)"

# -- 2. the throughput table, one time-boxed process per stage ---------------------------------
declare -A box=([train]=120 [hf_train]=45 [generate]=50 [hf_generate]=40)
for stage in train hf_train generate hf_generate; do
    timeout "${box[$stage]}" "${bench[@]}" --stages "$stage"
    status=$?
    ((status == 0)) || echo "gpu_check: stage $stage exited $status (124: time box of ${box[$stage]} s)"
done

echo "gpu_check: figures in $out"
cat "$out"
